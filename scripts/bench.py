"""Speed and memory of prefill and decoding on random weights (speed does not depend on the values).

    python scripts/bench.py --shape mistral-7b --lengths 32K,128K --decode 64 [--attention infllm|full|stream]
                            [--repeats N] [--json] [--device cuda] [--kernel blocked|plain|compiled|flex|reference] [--graphs]
                            [--cold | --compile-cache DIR]

Reports per length: prefill tokens/s, decode tokens/s, peak GPU GiB, peak host RSS GiB and the
unit-cache hit rate, each the median over the repeats (the steady state), and beside them what a user's
first prompt costs: run 1's prefill seconds (compilation and CUDA graph capture included) and the
seconds from the process's start to the end of that prefill. --cold points the compile caches at an
empty temporary folder (a fresh machine); by default they are generate.py's (a warm machine). --kernel picks
the engine's chunk attention (engine.attention.CHUNK_ATTENTION), or the reference (infllm.py, generate.py
--engine reference) with "reference".
"""
import time

STARTED = time.time()  # the process's start, near enough: before torch is imported

import argparse
import gc
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import engine  # noqa: E402
import engine.storage  # noqa: E402
import infllm  # noqa: E402
from engine.attention import CHUNK_ATTENTION  # noqa: E402
from engine.graphs import forward_fn  # noqa: E402
from infllm import InfLLMConfig, memory_stats  # noqa: E402
from model import DTYPES, ModelArgs, random_model  # noqa: E402
from reader import (UsageError, decode, free_gpu_memory, gpu_matmuls, peak_rss_gib, pick_device,  # noqa: E402
                    plain_forward, prefill, use_compile_cache)
from tp import join_processes, leave_processes, tensor_parallel  # noqa: E402

SHAPES = {  # ../shared/BENCHMARKS.md
    "mistral-7b": ModelArgs(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                            ffn_dim=14336, rope_base=1e6, max_seq_len=32768),
    "llama-3-8b": ModelArgs(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                            ffn_dim=14336, rope_base=5e5, max_seq_len=8192),
    "llama-3.2-1b": ModelArgs(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
                              ffn_dim=8192, rope_base=5e5, max_seq_len=131072, tie_embeddings=True),
    "smollm2-135m": ModelArgs(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
                              ffn_dim=1536, rope_base=1e5, max_seq_len=8192, tie_embeddings=True),
    "llama-3-70b": ModelArgs(vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, head_dim=128,
                             ffn_dim=28672, rope_base=5e5, max_seq_len=8192),
    "tiny": ModelArgs(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128),
}


def parse_length(s: str) -> int:
    s = s.strip().upper()
    try:
        return int(float(s[:-1]) * 1024) if s.endswith("K") else int(float(s[:-1]) * 2**20) if s.endswith("M") else int(s)
    except ValueError:
        raise UsageError(f"cannot read the length {s!r} (write e.g. 32K, 1M or 5000)") from None


