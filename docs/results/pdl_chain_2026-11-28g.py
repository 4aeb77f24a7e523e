"""Does programmatic dependent launch (PDL) shorten a chain of small dependent kernels in a CUDA graph?
900 tiny Triton kernels in order, without and with PDL (gdc_wait first); then the same with a cuBLAS
matrix-vector product every third kernel, as a decoding step has."""
import time, torch, triton, triton.language as tl

@triton.jit
def step(x, y, n, GDC: tl.constexpr, BLOCK: tl.constexpr):
    if GDC:
        tl.extra.cuda.gdc_wait()  # the previous kernel's writes are visible after this
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x + i, mask=i < n)
    if GDC:
        tl.extra.cuda.gdc_launch_dependents()
    tl.store(y + i, v * 0.5 + 1.0, mask=i < n)

dev = "cuda"
a, b = torch.randn(4096, device=dev), torch.empty(4096, device=dev)
w = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
xb = torch.randn(1, 4096, device=dev, dtype=torch.bfloat16)

def chain(pdl, matvec):
    def run():
        x, y = a, b
        for k in range(900):
            if matvec and k % 3 == 0:
                torch.mm(xb, w, out=xb2)
            kw = dict(launch_pdl=True) if pdl else {}
            step[(4,)](x, y, 4096, GDC=pdl, BLOCK=1024, **kw)
            x, y = y, x
    return run
xb2 = torch.empty_like(xb)
for matvec in (False, True):
    for pdl in (False, True):
        try:
            run = chain(pdl, matvec)
            run(); torch.cuda.synchronize()
            ref = a.clone()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                run()
            g.replay(); torch.cuda.synchronize()
            ts = []
            for _ in range(7):
                t0 = time.perf_counter(); [g.replay() for _ in range(10)]; torch.cuda.synchronize()
                ts.append((time.perf_counter() - t0) / 10)
            ts.sort()
            print(f"matvec={matvec} pdl={pdl}: {ts[3]*1e3:.3f} ms per replay ({ts[3]/900*1e6:.2f} us per small kernel)", flush=True)
        except Exception as e:
            print(f"matvec={matvec} pdl={pdl}: failed {type(e).__name__}: {str(e)[:200]}", flush=True)
# correctness: PDL chain equals the plain chain
a0 = a.clone(); chain(False, False)(); r1 = a.clone(); a.copy_(a0); chain(True, False)(); torch.cuda.synchronize()
print("PDL chain equals plain chain:", torch.equal(r1, a), flush=True)
print(triton.__version__, torch.__version__, torch.version.cuda)
