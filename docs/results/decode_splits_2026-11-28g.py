"""The decoding step's attention with more key ranges: kernels.SPLIT_BELOW 128 (now) against 256 (32 ranges a key
head instead of 16). mistral-7b, 32K prompt; the captured decoding step replayed; kernel times from its trace."""
import sys, time, json, collections, os, tempfile
sys.path.insert(0, '.'); sys.path.insert(0, 'scripts')
import torch
from torch.profiler import profile, ProfilerActivity
from bench import SHAPES
from model import random_model
from infllm import InfLLMConfig, make_caches
import kernels
from generate import FixedShapes, prefill, gpu_matmuls

dev = torch.device('cuda')
gpu_matmuls(torch.bfloat16)
m = random_model(SHAPES['mistral-7b'], device=dev, dtype=torch.bfloat16)
ids = torch.randint(0, m.args.vocab_size, (32768,), generator=torch.Generator().manual_seed(0)).tolist()
for below in (128, 256, 128, 256):
    kernels.SPLIT_BELOW = below  # since 38f8480 a decoding step reads SPLIT_BELOW_FEW instead
    caches = make_caches(m, 'infllm', InfLLMConfig(), 'triton')
    fwd = FixedShapes(m, caches)
    prefill(m, caches, ids, 8192, forward=fwd, room=64)
    g = fwd.graphs[(1, False)][0]
    for _ in range(5): g.replay()
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(20): g.replay()
    torch.cuda.synchronize(); ms = (time.perf_counter() - t0) / 20 * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        g.replay(); torch.cuda.synchronize()
    path = os.path.join(tempfile.mkdtemp(), 't.json'); prof.export_chrome_trace(path)
    ev = [e for e in json.load(open(path))['traceEvents'] if e.get('cat') == 'kernel']
    by = collections.defaultdict(list)
    for e in ev:
        by[e['name'][:40]].append(e['dur'])
    pick = {k: sum(v) / len(v) for k, v in by.items() if k.startswith(('_two_part', '_merge_ranges', '_column_sums'))}
    print(f'SPLIT_BELOW {below}: replay {ms:.3f} ms; per layer ' + ', '.join(f'{k} {v:.1f} us' for k, v in pick.items()), flush=True)
    del fwd, caches, g
    torch.cuda.empty_cache()
