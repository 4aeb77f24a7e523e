"""A decoding step's attention with its column sums (kernels.chunk_attention_triton) at mistral-7b's shapes (32 query
heads; 16, one process's half under tensor parallel; 8, a quarter), for the most key ranges (SPLIT_MOST) and the rows
per merge program (MERGE_ROWS_FEW), and a few tile settings: us a call from a CUDA graph of 200 calls. Run in the tree to measure;
it ran on the tree of e6740c1, whose attention kernel still had its SKIP option."""
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

dev, bf = "cuda", torch.bfloat16
g = torch.Generator(device=dev).manual_seed(0)
L, M, D = 4096 + 128 + 512, 16 * 128 + 129 + 128, 128
for Hkv in (8, 4, 2):
    Hq = 4 * Hkv
    r = lambda *s: torch.randn(*s, device=dev, dtype=bf, generator=g)  # noqa: E731
    mask_local = (torch.arange(L, device=dev) < 4096)[None]
    mask_mem = (torch.arange(M, device=dev) < M - 100)[None]
    args = (r(Hq, 1, D), r(Hkv, L, D), r(Hkv, L, D), mask_local, r(Hq, 1, D), r(Hkv, M, D), r(Hkv, M, D), mask_mem)
    ref = None
    for most in (32, 64):
        for below in (256, 512):
            for rows in (16, 4, 2):
                kernels.SPLIT_MOST, kernels.SPLIT_BELOW_FEW, kernels.MERGE_ROWS_FEW = most, below, rows
                out, col = kernels.chunk_attention_triton(*args)
                if ref is None:
                    ref = (out.float(), col)
                ok = torch.allclose(out.float(), ref[0], atol=2e-2) and torch.allclose(col, ref[1], atol=1e-4)
                t = us(lambda: kernels.chunk_attention_triton(*args))
                print(f"{Hq} heads, SPLIT_MOST {most}, SPLIT_BELOW_FEW {below}, merge rows {rows}: {t:.2f} us{'' if ok else ' MISMATCH'}", flush=True)
    few = dict(kernels.TWO_PART_CONFIG_FEW)
    for skip, stages, warps in ((False, 2, 4), (False, 3, 4), (True, 3, 4), (True, 2, 2)):
        for most in (32, 64):
            kernels.SPLIT_MOST, kernels.SPLIT_BELOW_FEW, kernels.MERGE_ROWS_FEW = most, 512, 2
            kernels.TWO_PART_CONFIG_FEW = dict(few, SKIP=skip, num_stages=stages, num_warps=warps)
            out, col = kernels.chunk_attention_triton(*args)
            ok = torch.allclose(out.float(), ref[0], atol=2e-2) and torch.allclose(col, ref[1], atol=1e-4)
            t = us(lambda: kernels.chunk_attention_triton(*args))
            print(f"{Hq} heads, SKIP {skip}, stages {stages}, warps {warps}, SPLIT_MOST {most}, below 512, merge rows 2: {t:.2f} us{'' if ok else ' MISMATCH'}", flush=True)
    kernels.TWO_PART_CONFIG_FEW = few
