"""A decoding step's attention with its local column sums (kernels.chunk_attention_triton), and piece_angles with the
two rotations, at mistral-7b's decoding shapes (whole, and one process's half under tensor parallel): us a call from
a CUDA graph of 200 calls. Run in the tree to measure: cd TREE && python decode_attention_2026-11-29.py"""
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
L, M, D = 4096 + 128 + 512, 16 * 128 + 129 + 128, 128  # the ring; units, init and far remainder
for Hkv in (8, 4):
    Hq = 4 * Hkv
    r = lambda *s: torch.randn(*s, device=dev, dtype=bf, generator=g)  # noqa: E731
    mask_local = (torch.arange(L, device=dev) < 4096)[None]
    mask_mem = (torch.arange(M, device=dev) < M - 100)[None]
    args = (r(Hq, 1, D), r(Hkv, L, D), r(Hkv, L, D), mask_local, r(Hq, 1, D), r(Hkv, M, D), r(Hkv, M, D), mask_mem)
    print(f"attention + column sums, {Hq} heads: {us(lambda: kernels.chunk_attention_triton(*args)):.2f} us", flush=True)
inv = 1.0 / (1e6 ** (torch.arange(0, D, 2, device=dev).float() / D))
pos_d, n = torch.tensor(131072, device=dev), torch.tensor(1, device=dev)
print(f"piece_angles, one position: {us(lambda: kernels.piece_angles(pos_d, n, 1, inv, bf)):.2f} us", flush=True)
_, _, (c, s) = kernels.piece_angles(pos_d, n, 1, inv, bf)
q = torch.randn(1, 16, 1, D, device=dev, dtype=bf)
print(f"rotate, 16 heads, one position: {us(lambda: kernels.rotate(q.reshape(-1, 1, D), c, s)):.2f} us", flush=True)
