"""Each hand-written Triton kernel of engine/ against its PyTorch specification under torch.compile (GPU only).

    python scripts/kernel_bench.py [--shape mistral-7b] [--tokens 128K] [--layers 2] [--reps 200]
                                   [--unit-storage device|host] [--out kernels.jsonl] [--table kernels.md]

The shapes and state are a real run's: a model of the shape's layers (random weights; --layers of them, as
every layer has the same shapes) reads --tokens random tokens through the engine's eager GPU path, and the
arguments of every kernel's call are recorded in the last prefill piece (512 queries) and in a decoding step
(1 query). On those arguments, each kernel and its specification compiled (engine.storage.compiled: dynamic=False,
as the compiled piece step compiles) are timed
  - replayed in a CUDA graph (as the engine runs both: the GPU's time, no launch cost), and called eagerly;
  - cold: the first call with empty compile caches (Triton's JIT for the kernel, dynamo and inductor for the
    specification), and for the specification also warm (compiled again in this process with inductor's cache
    filled: what a second fresh process pays);
each timed call starts from the recorded state (its tensors copied back, the copy's own time subtracted).
The verdict follows issue 34's rule (verdict()): a kernel stays where it is at least 1.2x faster than the
compiled specification on a piece or a decoding step, where no PyTorch operation can do its job without a host
sync, or where compiling its specification costs a fresh process (one --tokens prompt and --decode new tokens,
all the shape's layers, a warm compile cache) more than the specification saves it; else the compiled
specification serves.
"""
import argparse
import json
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine  # noqa: E402
import kernels  # noqa: E402
import model as model_lib  # noqa: E402
from bench import SHAPES, parse_length  # noqa: E402
from engine import attention, layers  # noqa: E402
from engine.memory import SPEC, Ops  # noqa: E402
from engine.storage import compiled  # noqa: E402
from infllm import InfLLMConfig  # noqa: E402
from model import random_model  # noqa: E402
from reader import plain_forward, prefill, use_compile_cache  # noqa: E402


# ----------------------------------------------------------------------------- the specifications of the layer ops

def rope_angles_spec(pos, inv_freq, dtype):
    """layers.rope_angles' specification: model.Rotary.angles."""
    return model_lib.Rotary.angles(types.SimpleNamespace(inv_freq=inv_freq), pos, dtype)


def rms_norm_spec(x, weight, eps, add=None):
    """layers.rms_norm's specification: model.RMSNorm (after the residual sum with add)."""
    norm = types.SimpleNamespace(weight=weight, eps=eps)
    if add is None:
        return model_lib.RMSNorm.forward(norm, x)
    total = x + add
    return total, model_lib.RMSNorm.forward(norm, total)


def silu_mul_spec(gate_up):
    """layers.silu_mul's specification: model.MLP's product."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def two_part_spec(*args):
    """The eager GPU path's chunk attention (attention.chunk_attention_triton) against FlexAttention, compiled:
    the compiled path's pair (kernels.flex_local_part, then the memory part with the plain column sums)."""
    return kernels.flex_memory_part(kernels.flex_local_part(*args[:4]), *args[4:],
                                    column_sums=kernels.local_column_sums)


# name -> (module that holds the kernel as a global its callers look up, kernel, specification)
LAYER_OPS = {"rope_angles": (layers, layers.rope_angles, rope_angles_spec),
             "rotate": (layers, layers.rotate, layers.rotate_spec),
             "rms_norm": (layers, layers.rms_norm, rms_norm_spec),
             "silu_mul": (layers, layers.silu_mul, silu_mul_spec),
             "column_sums": (attention, attention.column_sums, kernels.local_column_sums)}
# The bookkeeping kernels come from the Ops table (engine/memory.py); the two-part attention is recorded at its
# launch (_two_part_attention) and timed as a whole (chunk_attention_triton: with its column sums).
SPECS = {name: getattr(SPEC, name) for name in Ops.__dataclass_fields__} | {
    name: spec for name, (_, _, spec) in LAYER_OPS.items()} | {"two_part_attention": two_part_spec}
