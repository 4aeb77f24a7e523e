"""Microseconds of the lookup's kernels at decoding shapes, each from a CUDA graph of 200 calls."""
import sys, torch, triton
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
for rows in (129, 1025, 8193):
    s = torch.randn(rows, device=dev).masked_fill(torch.arange(rows, device=dev) >= rows - 1, float("-inf"))
    real, n, lk = torch.ones(1, dtype=torch.bool, device=dev), torch.tensor(rows - 1, device=dev), torch.zeros((), dtype=torch.long, device=dev)
    print(f"select_top rows {rows}: {us(lambda: kernels.select_top(s, 16, n, real, lk)):.2f} us", flush=True)
    for BI, BJ, w in ((64, 128, 4), (32, 128, 4), (64, 64, 4), (128, 64, 4), (32, 256, 4), (64, 128, 8), (16, 128, 2)):
        ch = torch.empty(rows, dtype=torch.int8, device=dev)
        t = us(lambda: kernels._rank_rows_kernel[(-(-rows // BI),)](s, ch, rows, K=16, BI=BI, BJ=BJ, num_warps=w))
        print(f"   rank BI {BI} BJ {BJ} warps {w}: {t:.2f} us", flush=True)
    for BR, w in ((1024, 4), (2048, 4), (512, 4), (1024, 8)):
        u = torch.empty(16, dtype=torch.long, device=dev); v = torch.empty(16, dtype=torch.bool, device=dev)
        t = us(lambda: kernels._list_chosen_kernel[(1,)](ch, real, n, lk, u, v, rows, 1, BR=BR, BT=1, num_warps=w))
        print(f"   list BR {BR} warps {w}: {t:.2f} us", flush=True)
for Hq, rows in ((32, 1025), (16, 1025), (32, 8193)):
    q = torch.randn(Hq, 1, 128, device=dev, dtype=torch.bfloat16)
    reprs = torch.randn(rows, Hq * 128, device=dev, dtype=torch.bfloat16)
    real, n = torch.ones(1, dtype=torch.bool, device=dev), torch.tensor(rows - 1, device=dev)
    print(f"unit_scores Hq {Hq} rows {rows}: {us(lambda: kernels.unit_scores(q, real, reprs, n)):.2f} us", flush=True)
    mean = torch.randn(Hq * 128, device=dev); sc = torch.empty(rows, device=dev)
    for BU, BK, w in ((16, 256, 4), (8, 256, 4), (4, 512, 4), (4, 256, 4), (2, 512, 4), (8, 512, 8), (1, 1024, 4)):
        t = us(lambda: kernels._unit_scores_kernel[(-(-rows // BU),)](reprs, mean, sc, n, rows, Hq * 128, BU=BU, BK=BK, num_warps=w))
        print(f"   scores BU {BU} BK {BK} warps {w}: {t:.2f} us", flush=True)
