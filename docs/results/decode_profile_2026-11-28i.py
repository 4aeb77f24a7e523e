"""A decoding step's kernels, from a CUPTI trace of replays of its CUDA graph (the next token chosen on the GPU).
python .stage14/decode_profile.py --shape mistral-7b [--share 2] [--infllm ...]
--share N: one tensor-parallel process's share of the model (heads, kv heads, MLP units / N) on one GPU, no all-reduce."""
import argparse, io, contextlib, os, collections, dataclasses, json, statistics, sys, time
from pathlib import Path
import torch
import os
ROOT = Path(os.environ.get("CODE") or Path(__file__).resolve().parents[1]).resolve()  # the code to measure
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from bench import SHAPES, parse_length  # noqa
from generate import decode, forward_fn, gpu_matmuls, prefill, use_compile_cache  # noqa
from infllm import InfLLMConfig, make_caches  # noqa
from model import random_model  # noqa

p = argparse.ArgumentParser()
p.add_argument("--shape", default="mistral-7b")
p.add_argument("--length", default="128K")
p.add_argument("--infllm", default="")
p.add_argument("--kernel", default="triton")
p.add_argument("--share", type=int, default=1)
p.add_argument("--steps", type=int, default=32)
p.add_argument("--profile", type=int, default=6)
p.add_argument("--top", type=int, default=30)
p.add_argument("--tp-path", action="store_true", help="with --share: the tensor-parallel code path (tp_size, a 1-process NCCL group)")
p.add_argument("--out", default=None)
a = p.parse_args()
dev = torch.device("cuda")
use_compile_cache()
gpu_matmuls(torch.bfloat16)
s = SHAPES[a.shape]
if a.share > 1:
    s = dataclasses.replace(s, n_heads=s.n_heads // a.share, n_kv_heads=s.n_kv_heads // a.share, ffn_dim=s.ffn_dim // a.share,
                            tp_size=a.share if a.tp_path else 1)
if a.tp_path:
    import os
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1"); os.environ.setdefault("MASTER_PORT", "29533")
    torch.cuda.set_device(dev if dev.index is not None else 0)
    torch.distributed.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
model = random_model(s, device=dev, dtype=torch.bfloat16, seed=0)
cfg = InfLLMConfig.parse(a.infllm)
caches = make_caches(model, "infllm", cfg, a.kernel)
fwd = forward_fn(model, caches, graphs=True)
n = parse_length(a.length)
ids = torch.randint(0, model.args.vocab_size, (n,), generator=torch.Generator().manual_seed(0)).tolist()
logits = prefill(model, caches, ids, cfg.chunk_size, forward=fwd, room=8 * a.steps + 64)
torch.cuda.synchronize(); t0 = time.perf_counter()
new = decode(model, caches, logits, a.steps + 1, forward=fwd)
torch.cuda.synchronize()
res = {"shape": a.shape, "share": a.share, "tp_path": a.tp_path, "code": str(ROOT), "infllm": a.infllm, "decode_ms": round(1e3 * (time.perf_counter() - t0) / a.steps, 3)}
graph, out = fwd.graphs[(1, False)]
tok_in = fwd.inputs[(1, False)][0]

def steps(k):
    for _ in range(k):
        tok_in.copy_(out[0, -1].argmax().view(1, 1))
        for c in caches:
            c.pos += 1
            c.pin(c.pos + 1)
        graph.replay()

m0 = sum(int(c.units.misses) for c in caches)
torch.cuda.synchronize(); t0 = time.perf_counter()
steps(a.steps)
torch.cuda.synchronize()
res["pipelined_ms"] = round(1e3 * (time.perf_counter() - t0) / a.steps, 3)
res["misses_per_layer"] = round((sum(int(c.units.misses) for c in caches) - m0) / a.steps / len(caches), 2)
from torch.profiler import ProfilerActivity, profile
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    steps(a.profile)
    torch.cuda.synchronize()
trace = Path("/tmp/trace.json")
prof.export_chrome_trace(str(trace))
ev = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
L, K = len(caches), a.profile
t_first, t_last = min(e["ts"] for e in ev), max(e["ts"] + e["dur"] for e in ev)
res["traced_step_ms"] = round((t_last - t_first) / K / 1e3, 3)
by_stream = collections.defaultdict(list)
for e in ev:
    by_stream[e["args"].get("stream", e.get("tid"))].append(e)
streams = {}
for st, es in by_stream.items():
    es.sort(key=lambda e: e["ts"])
    busy, end = 0.0, -1e18
    for e in es:
        s0, s1 = max(e["ts"], end), e["ts"] + e["dur"]
        if s1 > s0:
            busy += s1 - s0
        end = max(end, s1)
    streams[str(st)] = (round(len(es) / K, 1), round(busy / K / 1e3, 3))
main_st = max(streams, key=lambda k: streams[k][0])
res["main_stream_busy_ms"] = streams[main_st][1]
res["other_streams_busy_ms"] = round(sum(v[1] for k, v in streams.items() if k != main_st), 3)
# the union over all streams: time some kernel runs
allv = sorted(ev, key=lambda e: e["ts"]); busy, end = 0.0, -1e18
for e in allv:
    s0, s1 = max(e["ts"], end), e["ts"] + e["dur"]
    if s1 > s0:
        busy += s1 - s0
    end = max(end, s1)
res["any_kernel_busy_ms_per_step"] = round(busy / K / 1e3, 3)
print(json.dumps(res), flush=True)
agg = collections.defaultdict(lambda: [0, 0.0])
for e in ev:
    g = agg[e["name"][:90]]; g[0] += 1; g[1] += e["dur"]
print(f"{'us/layer':>9} {'calls/layer':>11} {'us/call':>8}  kernel")
for name, (c, d) in sorted(agg.items(), key=lambda x: -x[1][1])[:a.top]:
    print(f"{d / K / L:9.1f} {c / K / L:11.2f} {d / c:8.1f}  {name}")
print(f"{'':9} {sum(c for c, _ in agg.values()) / K / L:11.2f} kernels a layer in all", flush=True)
