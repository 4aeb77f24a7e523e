"""Where a decoding step's wall time goes beyond its CUDA graph: per-token host sync and launch, unit misses.
python .stage14/decode_gap.py --shape mistral-7b --length 128K [--infllm max_cached_block=1100]"""
import argparse, json, statistics, sys, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench import SHAPES, parse_length  # noqa
from generate import decode, forward_fn, gpu_matmuls, prefill, use_compile_cache  # noqa
from infllm import InfLLMConfig, make_caches, memory_stats  # noqa
from model import random_model  # noqa

p = argparse.ArgumentParser()
p.add_argument("--shape", default="mistral-7b")
p.add_argument("--length", default="128K")
p.add_argument("--infllm", default="")
p.add_argument("--kernel", default="triton")
p.add_argument("--steps", type=int, default=48)
p.add_argument("--share", type=int, default=1)
p.add_argument("--tp-path", action="store_true")
a = p.parse_args()
dev = torch.device("cuda")
use_compile_cache()
gpu_matmuls(torch.bfloat16)
import dataclasses, os
s = SHAPES[a.shape]
if a.share > 1:
    s = dataclasses.replace(s, n_heads=s.n_heads // a.share, n_kv_heads=s.n_kv_heads // a.share, ffn_dim=s.ffn_dim // a.share,
                            tp_size=a.share if a.tp_path else 1)
if a.tp_path:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1"); os.environ.setdefault("MASTER_PORT", "29533")
    torch.cuda.set_device(0)
    torch.distributed.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
model = random_model(s, device=dev, dtype=torch.bfloat16, seed=0)
cfg = InfLLMConfig.parse(a.infllm)
caches = make_caches(model, "infllm", cfg, a.kernel)
fwd = forward_fn(model, caches, graphs=True)
n = parse_length(a.length)
ids = torch.randint(0, model.args.vocab_size, (n,), generator=torch.Generator().manual_seed(0)).tolist()
room = 6 * a.steps + 64
t0 = time.perf_counter()
logits = prefill(model, caches, ids, cfg.chunk_size, forward=fwd, room=room)
torch.cuda.synchronize()
pre = time.perf_counter() - t0
decode(model, caches, logits, 4, forward=fwd)  # the decoding graph captured
torch.cuda.synchronize()
res = {"share": a.share, "tp_path": a.tp_path, "shape": a.shape, "length": n, "infllm": a.infllm, "prefill_s": round(pre, 3)}

def counters():
    h = sum(int(c.units.hits) for c in caches); m = sum(int(c.units.misses) for c in caches)
    return h, m

# A: decode() as users run it
h0, m0 = counters()
torch.cuda.synchronize(); t0 = time.perf_counter()
new = decode(model, caches, logits, a.steps + 1, forward=fwd)
torch.cuda.synchronize(); dt = time.perf_counter() - t0
h1, m1 = counters()
res["decode_ms"] = round(1e3 * dt / (len(new) - 1), 3)
torch.cuda.synchronize(); t0 = time.perf_counter()
new2 = decode(model, caches, logits, a.steps + 1, forward=fwd)
torch.cuda.synchronize(); res["decode_again_ms"] = round(1e3 * (time.perf_counter() - t0) / (len(new2) - 1), 3)
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
    decode(model, caches, logits, 9, forward=fwd)
    torch.cuda.synchronize()
prof.export_chrome_trace(os.environ.get("OUT", "/tmp") + f"/decode_trace_share{a.share}.json")
res["misses_per_token_per_layer"] = round((m1 - m0) / (len(new) - 1) / len(caches), 2)
res["hits_per_token_per_layer"] = round((h1 - h0) / (len(new) - 1) / len(caches), 2)

# B: the same loop, instrumented: host seconds in sample (waits for the GPU), in the forward call, GPU span
key = (1, False)
graph, out = fwd.graphs[key]
tok_in = fwd.inputs[key][0]
samp, call, gpu = [], [], []
lg = out[0, -1]
for _ in range(a.steps):
    t0 = time.perf_counter()
    tok = int(lg.argmax())
    t1 = time.perf_counter()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    lg = fwd(torch.tensor([[tok]], device=dev))[0, -1]
    e1.record()
    t2 = time.perf_counter()
    samp.append(t1 - t0); call.append(t2 - t1); gpu.append((e0, e1))
torch.cuda.synchronize()
res["host_sample_ms"] = round(1e3 * statistics.median(samp), 3)
res["host_forward_call_ms"] = round(1e3 * statistics.median(call), 3)
res["gpu_event_span_ms"] = round(statistics.median(e0.elapsed_time(e1) for e0, e1 in gpu), 3)

# C: the host time of graph.replay() alone, and D: replays back to back, the next token chosen on the GPU
reps = []
torch.cuda.synchronize()
t0 = time.perf_counter()
for _ in range(a.steps):
    tok_in.copy_(out[0, -1].argmax().view(1, 1))
    for c in caches:
        c.pos += 1
        c.pin(c.pos + 1)
    r0 = time.perf_counter()
    graph.replay()
    reps.append(time.perf_counter() - r0)
t_host = time.perf_counter() - t0
torch.cuda.synchronize()
dt = time.perf_counter() - t0
res["replay_call_ms"] = round(1e3 * statistics.median(reps), 3)
res["pipelined_ms"] = round(1e3 * dt / a.steps, 3)
res["pipelined_host_ms"] = round(1e3 * t_host / a.steps, 3)
res["pipelined_tok_s"] = round(a.steps / dt, 1)
res["decode_tok_s"] = round(1e3 / res["decode_ms"], 1)
res["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
print(json.dumps(res), flush=True)
