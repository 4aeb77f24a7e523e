"""The engine's context memory: infllm.ContextMemory's algorithm in fixed shapes, with its state on the device.

infllm.py says what InfLLM computes, with host integers and tensors that grow. This file computes the same, but
every buffer has a fixed size and every count is a device tensor, so a piece never waits for the host and the
work of a piece has one shape whatever the prompt: two compiled programs (a piece, a decoding step) and two CUDA
graphs (engine/graphs.py) serve every prompt, and the unit copies run on a side stream beside the attention.
  - MemoryUnits: one layer's units in storage (pinned host memory, or GPU memory: engine/storage.py), their
    representative keys on the device, and a pool of max_cached_block device slots kept by LRU.
  - FixedShapeMemory: the window as a ring buffer, init tokens, counters, the piece step (_attend_piece).
  - FixedShapeStream: the same without units (StreamingLLM / LM-Infinite).
The bookkeeping steps of a piece come from a table of ops picked once per cache (pick_ops): each a Triton
kernel on an eager GPU, or its PyTorch specification (engine/bookkeeping.py). tests/test_engine.py proves the
outputs and the selected units equal to infllm.py's in float64 on a CPU.
"""
import dataclasses
import functools
from typing import Callable

import torch
import torch.nn.functional as F

from engine import bookkeeping as bk
from engine.attention import CHUNK_ATTENTION
from engine.storage import (compiled, gather_from_host, grown_units, join, lock_rows, lockable_empty, new_units_most,
                            outside_compile, scatter_to_host, to_fp8)
from infllm import InfLLMConfig


@dataclasses.dataclass(frozen=True)
class Ops:
    """The bookkeeping steps of a piece, in its order; each the Triton kernel of engine/bookkeeping.py or its
    PyTorch specification (name_spec), which take the same arguments and give the same results."""
    piece_angles: Callable
    ring_write: Callable
    window_mask: Callable
    unit_scores: Callable
    select_top: Callable
    lru_fetch: Callable
    memory_part: Callable
    retire: Callable


SPEC = Ops(bk.piece_angles_spec, bk.ring_write_spec, bk.window_mask_spec, bk.unit_scores_spec, bk.select_top_spec,
           bk.lru_fetch_spec, bk.memory_part_spec, bk.retire_spec)
TRITON = Ops(bk.piece_angles, bk.ring_write, bk.window_mask, bk.unit_scores, bk.select_top, bk.lru_fetch, bk.memory_part,
             bk.retire)


def pick_ops(fast: bool, cfg: InfLLMConfig, units: bool = True) -> Ops:
    """The Triton kernels where fast (an eager GPU, not float64), else the specs. Three kernels have limits of
    their own: lru_fetch ranks the slots by comparing every pair in one program (up to LRU_MOST slots), and
    memory_part and retire take units in the model's dtype (not fp8); retire moves tokens into units (not the
    stream cache's, which forgets them)."""
    if not fast:
        return SPEC
    fp8 = cfg.unit_dtype == "fp8"
    return dataclasses.replace(TRITON, lru_fetch=TRITON.lru_fetch if cfg.max_cached_block <= bk.LRU_MOST else SPEC.lru_fetch,
                               memory_part=TRITON.memory_part if units and not fp8 else SPEC.memory_part,
                               retire=TRITON.retire if units and not fp8 else SPEC.retire)