# Host copies: by device-side row indices from (to) host memory. No PyTorch operation reads host memory at
# indices held on the device without a sync, so these stay whatever they cost.
HOST_COPIES = ("gather_from_host", "scatter_to_host")


# ----------------------------------------------------------------------------- recording the calls of a real run

class Recorder:
    """Wraps kernels so that, while armed, each call's arguments are kept (cloned: the state goes on changing),
    the last call of each (kernel, phase) winning; and times each kernel's first call (Triton's JIT, cold)."""

    def __init__(self):
        self.calls, self.first_s, self.phase, self.armed = {}, {}, "piece", False

    def wrap(self, name, fn):
        def call(*args, **kwargs):
            if self.armed:  # the function that ran (a spec where the engine picked one: pick_ops) and its inputs
                self.calls[(name, self.phase)] = (fn, clone(args), clone(kwargs))
            if (name, self.phase) not in self.first_s:
                sync()
                t0 = time.perf_counter()
                out = fn(*args, **kwargs)
                sync()
                self.first_s[(name, self.phase)] = time.perf_counter() - t0
                return out
            return fn(*args, **kwargs)
        return call


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def clone(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, (tuple, list)):
        return type(x)(clone(y) for y in x)
    if isinstance(x, dict):
        return {k: clone(v) for k, v in x.items()}
    return x  # modules, the memory units (retire's; restored by their tensors), numbers, dtypes


def tensors_of(x, out):
    """Every tensor in x (arguments, and the device tensors of an object such as MemoryUnits)."""
    if isinstance(x, torch.Tensor):
        out.append(x)
    elif isinstance(x, (tuple, list)):
        for y in x:
            tensors_of(y, out)
    elif isinstance(x, dict):
        for y in x.values():
            tensors_of(y, out)
    elif hasattr(x, "__dict__") and not isinstance(x, (torch.nn.Module, type)) and not callable(x):
        # an object's tensors on its device (MemoryUnits: not the unit storage in host memory)
        tensors_of({k: v for k, v in vars(x).items()
                    if not isinstance(v, torch.Tensor) or v.device == getattr(x, "device", v.device)}, out)
    return out


