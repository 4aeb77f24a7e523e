"""One decoding step's matrix products (a single row times a bf16 weight) by several PyTorch calls, each timed
as a CUDA graph of 50 calls (median of 7 replays): which call reads the weight fastest."""
import statistics, torch, json
import torch.nn.functional as F
dev = "cuda"
def timed(fn, reps=50):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3): fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps): fn()
    ts = []
    for _ in range(7):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b) * 1000 / reps)
    return statistics.median(ts)
for tf32 in (True,):
  torch.backends.cuda.matmul.allow_tf32 = tf32
  for name, (N, K) in {"qkv mistral": (6144, 4096), "o mistral": (4096, 4096), "gate_up mistral": (28672, 4096), "down mistral": (4096, 14336),
                      "o half": (4096, 2048), "qkv half": (3072, 4096), "gate_up half": (14336, 4096), "down half": (4096, 7168)}.items():
    ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) for _ in range(8)]  # 8 weights in turn: no L2 reuse
    x = torch.randn(1, 1, K, device=dev, dtype=torch.bfloat16)
    x2 = torch.randn(1, 2, K, device=dev, dtype=torch.bfloat16)
    i = [0]
    def nxt():
        i[0] = (i[0] + 1) % 8; return ws[i[0]]
    out = {}
    out["linear"] = timed(lambda: F.linear(x, nxt()))
    out["mv"] = timed(lambda: torch.mv(nxt(), x[0, 0]))
    out["W@xT"] = timed(lambda: nxt() @ x[0, 0, :, None])
    out["linear 2 rows"] = timed(lambda: F.linear(x2, nxt()))
    ref = F.linear(x, ws[0]); assert torch.allclose(torch.mv(ws[0], x[0,0]), ref[0,0], atol=1e-1, rtol=1e-2)
    gb = N * K * 2 / 1e9
    print(json.dumps({"shape": name, "N": N, "K": K} | {k: round(v, 2) for k, v in out.items()} | {k + " TB/s": round(gb / v * 1e6 / 1e3, 2) for k, v in out.items()}))