class MemoryUnits:
    """The memory units of one layer: each unit's K/V block in storage (host memory, pinned when there is a
    GPU, or GPU memory: unit_storage), its representative key on the device, and a pool of max_cached_block
    device slots kept by LRU.
    A unit is an index into this storage, never a Python object. Every buffer has a fixed size and
    every counter lives on the device, so a lookup never waits for the host and the same kernels (one
    CUDA graph) serve every piece. Storage has one row more than its capacity: masked writes go there."""

    AGE = 1 << 24  # slot age key = last use * AGE + unit: ties between units used together go to the lower

    def __init__(self, cfg: InfLLMConfig, n_heads, n_kv_heads, head_dim, device, dtype, parallel=False, compiled=False,
                 ops: Ops = SPEC):
        self.cfg, self.device, self.dtype = cfg, torch.device(device or "cpu"), dtype
        self.ops = ops
        # Tensor parallel (these are one process's share of the heads): a unit's score sums over all query heads.
        self.over_heads = sum_scores_over_processes if parallel else (lambda scores: scores)
        self.compiled = compiled  # read by the compiled piece step: growing storage is marked dynamic
        self.block = (n_kv_heads, cfg.block_size, head_dim)
        # fp8 units: their bytes as uint8 in storage and pool, a scale per unit, head and K/V on the device.
        self.fp8 = cfg.unit_dtype == "fp8"
        self.store = torch.uint8 if self.fp8 else dtype
        self.scales = torch.empty(0, 2, n_kv_heads, device=device) if self.fp8 else None
        counter = functools.partial(torch.zeros, (), dtype=torch.long, device=device)
        self.n, self.lookups, self.hits, self.misses, self.clock = (counter() for _ in range(5))
        self.storage_k = self.storage_v = torch.empty(0, *self.block, dtype=self.store)
        # On a GPU the storage is page-locked host memory, unless the units are stored on the device
        # (unit_storage=auto starts in host memory, and place may move them).
        self.host_pinned = self.device.type == "cuda" and cfg.unit_storage != "device"
        self.locked = [[], []]  # host_pinned: the addresses of the storage's page-locked slices
        self.pinned = 0  # host_pinned: rows [0, pinned) of both are page-locked (see pin)
        self.reprs = torch.empty(0, n_heads * head_dim, device=device, dtype=dtype)  # per unit [Hq, D] flattened
        self.last = None  # set to a dict to keep the last lookup's queries and scores (scripts/needle_units.py)
        self.unit_slot = torch.empty(0, dtype=torch.long, device=device)  # unit -> slot, -1: not cached
        S = cfg.max_cached_block
        self.pool_k = torch.zeros(S + 1, *self.block, device=device, dtype=self.store)  # slot S: scratch
        self.pool_v = torch.zeros_like(self.pool_k)
        self.slot_unit = torch.full((S + 1,), -1, dtype=torch.long, device=device)
        self.slot_used = torch.full((S + 1,), -1, dtype=torch.long, device=device)  # clock of last use; -1: free
        self.version = 0  # bumped when storage is reallocated (captured CUDA graphs hold its addresses)
        # On a GPU, units load on a stream of their own, beside the local part's attention; the indices
        # that copy reads sit in buffers of ours, so no later kernel reuses their memory meanwhile.
        # New units are written back to host memory on that stream too, from staging buffers of ours.
        # High priority, for two reasons. PyTorch hands out streams round-robin from a pool of 32 per
        # priority: at the default priority the loaders of 30 layers and the wavefront's streams (one per
        # layer, engine/graphs.py) would share CUDA streams, and a layer's loads would wait behind another
        # layer's piece (half the wavefront's speed: docs/benchmarks.md). And a load mostly waits on PCIe,
        # holding few cores: scheduled first, it delays the rest little.
        self.loader = torch.cuda.Stream(self.device, priority=-1) if self.device.type == "cuda" else None
        self.load_units = torch.zeros(cfg.topk, dtype=torch.long, device=device)
        self.load_slots = torch.full((cfg.topk,), -1, dtype=torch.long, device=device)
        self.stage_k = self.stage_v = self.stage_rows = None
        if self.loader is not None:
            most = new_units_most(cfg, cfg.exc_block_size)
            self.stage_k = torch.zeros(most, *self.block, device=device, dtype=self.store)
            self.stage_v = torch.zeros_like(self.stage_k)
            self.stage_rows = torch.zeros(most, dtype=torch.long, device=device)
        self.reserve(cfg.topk)

    def _new_storage(self, n):
        """Storage for n rows, and in pinned host memory the list of its page-locked slices (locked by pin)."""
        if self.host_pinned:
            return lockable_empty((n, *self.block), self.store)
        return torch.zeros(n, *self.block, dtype=self.store, device=self.device), None

    @property
    def capacity(self):
        return self.reprs.shape[0] - 1

    @property
    def count(self):
        """Units stored (a host sync: for statistics and tests)."""
        return int(self.n)

    def reset(self):
        """Forget every unit, keeping the buffers (and so any CUDA graph that reads them)."""
        for t, v in ((self.n, 0), (self.lookups, 0), (self.clock, 0), (self.hits, 0), (self.misses, 0),
                     (self.unit_slot, -1), (self.slot_unit, -1), (self.slot_used, -1)):
            t.fill_(v)

    def add(self, k_blocks, v_blocks, reprs, n_new=None):
        """Store the first n_new (a device count; default all) of the blocks [most, Hkv, B, D] as new
        units after the last one, with their representative keys [most, Hq * D]. The others go nowhere:
        a piece makes at most `most` units, and how many only the device knows."""
        most = k_blocks.shape[0]
        n_new = most if n_new is None else n_new
        j = torch.arange(most, device=self.n.device)
        rows = torch.where(j < n_new, self.n + j, self.capacity)  # row `capacity`: scratch
        if self.fp8:
            (k_blocks, k_scale), (v_blocks, v_scale) = to_fp8(k_blocks), to_fp8(v_blocks)
            self.scales.index_copy_(0, rows, torch.stack([k_scale, v_scale], dim=1))
        if self.storage_k.device == k_blocks.device:
            self.storage_k.index_copy_(0, rows, k_blocks)
            self.storage_v.index_copy_(0, rows, v_blocks)
        else:  # device -> pinned host, written by a kernel (the rows are known on the device only) on
            # the side stream; the staging buffers are next overwritten after the next join_copies().
            # A piece shorter than exc_block_size (decoding, an eager prompt's last piece) makes fewer.
            self.stage_k[:most].copy_(k_blocks)
            self.stage_v[:most].copy_(v_blocks)
            self.stage_rows.fill_(-1)  # -1: nothing crosses PCIe
            self.stage_rows[:most].copy_(torch.where(j < n_new, rows, -1))
            self._start_write_back()
        self.reprs.index_copy_(0, rows, reprs)
        self.n += n_new

    def reserve(self, cap):
        """Room for cap units. Growing pinned storage is slow (allocation and a copy), so a prefill
        reserves what the prompt needs once, exactly (a million tokens of a 7B model fill most of a
        host's memory); growth beyond that, a token at a time, comes in steps of an eighth. The unit
        dimension is marked dynamic for torch.compile: a longer prompt reallocates, and must not compile anew."""
        if cap <= self.capacity:
            return
        self._reallocate(grown_units(self.capacity, cap))

    def place(self, on_device: bool):
        """Store the units in GPU memory (on_device) or in pinned host memory from now on, moving those
        already stored (unit_storage=auto: see storage.place_units)."""
        if self.device.type == "cuda" and on_device == self.host_pinned:
            self.host_pinned = not on_device
            self._reallocate(self.capacity)

    def _reallocate(self, cap):
        """New storage for cap units where host_pinned says, the units stored so far copied into it."""
        if self.device.type == "cuda":  # pending writes into the old storage, on both streams
            torch.cuda.current_stream(self.device).synchronize()
            self.loader.synchronize()
        n = max(self.capacity, 0)
        to_gpu = self.storage_k.device.type == "cpu" and self.device.type == "cuda" and not self.host_pinned
        for i, name in enumerate(("storage_k", "storage_v")):  # one at a time: the old one goes before the next
            new, self.locked[i] = self._new_storage(cap + 1)
            if to_gpu:  # from pinned host memory: CUDA refuses one copy across slices locked apart, so the
                # GPU reads the stored units as it loads them, before the old storage is unlocked
                rows = torch.arange(self.count, device=self.device)
                gather_from_host(getattr(self, name), rows, new, rows)
                torch.cuda.current_stream(self.device).synchronize()
            else:
                new[:n] = getattr(self, name)[:n]
            setattr(self, name, new)
            if self.host_pinned and n:  # the rows kept: the GPU may read them at once
                lock_rows(new, 0, n, self.locked[i], fresh=False)
        self.pinned = n if self.host_pinned else 0
        self.reprs = torch.cat([self.reprs[:n], self.reprs.new_zeros(cap + 1 - n, self.reprs.shape[1])])
        self.unit_slot = torch.cat([self.unit_slot[:n], self.unit_slot.new_full((cap + 1 - n,), -1)])
        if self.fp8:
            self.scales = torch.cat([self.scales[:n], self.scales.new_zeros(cap + 1 - n, *self.scales.shape[1:])])
        for t in (self.storage_k, self.storage_v, self.reprs, self.unit_slot) + ((self.scales,) if self.fp8 else ()):
            if self.compiled:
                torch._dynamo.mark_dynamic(t, 0)
        self.version += 1

    SLICE = 32 << 20  # bytes of each host tensor page-locked at a time, at least

    def pin(self, rows):
        """On a GPU, make rows [0, rows) of the host storage readable and writable by the GPU (page-locked
        and mapped) before any work that may touch them is queued. Locking the storage of a long prompt all
        at once held its first piece up by seconds; locked a slice at a time just ahead of the pieces, it
        costs the GPU nothing: cudaHostRegister does not wait for the GPU, and the host queues pieces ahead
        of it (docs/benchmarks.md)."""
        if not self.host_pinned or rows <= self.pinned:
            return
        row_bytes = self.storage_k[0].numel() * self.storage_k.element_size()
        rows = min(max(rows, self.pinned + -(-self.SLICE // row_bytes)), self.storage_k.shape[0])
        for t, locked in zip((self.storage_k, self.storage_v), self.locked):
            lock_rows(t, self.pinned, rows, locked)  # rows never written: touched first
        self.pinned = rows

    def lookup(self, q_mem, real):
        """The units this piece attends to: topk by representative score over its real queries (every
        unit while there are no more than topk), loaded into device slots. Returns (units, valid, slots),
        topk each: with fewer than topk units stored (or no real query), the entries past them are not valid.
        Tensor parallel: this process holds the units of its own key-value heads, and scores them with its
        query heads' share of the representative keys and of the queries; the processes add their partial
        sums before the top-k, so that every process selects the units one process would."""
        scores = self.over_heads(self.ops.unit_scores(q_mem, real, self.reprs, self.n))
        if self.last is not None:
            self.last.update(queries=q_mem, scores=scores)  # [Hq, T, D], [rows]
        units, valid = self.ops.select_top(scores, self.cfg.topk, self.n, real, self.lookups)
        return units, valid, self.fetch(units, valid)

    def fetch(self, units, valid=None):
        """Bring the selected units into device slots (the LRU: ops.lru_fetch), starting the copies of the
        missing ones. Returns their slots."""
        if valid is None:
            valid = torch.ones_like(units, dtype=torch.bool)
        slots = self.ops.lru_fetch(units, valid, self.unit_slot, self.slot_unit, self.slot_used, self.clock,
                                   self.hits, self.misses, self.load_units, self.load_slots, self.AGE)
        self._load()
        return slots

    def _load(self):
        """pool[load_slots[i]] = storage[load_units[i]] where load_slots[i] >= 0 (the misses)."""
        if self.device.type != "cuda":  # CPU: storage and pool are both plain buffers (not `loader is None`:
            # a CUDA stream object traced through the compiled step crashes dynamo, see below)
            d = torch.where(self.load_slots >= 0, self.load_slots, self.pool_k.shape[0] - 1)  # hits: the scratch slot
            self.pool_k[d] = self.storage_k[self.load_units]
            self.pool_v[d] = self.storage_v[self.load_units]
        else:  # GPU: a kernel reads the storage rows directly, pinned host memory over PCIe or GPU memory
            # (no host sync, no staging copy)
            self._start_loads()

    def snapshot(self, storage=True):
        """The units' counters and (storage=True) the stored units themselves: views, not copies, to be
        written out at once. A unit never changes once stored and later ones go after it, so a rewind
        in this process needs the counters only."""
        s = {name: getattr(self, name).clone() for name in ("n", "lookups", "hits", "misses")}
        if storage:
            n = self.count
            if self.loader is not None:  # write-backs of the last units still on their way
                torch.cuda.synchronize(self.device)
            s |= {name: getattr(self, name)[:n] for name in self.stored_names()}
        return s

    def stored_names(self):
        """The tensors a snapshot holds per unit."""
        return ("storage_k", "storage_v", "reprs") + (("scales",) if self.fp8 else ())

    def restore(self, s):
        """Back to a snapshot. The device pool starts empty: the slots may hold units made after the
        snapshot, and which units sit there changes speed, never outputs."""
        if self.loader is not None:
            torch.cuda.synchronize(self.device)
        n = int(s["n"])
        if "storage_k" in s:
            names = self.stored_names()
            for name in names:
                if name not in s or s[name].shape[1:] != getattr(self, name).shape[1:] or len(s[name]) != n:
                    raise ValueError(f"saved units {name!r} do not fit this model and these settings")
            self.reserve(n)
            self.pin(n)  # before the rows are written: pin clears the rows it locks
            for name in names:
                getattr(self, name)[:n] = s[name]
        elif n > self.capacity:
            raise ValueError("a rewind cannot bring back units this storage never held")
        for name in ("n", "lookups", "hits", "misses"):
            getattr(self, name).copy_(s[name])
        for t, v in ((self.clock, 0), (self.unit_slot, -1), (self.slot_unit, -1), (self.slot_used, -1)):
            t.fill_(v)

    # The side stream is used only in the three methods below, which torch.compile leaves as they are: a
    # CUDA stream object traced through the compiled piece step crashed dynamo.

    @outside_compile
    def _start_loads(self):
        gather_from_host((self.storage_k, self.storage_v), self.load_units, (self.pool_k, self.pool_v), self.load_slots,
                         self.loader)

    @outside_compile
    def _start_write_back(self):
        scatter_to_host((self.stage_k, self.stage_v), (self.storage_k, self.storage_v), self.stage_rows, self.loader)

    @outside_compile
    def join_copies(self):
        """Work queued after this waits for the unit copies queued so far on the side stream: before the
        pool is read (the selected units are in their slots), and at the end of a layer's forward."""
        if self.loader is not None:
            join(self.loader)

    def cached_units(self):
        """Units in the pool, least recently used first (for tests and inspection)."""
        S = self.cfg.max_cached_block
        order = (self.slot_used[:S] * self.AGE + self.slot_unit[:S]).argsort()
        order = order[self.slot_unit[order] >= 0]
        return self.slot_unit[order].tolist()


class FixedShapeMemory:
    """InfLLM's context memory for one layer (batch size 1), in fixed shapes.

    Tokens not yet in init or a unit ("recent": the local window plus the far remainder, fewer than
    block_size tokens waiting to fill a unit) sit in a ring buffer at slot position % ring size, keys
    unrotated. The prompt arrives in pieces of exc_block_size queries (one when decoding), the last
    one padded; how many of a piece's queries are real is a device count, and so is everything a piece
    decides (tokens moved to init, new units: a fixed most of each, the rest masked). So the work of
    a piece has one shape whatever the prompt: two compiled programs (a piece, a decoding step) and two
    CUDA graphs serve every prompt. The host keeps one counter, the tokens fed, to size the storage."""

    use_units = True

    def __init__(self, rope, cfg: InfLLMConfig, n_heads, n_kv_heads, head_dim, device=None, dtype=None,
                 kernel="blocked", parallel=False):
        self.rope, self.cfg = rope, cfg.check()
        # "plain" is the specification; each kernel comes as the local part and the memory part.
        self.attend_local, self.attend_memory = CHUNK_ATTENTION[kernel]
        # "compiled": the whole piece step goes through torch.compile, which fuses its few hundred small
        # kernels (ring writes, rotations, masks, lookup, LRU, retirement, attention) into a few dozen.
        # "flex" is compiled on a GPU only: inductor's CPU FlexAttention has no log-sum-exp output yet, so
        # there it runs unfused (same results, for the tests).
        # The compiled step is one function for every layer, called with the layer: a compiled bound method
        # kept on self would tie self to itself, and its pinned storage would wait for the cycle collector.
        gpu = torch.device(device or "cpu").type == "cuda"
        is_compiled = kernel == "compiled" or (kernel == "flex" and gpu)
        self.step = _compiled_step() if is_compiled else type(self)._attend_piece
        self.pad = is_compiled  # a compiled step pads the last piece (one shape); eager, padding is wasted work
        self.n_heads = n_heads
        # A piece arrives while up to n_local + block_size - 1 recent tokens wait: room for both.
        self.ring = cfg.n_local + cfg.block_size + cfg.exc_block_size
        self.ring_k = torch.zeros(n_kv_heads, self.ring, head_dim, device=device, dtype=dtype)
        self.ring_v = torch.zeros_like(self.ring_k)
        # The same keys rotated once, at their absolute positions, for the local part: its queries are
        # rotated at theirs, and attention sees only the distance between the two, the same as at the
        # window positions of the reference. So the window is neither gathered nor re-rotated per piece.
        self.ring_kr = torch.zeros_like(self.ring_k)
        self.ring_score = torch.zeros(n_heads, self.ring, device=device)  # local score per query head, fp32
        # The position each slot holds (-1: none, or padding), kept rather than derived from pos by a
        # remainder, which the compiled mask would recompute for every (query, slot) pair.
        self.ring_pos = torch.full((self.ring,), -1, dtype=torch.long, device=device)
        # Init tokens, and one scratch column for the masked moves of a piece.
        self.init_k = torch.zeros(n_kv_heads, cfg.n_init + 1, head_dim, device=device, dtype=dtype)
        self.init_v = torch.zeros_like(self.init_k)
        # pos: tokens seen; start: position of the oldest recent token; n_init: init tokens held.
        self.pos_d, self.start_d, self.n_init_d = (torch.zeros((), dtype=torch.long, device=device) for _ in range(3))
        self.pos = 0  # tokens seen, on the host: it sizes the unit storage
        # The memory part's queries always sit at n_local - 1: their rotation is computed once, here.
        self.memory_angles = rope.angles(torch.tensor([cfg.n_local - 1], device=device), self.ring_k.dtype)
        # The bookkeeping of a piece: on an eager GPU in Triton kernels (a few instead of some 150 tiny PyTorch
        # ones), else their PyTorch specifications ("plain" runs those on a GPU too). Compiled, inductor fuses
        # the specifications itself; float64 (the tests' oracle) stays in PyTorch, as in engine/layers.py.
        fast = gpu and not is_compiled and kernel != "plain" and self.ring_k.dtype != torch.float64 \
            and bk.triton is not None
        self.ops = pick_ops(fast, cfg, self.use_units)
        self.units = (MemoryUnits(cfg, n_heads, n_kv_heads, head_dim, device, dtype, parallel, compiled=is_compiled,
                                  ops=self.ops) if self.use_units else None)
        self.trace = None  # set to a list to record every piece's selected units (tests, inspection)

    def reserve(self, n_tokens):
        """Prepare the unit storage for a sequence of n_tokens."""
        if self.use_units:
            self.units.reserve(n_tokens // self.cfg.block_size + 1)

    def pin(self, n_tokens):
        """Make the unit storage that a sequence of n_tokens can touch ready for the GPU: called before a
        forward up to n_tokens is queued (the units of n tokens are fewer than n // block_size + 1)."""
        if self.use_units:
            self.units.pin(n_tokens // self.cfg.block_size + 1)

    def reset(self):
        """Start a new sequence in the same buffers."""
        self.pos = 0
        for t in (self.pos_d, self.start_d, self.n_init_d):
            t.zero_()
        self.ring_pos.fill_(-1)
        if self.use_units:
            self.units.reset()

    def stats(self) -> dict:
        """Units stored, lookups, and the device pool's hits and misses (host syncs)."""
        u = self.units
        return {"units": u.count, "lookups": int(u.lookups), "hits": int(u.hits), "misses": int(u.misses)}

    # The recent tokens a snapshot holds, each from its ring buffer: in the reference's names (infllm.py), and
    # the keys rotated at their positions beside them (recent_kr), kept rather than rotated anew on restore.
    RECENT = {"recent_k": "ring_k", "recent_kr": "ring_kr", "recent_v": "ring_v", "recent_score": "ring_score"}
    COUNTERS = ("pos_d", "start_d", "n_init_d")

    def _recent_slots(self, start, count):
        """The ring slots of the count recent tokens from position start (a device count), oldest first."""
        return (start + torch.arange(count, device=self.ring_pos.device)) % self.ring

    def snapshot(self, storage=True):
        """Everything that decides what this cache does next, as tensors, and only what the sequence filled: the
        recent tokens (window and far remainder) taken out of the ring in the order of their positions, the init
        tokens held, the counters and the memory units. The rest of the buffers decides nothing (slots of tokens
        that left the ring are read only under a mask that hides them; the scratch column), so a snapshot grows
        with the sequence, not with the buffers (the ring alone holds n_local + block_size + exc_block_size tokens).
        storage=False leaves out the units' K/V and representative keys, which a rewind in the same process
        keeps (see MemoryUnits.snapshot). A host sync: how many tokens are held only the device knows."""
        start, pos, held = (int(getattr(self, name)) for name in ("start_d", "pos_d", "n_init_d"))
        slots = self._recent_slots(self.start_d, pos - start)
        s = {name: getattr(self, ring).index_select(1, slots) for name, ring in self.RECENT.items()}  # copies
        s |= {"init_k": self.init_k[:, :held].clone(), "init_v": self.init_v[:, :held].clone()}
        s |= {name: getattr(self, name).clone() for name in self.COUNTERS}
        if self.use_units:
            s |= {"units." + k: v for k, v in self.units.snapshot(storage).items()}
        return s

    def restore(self, s):
        """Back to a snapshot, in the same buffers (captured CUDA graphs stay valid): each recent token into the
        ring slot of its position (position % ring size, as ring_write puts it), every other slot marked empty as
        reset marks it; the init tokens into the first columns."""
        for name in (*self.RECENT, "init_k", "init_v", *self.COUNTERS):
            if name not in s:
                raise ValueError(f"the snapshot lacks {name!r}")
        start, pos, held = (int(s[name]) for name in ("start_d", "pos_d", "n_init_d"))
        count = pos - start
        if not 0 <= count <= self.cfg.n_local + self.cfg.block_size - 1 or not 0 <= held <= self.cfg.n_init:
            raise ValueError(f"saved counters (pos {pos}, start {start}, init {held}) do not fit these settings")
        Hkv, _, D = self.ring_k.shape
        want = {"recent_k": (Hkv, count, D), "recent_kr": (Hkv, count, D), "recent_v": (Hkv, count, D),
                "recent_score": (self.n_heads, count), "init_k": (Hkv, held, D), "init_v": (Hkv, held, D)}
        for name, shape in want.items():
            if tuple(s[name].shape) != shape:
                raise ValueError(f"saved {name!r} has shape {tuple(s[name].shape)}, this model and these "
                                 f"settings expect {shape}")
        for name in self.COUNTERS:
            getattr(self, name).copy_(s[name])
        self.pos = pos
        slots = self._recent_slots(self.start_d, count)
        self.ring_pos.fill_(-1)
        self.ring_pos.index_copy_(0, slots, self.start_d + torch.arange(count, device=slots.device))
        for name, ring in self.RECENT.items():
            buf = getattr(self, ring)
            buf.index_copy_(1, slots, s[name].to(buf.device, buf.dtype))
        self.init_k[:, :held], self.init_v[:, :held] = s["init_k"], s["init_v"]
        if self.use_units:
            self.units.restore({k.removeprefix("units."): v for k, v in s.items() if k.startswith("units.")})

    def attend(self, q, k, v, n_valid=None):
        """q, k, v [1, H, T, D] (q, k unrotated) -> the attention output [1, Hq, T, D]. With n_valid (a
        device count) only the first n_valid tokens are real and the rest padding, and the caller keeps
        the host's count (CUDA graph replay); without it all T are real."""
        if q.shape[0] != 1:
            raise ValueError(f"InfLLM context memory holds one sequence; got batch size {q.shape[0]}")
        T = q.shape[2]
        if n_valid is None:
            self.reserve(self.pos + T)
            self.pin(self.pos + T)
            self.pos += T
            n_valid = torch.full((), T, dtype=torch.long, device=q.device)
        P = 1 if T == 1 else self.cfg.exc_block_size  # a decoding step, or pieces of the prompt
        outs = []
        for s in range(0, T, P):
            piece = [x[0, :, s:s + P] for x in (q, k, v)]
            if self.pad and piece[0].shape[1] < P:  # the last piece, padded: every piece has one shape
                piece = [F.pad(x, (0, 0, 0, P - x.shape[1])) for x in piece]
            n = n_valid if T <= P else (n_valid - s).clamp(0, P)  # one piece: 0 <= n_valid <= T <= P already
            out, chosen = self.step(self, *piece, n)
            if self.trace is not None and self.use_units and (chosen >= 0).any():
                self.trace.append(chosen[chosen >= 0].tolist())
            outs.append(out)
        if self.use_units:
            self.units.join_copies()  # the last write-back: a CUDA graph must end with its streams joined
        return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1))[None, :, :T]

    def _attend_piece(self, q, k, v, n):
        """One piece of P queries [Hq, P, D], the first n (a device count) real: attend, then update the
        memory. Device work only, of one shape for every piece: it reads no host counter. Returns the
        output and the selected units (-1 where none, and all -1 without units). A piece with no real
        token (n = 0) changes nothing a later piece reads: it writes only ring slots it marks empty,
        selects and loads no unit, and retires nothing (only the LRU clock ticks)."""
        ops, P = self.ops, q.shape[1]
        at, real, at_angles = ops.piece_angles(self.pos_d, n, P, self.rope, k.dtype)
        ops.ring_write(k, v, *at_angles, at, real, self.ring_k, self.ring_kr, self.ring_v, self.ring_score, self.ring_pos)

        # Memory part: all its keys at position 0 and the queries at n_local - 1. The lookup comes
        # first, so that the selected units load from host memory while the local part is computed.
        q_mem = self.rope(q, angles=self.memory_angles)
        selected = self._select(q_mem, real)

        # Local part: each query sees the n_local tokens up to itself. The ring is read in place, in
        # slot order (attention does not depend on the order of its keys), its slots' positions
        # telling which keys a query sees. Padding queries see nothing and add to no local score.
        mask_local = ops.window_mask(self.ring_pos, at, real, self.cfg.n_local)
        local = self.attend_local(self.rope(q, angles=at_angles), self.ring_kr, self.ring_v, mask_local)

        k_mem, v_mem, mask_mem, chosen = self._memory(at, real, selected)
        out, col_sums = self.attend_memory(local, q_mem, k_mem, v_mem, mask_mem)
        self.ring_score += col_sums
        self.pos_d += n
        self._retire(P)
        return out, chosen

    def _select(self, q_mem, real):
        """The lookup: (units, valid, slots) of the topk units for this piece, their loads started."""
        return self.units.lookup(q_mem, real)

    def _memory(self, at, real, selected):
        """Keys, values and mask of the memory part (ops.memory_part): selected units, init tokens, and the far
        remainder. (The authors' code lets each chunk see its whole far remainder, some of it also through
        the window; the difference is a few tokens per query.)"""
        units, valid, slots = selected
        u = self.units
        u.join_copies()  # the selected units are in their slots
        return self.ops.memory_part(u.pool_k, u.pool_v, units, slots, valid, self.init_k, self.init_v, self.n_init_d,
                                    self.ring_k, self.ring_v, self.start_d, at, real, self.cfg.n_local, u.scales)

    def _retire(self, P):
        """Tokens that left the window fill init, then units (ops.retire); a piece of P queries moves at most
        min(n_init, P) tokens to init and makes at most new_units_most units."""
        cfg = self.cfg
        self.ops.retire(self.ring_k, self.ring_v, self.ring_score, self.init_k, self.init_v, self.pos_d, self.start_d,
                        self.n_init_d, self.units, cfg.n_local, cfg.block_size, cfg.repr_topk, min(cfg.n_init, P),
                        new_units_most(cfg, P))


class FixedShapeStream(FixedShapeMemory):
    """StreamingLLM / LM-Infinite: init tokens and the local window, positions as in InfLLM; tokens that
    leave the window after init is full are forgotten."""

    use_units = False

    def stats(self):
        return None

    def _select(self, q_mem, real):
        return None

    def _memory(self, at, real, selected):
        held = torch.arange(self.cfg.n_init + 1, device=self.init_k.device) < self.n_init_d
        return self.init_k, self.init_v, held[None, :] & real[:, None], torch.full((1,), -1, device=at.device)


@outside_compile  # a collective, called as it is from the compiled piece step
def sum_scores_over_processes(scores):
    torch.distributed.all_reduce(scores)
    return scores


@functools.cache
def _compiled_step():
    return compiled(FixedShapeMemory._attend_piece)
