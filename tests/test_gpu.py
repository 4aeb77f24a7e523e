"""The GPU fast path against the plain path on the GPU (skipped where there is no CUDA device)."""
import pytest
import torch

from infllm import InfLLMConfig, make_caches, memory_stats
from model import ModelArgs, random_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SMALL = InfLLMConfig(n_init=4, n_local=64, block_size=8, repr_topk=4, topk=3, max_cached_block=4,
                     exc_block_size=16, chunk_size=48)
ARGS = ModelArgs(vocab_size=211, dim=128, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=16, ffn_dim=256)


def run(model, caches, tokens, chunk, n_decode):
    outs = []
    with torch.no_grad():
        for s in range(0, tokens.shape[1] - n_decode, chunk):
            outs.append(model(tokens[:, s:min(s + chunk, tokens.shape[1] - n_decode)], caches))
        for t in range(tokens.shape[1] - n_decode, tokens.shape[1]):
            outs.append(model(tokens[:, t:t + 1], caches))
    return torch.cat(outs, dim=1)


def test_gather_from_host_reads_pinned_rows():
    import kernels
    src = torch.randn(20, 3, 8, 5).pin_memory()
    dst = torch.zeros(6, 3, 8, 5, device="cuda")
    rows = torch.tensor([4, 19, 0, 7], device="cuda")
    dst_rows = torch.tensor([2, -1, 5, 0], device="cuda")
    kernels.gather_from_host(src, rows, dst, dst_rows)
    expect = torch.zeros(6, 3, 8, 5)
    expect[2], expect[5], expect[0] = src[4], src[0], src[7]
    assert torch.equal(dst.cpu(), expect)


@pytest.mark.parametrize("kernel", ["blocked", "compiled", "flex"])
def test_fast_path_equals_plain_path(kernel):
    cpu_model = random_model(ARGS, device="cpu", dtype=torch.float32, seed=0)
    model = random_model(ARGS, device="cpu", dtype=torch.float32, seed=0).cuda()
    tokens = torch.randint(0, ARGS.vocab_size, (1, 400), device="cuda")
    plain = make_caches(model, "infllm", SMALL, kernel="plain")
    fast = make_caches(model, "infllm", SMALL, kernel=kernel)
    for c in plain + fast:
        c.trace = []
    a, b = run(model, plain, tokens, SMALL.chunk_size, 20), run(model, fast, tokens, SMALL.chunk_size, 20)
    assert (a - b).abs().max() < 1e-3
    assert [c.trace for c in plain] == [c.trace for c in fast]
    assert memory_stats(plain) == memory_stats(fast) and memory_stats(fast)["misses"] > 0
    # and the same as on the CPU, the reference machine
    cpu = make_caches(cpu_model, "infllm", SMALL, kernel="plain")
    c = run(cpu_model, cpu, tokens.cpu(), SMALL.chunk_size, 20)
    assert (a.cpu() - c).abs().max() < 1e-3


def test_bf16_fast_path_close_to_fp32_plain():
    model32 = random_model(ARGS, device="cpu", dtype=torch.float32, seed=0).cuda()
    model16 = random_model(ARGS, device="cpu", dtype=torch.float32, seed=0).to("cuda", torch.bfloat16)
    tokens = torch.randint(0, ARGS.vocab_size, (1, 300), device="cuda")
    a = run(model32, make_caches(model32, "infllm", SMALL, kernel="plain"), tokens, SMALL.chunk_size, 10)
    b = run(model16, make_caches(model16, "infllm", SMALL, kernel="compiled"), tokens, SMALL.chunk_size, 10)
    assert (a - b).abs().max() < 0.1 * a.abs().max()


@pytest.mark.parametrize("attention, kernel", [("infllm", "compiled"), ("infllm", "flex"), ("stream", "compiled")])
def test_cuda_graphs_replay_the_same_forward(attention, kernel):
    """Chunks replayed from CUDA graphs give the logits, selections and statistics of running them, over
    several prompts in the same caches (reset between them) so that every kind of chunk is replayed."""
    from generate import forward_fn
    model = random_model(ARGS, device="cpu", dtype=torch.float32, seed=0).cuda()
    eager, graphed = make_caches(model, attention, SMALL, kernel), make_caches(model, attention, SMALL, kernel)
    graphs = forward_fn(model, graphed, graphs=True)
    for seed in range(3):
        torch.manual_seed(seed)
        tokens = torch.randint(0, ARGS.vocab_size, (1, 400), device="cuda")
        outs = {}
        for name, caches, fwd in (("eager", eager, forward_fn(model, eager)), ("graphs", graphed, graphs)):
            for c in caches:
                c.reset()
            with torch.no_grad():
                o = [fwd(tokens[:, s:s + 48]).clone() for s in range(0, 380, 48)]
                o += [fwd(tokens[:, t:t + 1]).clone() for t in range(380, 400)]
            outs[name] = torch.cat(o, dim=1)
        assert (outs["eager"] - outs["graphs"]).abs().max() < 1e-4
        assert memory_stats(eager) == memory_stats(graphed)
        assert [c.host_state() for c in eager] == [c.host_state() for c in graphed]
    assert len(graphs.graphs) >= 3  # prefill, decode, and decode that makes a unit (or drops a block)


def test_pinned_storage_is_mapped_for_the_gpu():
    import kernels
    src = kernels.pinned_empty((7, 2, 4, 3), torch.bfloat16)
    src.copy_(torch.randn(7, 2, 4, 3))
    dst = torch.zeros(3, 2, 4, 3, device="cuda", dtype=torch.bfloat16)
    kernels.gather_from_host(src, torch.tensor([6, 1, 3], device="cuda"), dst, torch.tensor([0, 2, -1], device="cuda"))
    assert torch.equal(dst[0].cpu(), src[6]) and torch.equal(dst[2].cpu(), src[1]) and not dst[1].any()
    back = torch.randn(2, 2, 4, 3, device="cuda").to(torch.bfloat16)
    kernels.scatter_to_host(back, src, torch.tensor([4, 0], device="cuda"))
    torch.cuda.synchronize()
    assert torch.equal(src[4], back[0].cpu()) and torch.equal(src[0], back[1].cpu())
