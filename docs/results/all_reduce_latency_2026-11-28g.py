"""Latency of the decoding step's all-reduces (96 of [1, 4096] bf16 = 8 KB, as llama-3-8b's 32 layers x 3) on 2 GPUs:
NCCL against symmetric memory's one-shot all-reduce (P2P loads, no multicast), eager and in one CUDA graph."""
import os, time
import torch, torch.distributed as dist
dist.init_process_group("nccl")
rank, world = dist.get_rank(), dist.get_world_size()
torch.cuda.set_device(rank)
dev = torch.device("cuda", rank)
N, REPS = 96, 50
xs = [torch.randn(1, 4096, device=dev, dtype=torch.bfloat16) for _ in range(N)]

def timed(fn, label):
    fn(); torch.cuda.synchronize(); dist.barrier()
    ts = []
    for _ in range(5):
        torch.cuda.synchronize(); t0 = time.perf_counter()
        for _ in range(REPS): fn()
        torch.cuda.synchronize(); ts.append((time.perf_counter() - t0) / REPS)
    ts.sort()
    if rank == 0:
        print(f"{label}: {ts[2]*1e3:.3f} ms for {N} all-reduces ({ts[2]/N*1e6:.1f} us each), runs {[round(t*1e3,3) for t in ts]}", flush=True)

def graphed(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay

def nccl():
    for x in xs:
        dist.all_reduce(x)
timed(nccl, "NCCL eager")
timed(graphed(nccl), "NCCL in a CUDA graph")
def nccl_dep():  # dependent chain, as in the model: each all-reduce's input computed from the last's output
    y = xs[0]
    for x in xs:
        y = y * 0.5 + x
        dist.all_reduce(y)
timed(graphed(nccl_dep), "NCCL + one elementwise kernel each, in a CUDA graph")
try:
    import torch.distributed._symmetric_memory as symm_mem
    group = dist.group.WORLD.group_name
    buf = symm_mem.empty(1, 4096, device=dev, dtype=torch.bfloat16)
    symm_mem.rendezvous(buf, group)
    ref = xs[0].clone(); dist.all_reduce(ref)
    got = torch.ops.symm_mem.one_shot_all_reduce_copy(buf, xs[0], "sum", group)
    torch.cuda.synchronize()
    if rank == 0:
        print("one-shot equals NCCL:", torch.equal(got, ref), float((got.float() - ref.float()).abs().max()), flush=True)
    def one_shot():
        for x in xs:
            torch.ops.symm_mem.one_shot_all_reduce_copy(buf, x, "sum", group)
    timed(one_shot, "symm_mem one_shot_all_reduce_copy eager")
    timed(graphed(one_shot), "symm_mem one_shot_all_reduce_copy in a CUDA graph")
    def one_shot_dep():
        y = xs[0]
        for x in xs:
            y = torch.ops.symm_mem.one_shot_all_reduce_copy(buf, y * 0.5 + x, "sum", group)
    timed(graphed(one_shot_dep), "one-shot + one elementwise kernel each, in a CUDA graph")
except Exception as e:
    if rank == 0:
        print("symmetric memory failed:", type(e).__name__, str(e)[:300], flush=True)
dist.destroy_process_group()