def measure(model, caches, forward, chunk, length, n_decode, device, seed):
    """One prefill of `length` random tokens and n_decode greedy steps; seconds and memory."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.args.vocab_size, (length,), generator=g).tolist()
    for c in caches:
        c.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    logits = prefill(model, caches, ids, chunk, forward=forward, room=n_decode)
    sync()
    t1 = time.perf_counter()
    since_start = time.time() - STARTED
    new = decode(model, caches, logits, n_decode, forward=forward)
    sync()
    t2 = time.perf_counter()
    return {
        "prefill_tok_s": length / (t1 - t0),
        "prefill_s": t1 - t0,
        "since_start_s": since_start,
        "decode_tok_s": (len(new) - 1) / (t2 - t1) if len(new) > 1 else None,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "hit_rate": memory_stats(caches)["hit_rate"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=list(SHAPES), default="smollm2-135m")
    p.add_argument("--lengths", default="32K")
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--attention", choices=["infllm", "full", "stream"], default="infllm")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None)
    p.add_argument("--infllm", default="", help="InfLLM settings key=value,...")
    p.add_argument("--kernel", choices=[*CHUNK_ATTENTION, "reference"], default="blocked",
                   help="the engine's chunk attention, or the reference's caches and forward")
    p.add_argument("--graphs", action="store_true", help="replay the forward from CUDA graphs (GPU, infllm/stream)")
    p.add_argument("--wavefront", type=int, default=None, metavar="N",
                   help="with --graphs: run prompts of N pieces or more as a wavefront over the layers (0: never; default: FixedShapes')")
    p.add_argument("--chunk", type=int, default=None, help="prefill chunk (default: chunk_size of the InfLLM settings)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="also print where a prefill's last 8K tokens and 16 decoding steps spend their time")
    p.add_argument("--cold", action="store_true", help="compile with empty caches, as on a fresh machine")
    p.add_argument("--compile-cache", metavar="DIR", default=None, help="compile caches (default: generate.py's)")
    args = p.parse_args(argv)
    try:
        rank, world, device = join_processes(args.device)  # under torchrun: tensor parallel
        device = device or pick_device(args.device)
        shape = tensor_parallel(SHAPES[args.shape], world)
        lengths = [parse_length(s) for s in args.lengths.split(",")]
        cfg = InfLLMConfig.parse(args.infllm)
        if args.decode < 2 or args.repeats < 1:
            raise UsageError("--decode must be at least 2 and --repeats at least 1")
        if args.kernel == "reference" and args.graphs:
            raise UsageError("CUDA graphs run in the engine only: drop --graphs or pick an engine --kernel")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    cache = use_compile_cache(tempfile.mkdtemp(prefix="infllm-cold-") if args.cold else args.compile_cache)
    if device.type == "cuda":
        gpu_matmuls(dtype)
    model = random_model(shape, device=device, dtype=dtype, seed=rank)
    if args.kernel != "reference":
        engine.accelerate(model)  # the engine's forwards, as generate.py --engine fast runs them
    if args.kernel in ("compiled", "flex"):
        engine.compile_blocks(model)  # as generate.py --compile does
    rows = []
    for n in lengths:
        caches = forward = None  # before the next length's storage is allocated
        caches, forward = setup(model, args.attention, cfg, args.kernel, args.graphs, args.wavefront)
        # unit_storage=auto: the units in GPU memory where this length's memory fits (generate.py's choice too)
        units_on_gpu = (device.type == "cuda" and args.kernel != "reference" and
                        engine.storage.place_units(caches, model.args, cfg, n + args.decode, free_gpu_memory(device)))
        runs = [measure(model, caches, forward, args.chunk or cfg.chunk_size, n, args.decode, device, seed=r) for r in range(args.repeats)]
        med = lambda k: statistics.median(r[k] for r in runs) if runs[0][k] is not None else None  # noqa: E731
        row = {"shape": args.shape, "attention": args.attention, "length": n, "repeats": args.repeats,
               "prefill_tok_s": med("prefill_tok_s"), "decode_tok_s": med("decode_tok_s"),
               "prefill_tok_s_all": [round(r["prefill_tok_s"], 1) for r in runs],
               "decode_tok_s_all": [round(r["decode_tok_s"], 2) for r in runs],
               "peak_gpu_gib": max(r["peak_gpu_gib"] for r in runs) if device.type == "cuda" else None,
               "peak_rss_gib": peak_rss_gib(), "hit_rate": med("hit_rate"), "units_on_gpu": units_on_gpu,
               # the first prompt as a user meets it: compilation and graph capture included
               "first_prefill_s": round(runs[0]["prefill_s"], 3), "first_since_start_s": round(runs[0]["since_start_s"], 3),
               "wavefront": getattr(forward, "wavefront", None),
               # of the first prefill: forwards run for the first time and captured (compilation included)
               "first_warmup_s": round(forward.warmup_s, 3) if hasattr(forward, "warmup_s") else None,
               "compile_cache": str(cache) + (" (cold)" if args.cold else ""),
               "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": str(dtype)}
        rows.append(row)
        row["processes"] = world
        if world > 1:  # the peaks of every process, for the host's total
            mine = torch.tensor([row["peak_gpu_gib"] or 0.0, row["peak_rss_gib"]], device=device)
            peaks = [torch.empty_like(mine) for _ in range(world)]
            torch.distributed.all_gather(peaks, mine)
            row["peak_gpu_gib_all"], row["peak_rss_gib_all"] = [[round(float(p[i]), 3) for p in peaks] for i in (0, 1)]
        if rank:
            continue
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            gpu = f"{row['peak_gpu_gib']:.1f} GiB" if row["peak_gpu_gib"] is not None else "-"
            hit = f"{row['hit_rate']:.1%}" if row["hit_rate"] is not None else "-"
            print(f"{args.shape} {args.attention} {n:>8} tokens: prefill {row['prefill_tok_s']:9.0f} tok/s, "
                  f"decode {row['decode_tok_s']:7.2f} tok/s, peak GPU {gpu}, peak RSS {row['peak_rss_gib']:.1f} GiB, "
                  f"unit-cache hit rate {hit}; first prompt: prefill {row['first_prefill_s']:.1f} s, "
                  f"{row['first_since_start_s']:.1f} s after the process started", flush=True)
    if args.profile:  # the last length again, in the warm caches (compiled, graphs captured); every process
        # takes part (their all-reduces meet), process 0 prints
        profile(model, caches, forward, args.chunk or cfg.chunk_size, lengths[-1], device, show=rank == 0)
    caches = forward = None  # their CUDA graphs go before the process group
    leave_processes()
    return 0


def setup(model, attention, cfg, kernel, graphs, wavefront=None):
    """Caches kept over the repeats (reset between them), so CUDA graphs captured in one are replayed
    in the next, as they are for every prompt after the first in a long-running process."""
    gc.collect()  # whatever of the last length's caches only cycles still hold: free before allocating anew
    if kernel == "reference":
        caches = infllm.make_caches(model, attention, cfg)
        return caches, plain_forward(model, caches)
    caches = engine.make_caches(model, attention, cfg, kernel)
    return caches, forward_fn(model, caches, graphs=graphs, wavefront=wavefront)


def profile(model, caches, forward, chunk, length, device, tail=8192, show=True):
    """The operators that take the time of a prefill's last `tail` tokens, then of 16 decoding steps
    (torch.profiler). The tokens before them are fed unprofiled: a trace of every kernel of a long prompt
    (millions with the wavefront) takes the profiler longer to digest than the run."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    ids = torch.randint(0, model.args.vocab_size, (length,), generator=torch.Generator().manual_seed(0)).tolist()
    head, tail = ids[:-tail], ids[-tail:]
    for c in caches:
        c.reset()
    if head:
        prefill(model, caches, head, chunk, forward=forward, room=len(tail) + 16)
    for name, work in ((f"prefill of the last {len(tail)} tokens", lambda: prefill(model, caches, tail, chunk, forward=forward, room=16)),
                       ("16 decoding steps", lambda: decode(model, caches, logits, 16, forward=forward))):
        with torch_profile(activities=acts) as prof:
            logits = work()
            if device.type == "cuda":
                torch.cuda.synchronize()
        if show:
            print(f"== {name} ==\n" + prof.key_averages().table(sort_by=key, row_limit=40), flush=True)


if __name__ == "__main__":
    sys.exit(main())
