"""Where the decoding step's replay spends the time no kernel runs: mistral-7b at LENGTH, the captured decoding
step replayed with every lookup a hit, traced by torch.profiler (CUPTI traces a graph's kernel nodes); idle time
charged to the kernel that ends it. python gaps.py SHAPE LENGTH"""
import sys, time, json, collections, os, tempfile
sys.path.insert(0, '.'); sys.path.insert(0, 'scripts')
import torch
from torch.profiler import profile, ProfilerActivity
from bench import SHAPES
from model import random_model
from infllm import InfLLMConfig, make_caches
from generate import FixedShapes, prefill, gpu_matmuls

shape, L = sys.argv[1], int(sys.argv[2])
dev = torch.device('cuda')
gpu_matmuls(torch.bfloat16)
m = random_model(SHAPES[shape], device=dev, dtype=torch.bfloat16)
caches = make_caches(m, 'infllm', InfLLMConfig(), 'triton')
fwd = FixedShapes(m, caches)
ids = torch.randint(0, m.args.vocab_size, (L,)).tolist()
prefill(m, caches, ids, 8192, forward=fwd, room=64)
torch.cuda.synchronize()
print('graphs:', list(fwd.graphs), flush=True)
g = fwd.graphs[(1, False)][0]
for _ in range(5): g.replay()
torch.cuda.synchronize(); t0 = time.perf_counter()
for _ in range(20): g.replay()
torch.cuda.synchronize(); print(f'replay {(time.perf_counter() - t0) / 20 * 1e3:.3f} ms', flush=True)
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(3): g.replay()
    torch.cuda.synchronize()
path = os.path.join(tempfile.mkdtemp(), 't.json')
prof.export_chrome_trace(path)
ev = [e for e in json.load(open(path))['traceEvents'] if e.get('cat') in ('kernel', 'gpu_memcpy', 'gpu_memset')]
ev.sort(key=lambda e: e['ts'])
print(f'{len(ev)} GPU events in 3 replays', flush=True)
per = len(ev) // 3
one = ev[per:2 * per]  # the middle replay
streams = collections.Counter(e['args'].get('stream') for e in one)
print('events by stream:', dict(streams))
span = one[-1]['ts'] + one[-1]['dur'] - one[0]['ts']
busy_end, busy, idle_before = one[0]['ts'], 0.0, collections.defaultdict(lambda: [0, 0.0])
for e in one:
    s, t = e['ts'], e['ts'] + e['dur']
    if s > busy_end:
        idle_before[e['name'][:60]][0] += 1
        idle_before[e['name'][:60]][1] += s - busy_end
    busy += max(0.0, t - max(s, busy_end))
    busy_end = max(busy_end, t)
kt = sum(e['dur'] for e in one)
print(f'one replay: span {span/1e3:.2f} ms, some kernel running {busy/1e3:.2f} ms, idle {(span-busy)/1e3:.2f} ms, summed kernel time {kt/1e3:.2f} ms, {len(one)} kernels')
print('idle time before each kernel, by kernel (top 20):')
for name, (n, t) in sorted(idle_before.items(), key=lambda x: -x[1][1])[:20]:
    print(f'  {t:8.1f} us  {n:4d}x  {t/max(n,1):6.2f} us each  {name}')
nl = m.args.n_layers
k = len(one) // nl
print(f'-- layer 2 in order (start offset us, duration us, stream):')
base = one[2 * k]['ts']
for e in one[2 * k: 3 * k + 2]:
    print(f'  {e["ts"]-base:8.1f} {e["dur"]:7.1f}  s{e["args"].get("stream")}  {e["name"][:70]}')
