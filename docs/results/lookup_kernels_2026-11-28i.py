"""select_top and unit_scores at decoding shapes, us a call from a CUDA graph of 200 calls (run in the tree to measure)."""
import sys, torch
sys.path.insert(0, ".")
import kernels

def us(fn, n=200):
    fn(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            fn()
    g.replay(); torch.cuda.synchronize()
    ts = []
    for _ in range(5):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record(); g.replay(); e1.record(); torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1) * 1e3 / n)
    return sorted(ts)[2]

dev = "cuda"
for rows in (129, 1025, 8193, 16385):
    s = torch.randn(rows, device=dev).masked_fill(torch.arange(rows, device=dev) >= rows - 1, float("-inf"))
    real, n, lk = torch.ones(1, dtype=torch.bool, device=dev), torch.tensor(rows - 1, device=dev), torch.zeros((), dtype=torch.long, device=dev)
    print(f"select_top rows {rows}: {us(lambda: kernels.select_top(s, 16, n, real, lk)):.2f} us", flush=True)
for Hq, rows in ((32, 1025), (16, 1025), (32, 8193)):
    q = torch.randn(Hq, 1, 128, device=dev, dtype=torch.bfloat16)
    reprs = torch.randn(rows, Hq * 128, device=dev, dtype=torch.bfloat16)
    real, n = torch.ones(1, dtype=torch.bool, device=dev), torch.tensor(rows - 1, device=dev)
    print(f"unit_scores Hq {Hq} rows {rows}: {us(lambda: kernels.unit_scores(q, real, reprs, n)):.2f} us", flush=True)
