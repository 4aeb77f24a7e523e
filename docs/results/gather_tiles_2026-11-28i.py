"""The unit copy over PCIe (kernels._gather_kernel) alone: 16 mistral-7b units (K and V, 256 KB each, or 128 KB for one
process's half) from pinned host rows into device slots, by programs per unit and block size."""
import sys, torch, random
sys.path.insert(0, ".")
import kernels
for heads in (8, 4):
    U = 1025
    host = [torch.empty(U, heads, 128, 128, dtype=torch.bfloat16, pin_memory=True) for _ in range(2)]
    for h in host:
        h.normal_()
    pool = [torch.zeros(33, heads, 128, 128, dtype=torch.bfloat16, device="cuda") for _ in range(2)]
    sets = [torch.tensor(random.Random(i).sample(range(U - 1), 16), device="cuda") for i in range(64)]
    dst = torch.arange(16, device="cuda")
    nbytes = 2 * 16 * host[0][0].numel() * 2
    for split in (1, 2, 4, 8, 16, 32):
        for BLOCK in (2048, 4096, 8192):
            run = lambda r: kernels._gather_kernel[(16, split, 2)](host[0].data_ptr(), host[1].data_ptr(), r, pool[0], pool[1], dst,
                                                                   host[0][0].numel(), BLOCK=BLOCK, SPLIT=split)
            run(sets[0]); torch.cuda.synchronize()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for r in sets:
                run(r)
            e1.record(); torch.cuda.synchronize()
            us = e0.elapsed_time(e1) * 1e3 / len(sets)
            print(f"heads {heads} programs/unit/tensor {split:2d} BLOCK {BLOCK:5d}: {us:7.1f} us, {nbytes / us / 1e3:5.1f} GB/s", flush=True)
    ok = all(torch.equal(pool[k][:16].cpu(), host[k][sets[-1].cpu()]) for k in range(2))
    print("copied right:", ok)
