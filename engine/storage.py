"""Where the engine's memory units live, and how they travel.

The units of a long prompt are most of its memory (a million tokens of a 7B model: 64 GiB), so they are
stored apart from the rest of the caches: in host memory, page-locked and mapped for the GPU, as the paper
keeps them; or in GPU memory where the whole prompt fits with room to spare (unit_storage=auto|host|device).
This file holds
  - the memory plan: what the caches of a prompt take, from the shapes alone, before anything is allocated,
    and place_units, which picks host or GPU memory for unit_storage=auto;
  - fp8 units (unit_dtype=fp8): float8 e4m3 bytes with a scale per unit and head;
  - page-locked host memory, locked a slice at a time as the pieces come (lock_rows);
  - the copies between the unit storage and the device pool: Triton kernels that read host rows over PCIe
    themselves, at indices only the GPU knows, on a side stream (gather_from_host, scatter_to_host, join);
  - outside_compile and compiled: torch.compile for the piece step, leaving these copies uncompiled.
The copies are checked against plain indexing in tests/test_gpu.py (test_host_copies_move_the_rows_asked).
"""
import dataclasses
import functools
import weakref

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU build of torch: nothing here launches a kernel without a GPU
    triton = None


# ----------------------------------------------------------------------------- sizes and placement

def grown_units(capacity: int, need: int) -> int:
    """The capacity MemoryUnits.reserve grows to for need units (and memory_plan counts)."""
    return max(need, capacity + capacity // 8)


def new_units_most(cfg, P: int) -> int:
    """The most units a piece of P queries can make: before it at most n_local + block_size - 1 recent
    tokens wait (fewer than a block beyond the window), so at most P + block_size - 1 leave the window."""
    return (P + cfg.block_size - 1) // cfg.block_size


def memory_plan(args, attention: str, cfg, n_tokens: int, dtype, device) -> dict:
    """The bytes the engine's caches of all layers take for a sequence of n_tokens, from the shapes alone,
    before anything is allocated: {"host": ..., "device": ..., "parts": {name: bytes}, "where": {name: ...}}.
    On a GPU the memory units live in host memory (unless unit_storage=device) and the rest on the device;
    on a CPU everything is host memory."""
    L, Hq, Hkv, D = args.n_layers, args.n_heads, args.n_kv_heads, args.head_dim
    e = torch.empty(0, dtype=dtype).element_size()
    on_gpu = torch.device(device).type == "cuda"
    parts, host = {}, set()
    if attention == "full":
        parts["keys and values"] = L * 2 * Hkv * D * e * n_tokens
    else:
        ring = cfg.n_local + cfg.block_size + cfg.exc_block_size
        parts["window"] = L * (ring * (3 * Hkv * D * e + 4 * Hq + 8) + 2 * Hkv * (cfg.n_init + 1) * D * e)
    if attention == "infllm":
        unit = Hkv * cfg.block_size * D * (1 if cfg.unit_dtype == "fp8" else e)
        rows = grown_units(cfg.topk, n_tokens // cfg.block_size + 1) + 1  # MemoryUnits.reserve, scratch row
        parts["memory units"] = L * 2 * rows * unit
        parts["representative keys"] = L * rows * (Hq * D * e + 8 + (8 * Hkv if cfg.unit_dtype == "fp8" else 0))
        staging = new_units_most(cfg, cfg.exc_block_size) if on_gpu else 0  # write-back buffers
        parts["unit pool"] = L * 2 * (cfg.max_cached_block + 1 + staging) * unit
        if cfg.unit_storage != "device":  # auto is planned as it starts; place_units plans both
            host.add("memory units")
    where = {k: "host" if k in host or not on_gpu else "device" for k in parts}
    return {"host": sum(v for k, v in parts.items() if where[k] == "host"),
            "device": sum(v for k, v in parts.items() if where[k] == "device"), "parts": parts, "where": where}


GPU_HEADROOM = 4 << 30  # bytes unit_storage=auto leaves free on the GPU (at least; and a tenth of the GPU)


def place_units(caches, args, cfg, n_tokens: int, free: int, held_tokens: int = 0) -> bool:
    """unit_storage=auto on a GPU, before the caches grow from room for held_tokens to n_tokens: the units
    go to (or stay in) GPU memory if the caches of n_tokens, units included, leave a tenth of the GPU and
    GPU_HEADROOM at least for the activations and CUDA graphs; else to (or back to) pinned host memory,
    the reference (a million tokens of a 7B model). free: bytes of GPU memory free now, beside what the
    caches of held_tokens hold already. Returns whether the units are on the GPU."""
    from engine.memory import FixedShapeMemory
    units = [c.units for c in caches if isinstance(c, FixedShapeMemory) and c.use_units]
    on_gpu = bool(units) and units[0].device.type == "cuda"
    if not on_gpu or cfg.unit_storage != "auto":
        return on_gpu and cfg.unit_storage == "device"
    device, dtype = units[0].device, units[0].dtype

    def plan(storage, n):
        return memory_plan(args, "infllm", dataclasses.replace(cfg, unit_storage=storage), n, dtype, device)["device"]
    need = plan("device", n_tokens) - plan("device" if units[0].storage_k.is_cuda else "host", held_tokens)
    spare = max(GPU_HEADROOM, torch.cuda.get_device_properties(device).total_memory // 10)
    on_device = need + spare <= free
    for u in units:
        u.place(on_device)
    return on_device


# ----------------------------------------------------------------------------- fp8 units

FP8 = torch.float8_e4m3fn


def to_fp8(x):
    """Units [n, H, B, D] -> (bytes [n, H, B, D] uint8, scales [n, H] fp32): float8 e4m3 with one scale
    per unit and head, which maps the largest magnitude to e4m3's largest number. The bytes travel as
    uint8, which every copy and index kernel takes (CPU index_copy_ has no float8)."""
    amax = x.abs().amax(dim=(2, 3)).float().clamp(min=torch.finfo(torch.float32).tiny)
    scale = amax / torch.finfo(FP8).max
    return (x.float() / scale[:, :, None, None]).to(FP8).view(torch.uint8), scale


def from_fp8(bits, scale, dtype):
    """The inverse of to_fp8, up to e4m3's rounding: bytes [n, H, B, D], scales [n, H] -> dtype."""
    return (bits.view(FP8).float() * scale[:, :, None, None]).to(dtype)


# ----------------------------------------------------------------------------- page-locked host memory

def pinned_empty(shape, dtype):
    """Page-locked host memory of exactly this size. torch's pinned allocator rounds every block up to a
    power of two and keeps freed blocks for reuse, so 1.07 GB of units would hold 2 GB, and the storage
    of an earlier, shorter prompt would stay: at 1M tokens that doubles the host memory. Registering an
    ordinary allocation (cudaHostRegister, mapped for the GPU) costs exactly its size. Locked whole at once;
    the unit storage is locked a slice at a time instead (lockable_empty, MemoryUnits.pin)."""
    t, locked = lockable_empty(shape, dtype)
    lock_rows(t, 0, t.shape[0], locked)
    return t


def lockable_empty(shape, dtype):
    """Host memory that lock_rows page-locks later, a slice of rows at a time (an ordinary allocation, for
    the reason pinned_empty gives), and the list of the addresses it registers (released with the tensor)."""
    t, locked = torch.empty(shape, dtype=dtype), []
    weakref.finalize(t, _unlock, torch.cuda.cudart(), locked)
    return t, locked


def _unlock(cudart, locked):
    for ptr in locked:
        cudart.cudaHostUnregister(ptr)


PAGE = 4096


def lock_span(base, row_bytes, rows, r0, r1):
    """The bytes [start, end) that page-locking rows r0..r1 of a storage of `rows` rows at `base` registers,
    rows before r0 done already. Cut at page boundaries: two registrations must not share a page (the
    second would fail), so a row split by a cut is locked up to the cut with the earlier rows."""
    end = base + rows * row_bytes

    def cut(r):
        return base if r == 0 else min(-(-(base + r * row_bytes) // PAGE) * PAGE, end)
    return cut(r0), cut(r1)


def lock_rows(t, r0, r1, locked, fresh=True):
    """Page-lock rows [r0, r1) of the host tensor t (rows before r0 are locked), mapped for the GPU. fresh:
    the rows were never written, so they are touched first by all cores at once (zero_ runs in parallel):
    registering untouched memory faults each page in on one thread, 3-4x slower (docs/benchmarks.md)."""
    start, end = lock_span(t.data_ptr(), t[0].numel() * t.element_size(), t.shape[0], r0, r1)
    if end <= start:
        return
    if fresh:
        t[r0:r1].zero_()
    err = torch.cuda.cudart().cudaHostRegister(start, end - start, 3)  # portable | mapped
    if int(err) != 0:
        raise RuntimeError(f"cannot page-lock {(end - start) / 2**30:.1f} GiB of host memory for the memory units (CUDA error {int(err)})")
    locked.append(start)


# ----------------------------------------------------------------------------- copies, and torch.compile

_OUTSIDE_COMPILE = []


def outside_compile(fn):
    """torch.compiler.disable, applied when compiled() is first asked for rather than at import: the
    decorator imports dynamo, about 2 s at the start of every process, and a process that never
    compiles does not need it. Until then the call goes straight to fn."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        return (call.disabled or fn)(*args, **kwargs)
    call.disabled = None
    _OUTSIDE_COMPILE.append((call, fn))
    return call


def compiled(fn):
    """torch.compile for the piece step, called with two shapes (a piece, a decoding step): each gets its
    own specialised graph (dynamic=False: a graph generalised over the number of queries would serve the
    steady 512-query pieces too, with slower kernels). The one size that grows with the prompt, the unit
    storage, is marked dynamic where it is allocated (MemoryUnits.reserve)."""
    for call, f in _OUTSIDE_COMPILE:
        call.disabled = call.disabled or torch.compiler.disable(f)
    return torch.compile(fn, dynamic=False)


def _after_current(stream):
    """Work queued inside this context goes to stream (None: the current stream), after the work queued so
    far on the current stream."""
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream())
    return torch.cuda.stream(stream)


GATHER_SPLIT = 4  # programs per unit in gather_from_host and scatter_to_host from host storage (a pair shares them)
COPY_BLOCK = 4096  # elements a program copies at a time


@outside_compile  # a host address is no tensor: torch.compile calls this as it is
def gather_from_host(src, rows, dst, dst_rows, stream=None):
    """dst[dst_rows[i]] = src[rows[i]] for every i with dst_rows[i] >= 0, where src lives in pinned host
    memory (or GPU memory: unit_storage=device) and the indices on the GPU. A Triton kernel reads the host
    rows over PCIe itself (pinned memory is mapped into the GPU's address space), so the host never has to
    learn which units were selected: no synchronisation. src and dst may be pairs of tensors of one shape
    and dtype (keys and values), copied by the same launch. With a stream, the copy starts there once the
    work queued so far is done, and runs beside whatever comes next until join(stream)."""
    n = rows.numel()
    if n == 0:
        return
    src, dst = _pair(src), _pair(dst)
    with _after_current(stream):
        split = _copy_split(src[0], len(src))
        _gather_kernel[(n, split, len(src))](src[0].data_ptr(), src[-1].data_ptr(), rows, dst[0], dst[-1], dst_rows,
                                             src[0][0].numel(), BLOCK=COPY_BLOCK, SPLIT=split)


@outside_compile
def scatter_to_host(src, dst, rows, stream=None):
    """dst[rows[i]] = src[i] for every i with rows[i] >= 0, where dst lives in pinned host memory (or GPU
    memory) and src and rows on the GPU: the write-back twin of gather_from_host (pairs too). New units go
    to their storage at rows only the device knows. With a stream, as in gather_from_host: src and rows must
    stay untouched until join(stream)."""
    src, dst = tuple(x.contiguous() for x in _pair(src)), _pair(dst)
    n = src[0].shape[0]
    if n == 0:
        return
    with _after_current(stream):
        split = _copy_split(dst[0], len(src))
        _scatter_kernel[(n, split, len(src))](src[0], src[-1], rows, dst[0].data_ptr(), dst[-1].data_ptr(),
                                              dst[0][0].numel(), BLOCK=COPY_BLOCK, SPLIT=split)


@outside_compile
def join(stream):
    """Work queued after this waits for everything queued on stream so far."""
    torch.cuda.current_stream().wait_stream(stream)


def _copy_split(storage, tensors):
    """Programs per unit and tensor of a copy to or from storage. Host storage: a few, each looping over
    its share of the row (a pair of tensors shares them): a copy that waits on PCIe holds few of the GPU's
    cores, so the attention running beside it keeps the rest. GPU storage: one a block of the row, so the
    copy runs at the speed of GPU memory (a 7B model's unit: 32 programs a tensor, not 2)."""
    if storage.is_cuda:
        return -(-storage[0].numel() // COPY_BLOCK)
    return max(1, GATHER_SPLIT // tensors)


def _pair(x):
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


if triton is not None:
    @triton.jit
    def _gather_kernel(src_addr_k, src_addr_v, rows, dst_k, dst_v, dst_rows, row_numel, BLOCK: tl.constexpr,
                       SPLIT: tl.constexpr):
        i, j, kv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        d = tl.load(dst_rows + i)
        if d >= 0:  # hits copy nothing
            r = tl.load(rows + i)
            if kv == 0:
                _copy_row(src_addr_k.to(tl.int64).to(tl.pointer_type(dst_k.dtype.element_ty)), r, dst_k, d, j,
                          row_numel, BLOCK, SPLIT)
            else:
                _copy_row(src_addr_v.to(tl.int64).to(tl.pointer_type(dst_v.dtype.element_ty)), r, dst_v, d, j,
                          row_numel, BLOCK, SPLIT)

    @triton.jit
    def _scatter_kernel(src_k, src_v, rows, dst_addr_k, dst_addr_v, row_numel, BLOCK: tl.constexpr, SPLIT: tl.constexpr):
        i, j, kv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        r = tl.load(rows + i)
        if r >= 0:  # -1: a block that makes no unit
            if kv == 0:
                _copy_row(src_k, i, dst_addr_k.to(tl.int64).to(tl.pointer_type(src_k.dtype.element_ty)), r, j,
                          row_numel, BLOCK, SPLIT)
            else:
                _copy_row(src_v, i, dst_addr_v.to(tl.int64).to(tl.pointer_type(src_v.dtype.element_ty)), r, j,
                          row_numel, BLOCK, SPLIT)

    @triton.jit
    def _copy_row(src, r, dst, d, j, row_numel, BLOCK: tl.constexpr, SPLIT: tl.constexpr):
        """Program j's share of dst row d = src row r; one side is a host address, mapped for the GPU (Triton
        passes a small one as int32: the caller widens it first)."""
        for start in range(j * BLOCK, row_numel, SPLIT * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(src + r * row_numel + offs, mask=offs < row_numel)
            tl.store(dst + d * row_numel + offs, x, mask=offs < row_numel)