def record(args, cfg, tokens, device, seed=0):
    """Read tokens through a random model of args on the engine's eager path (the GPU's: Triton kernels; a CPU
    runs the specs), recording the calls."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    m = engine.accelerate(random_model(args, device=device, dtype=dtype, seed=seed))
    caches = engine.make_caches(m, "infllm", cfg, kernel="triton")
    rec = Recorder()
    originals = {name: getattr(mod, name) for name, (mod, _, _) in LAYER_OPS.items()}
    two_part = attention._two_part_attention
    for name, (mod, kernel, _) in LAYER_OPS.items():
        setattr(mod, name, rec.wrap(name, kernel))
    attention._two_part_attention = rec.wrap("two_part_attention", two_part)
    for c in caches:
        c.ops = c.units.ops = Ops(**{f: rec.wrap(f, getattr(c.ops, f)) for f in Ops.__dataclass_fields__})
    try:
        forward = plain_forward(m, caches)
        ids = torch.randint(0, args.vocab_size, (tokens,), generator=torch.Generator().manual_seed(seed)).tolist()
        P = cfg.exc_block_size
        with torch.no_grad():
            prefill(m, caches, ids[:-P], cfg.chunk_size, forward=forward, room=P + 8)
            rec.armed = True  # the last piece, then a decoding step
            forward(torch.tensor([ids[-P:]], device=device), last_only=True)
            rec.phase = "step"
            forward(torch.tensor([[ids[-1]]], device=device))
        sync()
    finally:
        for name, (mod, _, _) in LAYER_OPS.items():
            setattr(mod, name, originals[name])
        attention._two_part_attention = two_part
    return rec, caches, m


# ----------------------------------------------------------------------------- timing

def timed_graph(fn, restore, reps):
    """Milliseconds a replay of fn, captured in a CUDA graph after restore (restore's own replay subtracted);
    None where fn cannot be captured (a host sync), or without a GPU."""
    if not torch.cuda.is_available():
        return None
    def ms(graph):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        graph.replay()
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                restore()
                fn()
        torch.cuda.current_stream().wait_stream(side)
        g, g0 = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            restore()
            fn()
        with torch.cuda.graph(g0):
            restore()
        return max(ms(g) - ms(g0), 0.0)
    except Exception as e:  # noqa: BLE001 (any failure to capture is reported, not fatal)
        torch.cuda.synchronize()
        print(f"    (no CUDA graph: {type(e).__name__}: {str(e).splitlines()[0][:120]})", file=sys.stderr)
        return None


def timed_eager(fn, restore, reps):
    """Milliseconds a call, launched from Python (restore's own time subtracted)."""
    def ms(body):
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            body()
        sync()
        return (time.perf_counter() - t0) * 1e3 / reps
    ms(lambda: (restore(), fn()))
    return max(ms(lambda: (restore(), fn())) - ms(restore), 0.0)


def first_call_s(fn, restore):
    restore()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def measure(name, phase, call, rec, reps):
    ran, args, kwargs = call
    # The unit storage (retire's, through the memory units) is written only past the units stored, whose count
    # is copied back: it is left as it is (hundreds of MB a copy would swamp the times).
    state = [t for t in tensors_of((args, kwargs), []) if t.numel() * t.element_size() < 64 << 20]
    pristine = [t.clone() for t in state]

    def restore():
        for t, p in zip(state, pristine):
            t.copy_(p)

    # the two-part attention was recorded at its launch: the whole chunk attention is timed on its arguments
    kernel, spec = (attention.chunk_attention_triton if name == "two_part_attention" else ran), SPECS[name]
    row = {"kernel": name, "step": phase}
    run = lambda f: (lambda: f(*args, **kwargs))  # noqa: E731
    row["kernel_graph_ms"] = timed_graph(run(kernel), restore, reps)
    row["kernel_eager_ms"] = timed_eager(run(kernel), restore, reps)
    row["kernel_cold_s"] = rec.first_s.get((name, phase))
    with torch.no_grad():
        c = compiled(spec)
        row["spec_cold_s"] = first_call_s(run(c), restore)
        torch._dynamo.reset()  # compile again: inductor's cache now holds the kernels (a warm fresh process)
        c = compiled(spec)
        row["spec_warm_s"] = first_call_s(run(c), restore)
        row["spec_graph_ms"] = timed_graph(run(c), restore, reps)
        row["spec_eager_ms"] = timed_eager(run(c), restore, reps)
        row["spec_uncompiled_graph_ms"] = timed_graph(run(spec), restore, reps)
    restore()
    return row


def verdict(rows, n_layers, pieces, steps):
    """Issue 34's rule for one kernel's rows (a piece and a decoding step): (verdict, seconds the kernel saves a
    fresh process, seconds its specification takes to compile in one with a warm cache). The fresh process
    reads one prompt of `pieces` pieces and decodes `steps` tokens, through n_layers layers. A kernel stays
    where it is at least 1.2x faster than its compiled specification on a piece or a decoding step, or where
    compiling the specification costs that fresh process more than the specification saves it (nothing, when
    it is slower); else the compiled specification serves."""
    by = {r["step"]: r for r in rows}
    best, saved_s = 0.0, 0.0
    for phase, count in (("piece", pieces), ("step", steps)):
        r = by.get(phase)
        if r is None:
            continue
        k = r["kernel_graph_ms"] if r["kernel_graph_ms"] is not None else r["kernel_eager_ms"]
        s = r["spec_graph_ms"] if r["spec_graph_ms"] is not None else r["spec_eager_ms"]
        r["speedup"] = s / k if k else None
        best = max(best, r["speedup"] or 0.0)
        saved_s += (s - k) * 1e-3 * count * n_layers
    compile_s = sum(r["spec_warm_s"] for r in rows)
    if best >= 1.2:
        return f"stays: {best:.2f}x its compiled spec", saved_s, compile_s
    if compile_s >= -saved_s:
        return (f"stays: {best:.2f}x its compiled spec, which would cost a fresh process {compile_s:.1f} s of "
                f"compiling to save it {max(-saved_s, 0.0):.2f} s"), saved_s, compile_s
    return f"goes: {best:.2f}x its compiled spec, which saves a fresh process {-saved_s:.1f} s", saved_s, compile_s


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="mistral-7b", choices=sorted(SHAPES))
    p.add_argument("--tokens", type=parse_length, default="128K")
    p.add_argument("--layers", type=int, default=2, help="layers run (all have the same shapes)")
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--unit-storage", default="device", choices=("device", "host"))
    p.add_argument("--decode", type=int, default=128, help="new tokens of the fresh process the verdict counts")
    p.add_argument("--only", default="", help="comma-separated kernel names")
    p.add_argument("--keep-caches", action="store_true", help="use the usual compile caches (not cold)")
    p.add_argument("--out", help="JSON lines, one a kernel and step")
    p.add_argument("--table", help="markdown table")
    a = p.parse_args(argv)
    # cold compile times: empty caches (Triton's and inductor's), unless --keep-caches (generate.py's)
    use_compile_cache(None if a.keep_caches else tempfile.mkdtemp(prefix="kernel_bench_"))
    full = SHAPES[a.shape]
    args = model_lib.ModelArgs(**{**vars(full), "n_layers": a.layers})
    cfg = InfLLMConfig(unit_storage=a.unit_storage)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # a CPU has no Triton: the specs stand in (a check)
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu (the specs as kernels: a check, no verdict)"
    print(f"{card}, torch {torch.__version__}, {a.shape} x {a.layers} layers, {a.tokens} tokens, "
          f"unit_storage={a.unit_storage}", file=sys.stderr)
    torch.compile(torch.neg)(torch.ones(2, device=device))  # the compiler's own start-up, paid once, not by a kernel
    rec, _, _ = record(args, cfg, a.tokens, device)
    only = set(filter(None, a.only.split(",")))
    rows = []
    for (name, phase), call in sorted(rec.calls.items()):
        if only and name not in only:
            continue
        print(f"  {name} ({phase})", file=sys.stderr)
        try:
            row = measure(name, phase, call, rec, a.reps)
        except Exception as e:  # noqa: BLE001 (one kernel's failure is reported; the others still run)
            print(f"    FAILED: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
            torch._dynamo.reset()
            continue
        row |= {"card": card, "shape": a.shape, "tokens": a.tokens,
                                                          "date": time.strftime("%Y-%m-%d")}
        rows.append(row)
        print("   ", json.dumps(row), file=sys.stderr)
        if a.out:  # row by row: a run cut short keeps what it measured
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    pieces, n_layers = -(-a.tokens // cfg.exc_block_size), full.n_layers
    lines = ["| kernel | step | kernel ms (graph / eager) | compiled spec ms (graph / eager) | spec uncompiled ms "
             "| kernel cold s | spec cold / warm s | verdict |", "|---" * 8 + "|"]
    for name in dict.fromkeys(r["kernel"] for r in rows):
        mine = [r for r in rows if r["kernel"] == name]
        why, saved_s, compile_s = verdict(mine, n_layers, pieces, a.decode)
        why = why if device == "cuda" else "none: a CPU (the specs stand in for the kernels)"
        for r in mine:
            r |= {"verdict": why, "fresh_process_saved_s": saved_s, "spec_compile_s": compile_s}
            f = lambda x, d=4: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
            lines.append(f"| {name} | {r['step']} | {f(r['kernel_graph_ms'])} / {f(r['kernel_eager_ms'])} "
                         f"| {f(r['spec_graph_ms'])} / {f(r['spec_eager_ms'])} | {f(r['spec_uncompiled_graph_ms'])} "
                         f"| {f(r['kernel_cold_s'], 2)} | {f(r['spec_cold_s'], 2)} / {f(r['spec_warm_s'], 2)} "
                         f"| {why} |")
    for name in HOST_COPIES:
        lines.append(f"| {name} | both | | | | | | stays: no PyTorch operation reads host memory at indices "
                     "held on the device without a host sync |")
    table = "\n".join(lines)
    print(table)
    if a.out:  # again, with the verdicts
        Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    if a.table:
        Path(a.table).write_text(f"{card}, {time.strftime('%Y-%m-%d')}, {a.shape} ({a.layers} layers run), "
                                 f"{a.tokens} tokens, unit_storage={a.unit_storage}\n\n{table}\n")


if __name__ == "__main__":
    main()
