"""The engine on a GPU (skipped where there is no CUDA device): each Triton kernel against its PyTorch
specification (hypothesis), and the engine's fast paths against its plain path ("plain": the specifications)
and against the CPU. tests/test_engine.py proves the plain path equal to the reference, infllm.py."""
import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from engine import accelerate, attention, bookkeeping, layers, make_caches, storage
from engine.attention import CHUNK_ATTENTION
from engine.graphs import FixedShapes, forward_fn
from engine.memory import SPEC, TRITON, MemoryUnits
from infllm import InfLLMConfig, memory_stats
from model import ModelArgs, random_model
from reader import decode, prefill
from test_kernels import window_case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SMALL = InfLLMConfig(n_init=4, n_local=64, block_size=8, repr_topk=4, topk=3, max_cached_block=4,
                     exc_block_size=16, chunk_size=48)
ARGS = ModelArgs(vocab_size=211, dim=128, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=16, ffn_dim=256)


def gpu_model(args=ARGS, seed=0, dtype=torch.float32):
    """A random model (made on the CPU: the same weights as cpu_model's) on the GPU, its forwards the engine's."""
    return accelerate(random_model(args, device="cpu", dtype=torch.float32, seed=seed).to("cuda", dtype))


def cpu_model(args=ARGS, seed=0):
    return random_model(args, device="cpu", dtype=torch.float32, seed=seed)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch. Dynamo keeps at most 8 graphs per function across the whole process,
    and this file compiles the piece step for many configurations: past that limit it would run the step
    uncompiled, FlexAttention included, inside a CUDA graph capture (a whole-file run once failed the flex
    wavefront test so, and every later test with a capture left open)."""
    import torch._dynamo
    torch._dynamo.reset()
    yield


def run(model, caches, tokens, chunk, n_decode):
    outs = []
    with torch.no_grad():
        for s in range(0, tokens.shape[1] - n_decode, chunk):
            outs.append(model(tokens[:, s:min(s + chunk, tokens.shape[1] - n_decode)], caches))
        for t in range(tokens.shape[1] - n_decode, tokens.shape[1]):
            outs.append(model(tokens[:, t:t + 1], caches))
    return torch.cat(outs, dim=1)


def test_gather_from_host_reads_pinned_rows():
    src = torch.randn(20, 3, 8, 5).pin_memory()
    dst = torch.zeros(6, 3, 8, 5, device="cuda")
    rows = torch.tensor([4, 19, 0, 7], device="cuda")
    dst_rows = torch.tensor([2, -1, 5, 0], device="cuda")
    storage.gather_from_host(src, rows, dst, dst_rows)
    expect = torch.zeros(6, 3, 8, 5)
    expect[2], expect[5], expect[0] = src[4], src[0], src[7]
    assert torch.equal(dst.cpu(), expect)


@pytest.mark.parametrize("kernel", ["blocked", "triton", "compiled", "flex"])
def test_fast_path_equals_plain_path(kernel):
    cpu = cpu_model()
    model = gpu_model()
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
    c = run(cpu, make_caches(cpu, "infllm", SMALL, kernel="plain"), tokens.cpu(), SMALL.chunk_size, 20)
    assert (a.cpu() - c).abs().max() < 1e-3


@pytest.mark.parametrize("kernel", ["compiled", "triton"])
def test_bf16_fast_path_close_to_fp32_plain(kernel):
    """The fast path in bf16 is as close to fp32 as bf16 itself allows. Rounding the model to bf16 alone
    moves some lookups to other units (a discrete choice between near-equal scores), and the logits of the
    positions after such a flip move by up to a tenth of their range (for the plain path in bf16 as for the
    compiled one), so the fast path is measured against the plain path in bf16, both against fp32: no worse
    at any position, and close at most positions."""
    model32 = gpu_model()
    model16 = gpu_model(dtype=torch.bfloat16)
    tokens = torch.randint(0, ARGS.vocab_size, (1, 300), device="cuda")
    a = run(model32, make_caches(model32, "infllm", SMALL, kernel="plain"), tokens, SMALL.chunk_size, 10)
    b = run(model16, make_caches(model16, "infllm", SMALL, kernel=kernel), tokens, SMALL.chunk_size, 10)
    c = run(model16, make_caches(model16, "infllm", SMALL, kernel="plain"), tokens, SMALL.chunk_size, 10)
    fast, bf16 = ((a - x).abs().amax(-1)[0] / a.abs().max() for x in (b, c))  # per position
    assert fast.max() < 1.5 * bf16.max() and fast.median() < 0.02


@pytest.mark.parametrize("wavefront", [0, 1])
@pytest.mark.parametrize("attention, kernel", [("infllm", "triton"), ("infllm", "compiled"), ("infllm", "flex"),
                                               ("stream", "triton"), ("stream", "compiled")])
def test_cuda_graphs_replay_the_same_forward(attention, kernel, wavefront):
    """Forwards replayed from CUDA graphs give the logits, selections and statistics of running them, over
    prompts of three lengths in the same caches (reset between them); the kinds of forward (a padded
    piece, a token; a wavefront step, its layers on streams of their own) are captured on the first prompt
    and never again, compiled or eager."""
    model = gpu_model()
    eager, graphed = make_caches(model, attention, SMALL, kernel), make_caches(model, attention, SMALL, kernel)
    graphs = FixedShapes(model, graphed, wavefront=wavefront)
    for c in graphed:
        c.reserve(420)  # the longest prompt: the storage never moves
    captures = []
    for seed, n in enumerate((400, 257, 333)):
        torch.manual_seed(seed)
        tokens = torch.randint(0, ARGS.vocab_size, (1, n), device="cuda")
        outs = {}
        for name, caches, fwd in (("eager", eager, forward_fn(model, eager)), ("graphs", graphed, graphs)):
            for c in caches:
                c.reset()
            with torch.no_grad():
                o = [fwd(tokens[:, s:min(s + 48, n - 20)]).clone() for s in range(0, n - 20, 48)]
                o += [fwd(tokens[:, t:t + 1]).clone() for t in range(n - 20, n)]
            outs[name] = torch.cat(o, dim=1)
        assert (outs["eager"] - outs["graphs"]).abs().max() < 1e-4
        assert memory_stats(eager) == memory_stats(graphed)
        assert [c.pos for c in eager] == [c.pos for c in graphed] == [n] * len(eager)
        captures.append(graphs.captures)
    # A padded piece and a token; or a token and each layer's wave step at both parities (every chunk has 2
    # pieces or more). Never again after the first prompt.
    assert captures == [2 * ARGS.n_layers + 1 if wavefront else 2] * 3


def test_a_prompt_of_another_length_compiles_no_triton_kernel():
    """The eager GPU path's Triton kernels, counted by Triton's compile hook: a second prompt, whose stored units
    differ in number (a multiple of 16 first, then not), compiles nothing that the first prompt (prefill as a
    wavefront, decoding) did not. A new compile would cost a later prompt about a second, with an empty cache."""
    triton = pytest.importorskip("triton")
    if not hasattr(triton, "knobs"):
        pytest.skip("this Triton has no compile hooks")
    # A head size of its own (no other test's kernels): the first prompt must compile, or load from disk, each one.
    args = ModelArgs(vocab_size=211, dim=96, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=24, ffn_dim=128)
    model = gpu_model(args, seed=1)
    caches = make_caches(model, "infllm", SMALL, "triton")
    fixed = FixedShapes(model, caches)
    compiled, rows = [], []
    before = triton.knobs.runtime.jit_post_compile_hook
    triton.knobs.runtime.jit_post_compile_hook = lambda **k: compiled.append(k["repr"])
    try:
        for n in (364, 485):  # 48 and 63 rows of units: Triton tells a multiple of 16 apart
            for c in caches:
                c.reset()
            ids = torch.randint(0, args.vocab_size, (n,)).tolist()
            logits = prefill(model, caches, ids, SMALL.chunk_size, forward=fixed, room=8)
            decode(model, caches, logits, 6, forward=fixed)
            torch.cuda.synchronize()
            rows.append(caches[0].units.reprs.shape[0])
            compiled.append(None)
    finally:
        triton.knobs.runtime.jit_post_compile_hook = before
    assert rows[0] % 16 == 0 and rows[1] % 16 != 0  # else the prompts do not test what they should
    first = compiled.index(None)
    assert first > 0, "the first prompt compiled no Triton kernel: the hook saw nothing"
    assert compiled[first + 1:] == [None], compiled[first + 1:]


@pytest.mark.parametrize("kernel", ["triton", "flex"])
def test_wavefront_on_streams_equals_pieces_in_order(kernel):
    """A prompt of 40 pieces through 6 layers as a wavefront, each layer replayed from graphs of its own on a
    stream of its own, with no barrier between steps, unit loads and write-backs on each layer's side stream:
    the logits after the prompt, the greedy tokens after it, the selections and statistics of the pieces in order."""
    args = ModelArgs(vocab_size=211, dim=128, n_layers=6, n_heads=8, n_kv_heads=2, head_dim=16, ffn_dim=256)
    model = gpu_model(args, seed=1, dtype=torch.bfloat16)
    ids = torch.randint(0, args.vocab_size, (16 * 40 + 7,)).tolist()
    runs = []
    for wavefront in (0, 6):
        caches = make_caches(model, "infllm", SMALL, kernel)
        fixed = FixedShapes(model, caches, wavefront=wavefront)
        for rep in range(2):  # the first run captures the graphs, the second replays them
            for c in caches:
                c.reset()
            logits = prefill(model, caches, ids, SMALL.chunk_size, forward=fixed, room=8)
            new = decode(model, caches, logits, 8, forward=fixed)
        runs.append((logits, new, memory_stats(caches)))
    (a, new_a, stats_a), (b, new_b, stats_b) = runs
    assert (a - b).abs().max() < 1e-2 * a.abs().max() and new_a == new_b and stats_a == stats_b
    assert stats_a["misses"] > 0


def test_greedy_decoding_ahead_from_graphs_equals_decoding_step_by_step():
    """decode_ahead replayed from CUDA graphs, the step after a stop token fed as padding (its real count set on the
    GPU): the same tokens as the same graphs driven token by token, and caches that go on alike (positions,
    statistics, the logits of tokens fed after the answer), with units evicted along the way."""
    model = gpu_model(seed=4)
    ids = torch.randint(0, ARGS.vocab_size, (16 * 12 + 3,), generator=torch.Generator().manual_seed(4)).tolist()
    more = torch.randint(0, ARGS.vocab_size, (1, 5), generator=torch.Generator().manual_seed(5)).cuda()
    caches = make_caches(model, "infllm", SMALL, "triton")
    fixed = FixedShapes(model, caches)
    free = decode(model, caches, prefill(model, caches, ids, SMALL.chunk_size, forward=fixed, room=16), 10, forward=fixed)
    stop = free[4]
    runs = []
    for forward in (fixed, lambda t: fixed(t)):  # decode_ahead, then the host choosing each token
        for c in caches:
            c.reset()
        logits = prefill(model, caches, ids, SMALL.chunk_size, forward=fixed, room=16)
        new = decode(model, caches, logits, 10, (stop,), forward=forward)
        state = [(c.pos, int(c.pos_d), int(c.start_d), c.units.count) for c in caches]
        runs.append((new, state, memory_stats(caches), fixed(more).clone()))
    (new_a, state_a, stats_a, after_a), (new_b, state_b, stats_b, after_b) = runs
    assert new_a == new_b == free[:free.index(stop)] and state_a == state_b and stats_a == stats_b
    assert state_a[0][0] == len(ids) + len(new_a) and stats_a["misses"] > 0
    assert torch.allclose(after_a, after_b, rtol=1e-5, atol=1e-5)


def test_wavefront_and_unit_loads_have_streams_of_their_own():
    """Each layer's wavefront stream and unit loader is a CUDA stream of its own. PyTorch hands out streams
    round-robin from a pool of 32 per priority: with the loaders at the same priority as the wavefront, 30
    layers' 60 streams shared 32, and layers waited on each other (half the wavefront's speed)."""
    args = ModelArgs(vocab_size=211, dim=64, n_layers=30, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128)
    model = accelerate(random_model(args, device="cuda", dtype=torch.bfloat16))
    caches = make_caches(model, "infllm", SMALL, "triton")
    fixed = FixedShapes(model, caches, graphs=False)
    prefill(model, caches, [i % args.vocab_size for i in range(16 * 32)], SMALL.chunk_size, forward=fixed)
    streams = fixed.wave[2] + [c.units.loader for c in caches]
    assert len(streams) == 60 and len({s.cuda_stream for s in streams}) == 60


@pytest.mark.parametrize("wavefront", [0, 1])
def test_bookkeeping_kernels_equal_their_specs(wavefront):
    """The Triton kernels of engine/bookkeeping.py (piece_angles, ring_write, window_mask, unit_scores, select_top,
    lru_fetch, memory_part, retire: the eager GPU's table of ops) against their PyTorch specifications (the table
    SPEC), end to end: the same logits, tokens, hit and miss counts, cached units (least recently used first),
    stored units and representative keys, init tokens and counters, after a prompt whose pieces evict units (4
    device slots, 3 units a lookup) and a few decoding steps, from CUDA graphs, and the units selected by 4 more
    steps (eager)."""
    model = gpu_model(seed=3)
    ids = torch.randint(0, ARGS.vocab_size, (16 * 30 + 5,)).tolist()
    runs = []
    for ops in (TRITON, SPEC):
        caches = make_caches(model, "infllm", SMALL, "triton")
        for c in caches:
            assert c.ops == c.units.ops == TRITON
            c.ops = c.units.ops = ops
        fixed = FixedShapes(model, caches, wavefront=wavefront)
        logits = prefill(model, caches, ids, SMALL.chunk_size, forward=fixed, room=8)
        new = decode(model, caches, logits, 8, forward=fixed)
        for c in caches:  # the units each step selects (eager: trace reads them on the host)
            c.trace = []
        new += decode(model, caches, model(torch.tensor([new[-1:]], device="cuda"), caches)[0, -1], 4,
                      forward=forward_fn(model, caches))
        torch.cuda.synchronize()
        state = [(c.units.cached_units(), c.trace, c.units.storage_k[:c.units.count].clone(), c.units.storage_v[:c.units.count].clone(),
                  c.units.reprs[:c.units.count].clone(), c.init_k[:, :int(c.n_init_d)].clone(),
                  int(c.start_d), int(c.n_init_d), int(c.pos_d)) for c in caches]
        runs.append((logits, new, memory_stats(caches), state))
    (a, new_a, stats_a, state_a), (b, new_b, stats_b, state_b) = runs
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    assert new_a == new_b and stats_a == stats_b
    for sa, sb in zip(state_a, state_b):
        assert sa[0] == sb[0] and sa[1] == sb[1] and len(sa[1]) == 4 and sa[6:] == sb[6:]
        assert all(torch.allclose(x, y, rtol=1e-5, atol=1e-6) for x, y in zip(sa[2:6], sb[2:6]))
    assert stats_a["misses"] > 0 and stats_a["hits"] > 0 and stats_a["units"] > 0


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 33), st.integers(1, 16), st.integers(0, 60), st.randoms(use_true_random=False))
def test_lru_kernel_keeps_fetchs_state(S, topk, n, rng):
    """Random lookups, some entries not valid, against fetch: after every one the same units cached, each
    with its last use, the same clock and counts; a miss loads into the slot its unit now holds."""
    topk = min(topk, S)
    cfg = InfLLMConfig(n_init=4, n_local=64, block_size=8, repr_topk=2, topk=topk, max_cached_block=S,
                       exc_block_size=16, chunk_size=48)
    ref = MemoryUnits(cfg, 2, 1, 4, "cpu", torch.float32)
    cap = max(n, topk) + 4
    ref.reserve(cap)
    names = ("unit_slot", "slot_unit", "slot_used", "clock", "hits", "misses")

    def cached(t):  # unit -> last use; the two maps (unit -> slot, slot -> unit) agree
        out = {int(t["slot_unit"][s]): int(t["slot_used"][s]) for s in range(S) if t["slot_unit"][s] >= 0}
        assert all(int(t["slot_unit"][t["unit_slot"][u]]) == u for u in out)
        assert int((t["unit_slot"][:-1] >= 0).sum()) == len(out)
        return out, int(t["clock"]), int(t["hits"]), int(t["misses"])

    for _ in range(20):
        units = torch.tensor(sorted(rng.sample(range(cap + 1), topk)))
        valid = torch.tensor([rng.random() < 0.85 for _ in range(topk)]) & (units < n)
        gpu = {k: getattr(ref, k).cuda() for k in names}
        loads = torch.zeros(topk, dtype=torch.long, device="cuda"), torch.zeros(topk, dtype=torch.long, device="cuda")
        slots = bookkeeping.lru_fetch(units.cuda(), valid.cuda(), *(gpu[k] for k in names), *loads, ref.AGE).cpu()
        ref.fetch(units, valid)
        got = {k: v.cpu() for k, v in gpu.items()}
        assert cached(got) == cached({k: getattr(ref, k) for k in names})
        load_units, load_slots = (x.cpu() for x in loads)
        for i in range(topk):
            assert int(got["slot_unit"][slots[i]]) == int(units[i]) if valid[i] else int(slots[i]) == S
            if load_slots[i] >= 0:  # a miss: its unit copied into the slot it now holds
                assert valid[i] and load_slots[i] == slots[i] and load_units[i] == units[i]
        for k in ("unit_slot", "slot_unit", "slot_used"):  # free slots may differ: go on from the kernel's
            getattr(ref, k).copy_(got[k])


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([1, 2, 16]), st.integers(1, 5000), st.integers(0, 5000), st.sampled_from([1, 7, 512]),
       st.sampled_from(["none", "one", "all"]), st.sampled_from([1e-3, 1.0, -1.0]), st.integers(0, 2**16))
def test_select_kernel_equals_its_spec(topk, extra, n, T, reals, scale, seed):
    """bookkeeping.select_top against select_top_spec: the same stored units, ascending, the same valid entries
    (none without a real query), the lookup count; every entry a distinct row. Scores as the lookup gives them:
    -inf past the n stored, of any sign and size."""
    rows = topk + extra
    n = min(n, rows)
    g = torch.Generator().manual_seed(seed)
    scores = (torch.randn(rows, generator=g) * scale).masked_fill(torch.arange(rows) >= n, float("-inf"))
    real = torch.arange(T) < {"none": 0, "one": 1, "all": T}[reals]
    lookups, ref_lookups = torch.tensor(3, device="cuda"), torch.tensor(3)
    units, valid = bookkeeping.select_top(scores.cuda(), topk, torch.tensor(n).cuda(), real.cuda(), lookups)
    units, valid = units.cpu(), valid.cpu()
    ref, ref_valid = bookkeeping.select_top_spec(scores, topk, torch.tensor(n), real, ref_lookups)
    assert torch.equal(valid, ref_valid) and torch.equal(units[valid], ref[ref_valid])
    assert torch.equal(units, units.sort().values) and len(set(units.tolist())) == topk and (units < rows).all()
    assert int(lookups) == int(ref_lookups) == 3 + int(ref_valid.any())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("Hq, T, D, rows", [(32, 512, 128, 1025), (9, 1, 64, 3), (6, 77, 80, 130), (4, 33, 16, 1)])
def test_unit_scores_on_the_gpu_equal_float64(dtype, Hq, T, D, rows):
    """bookkeeping.unit_scores: the real queries averaged per head, dotted with each unit's representative key, -inf
    past the units stored; against its spec in float64 (padding queries and units past n must change nothing)."""
    q = torch.randn(Hq, T, D, dtype=torch.float64)
    reprs = torch.randn(rows, Hq * D, dtype=torch.float64)
    real = torch.arange(T) < max(1, T - 5)
    n = max(1, rows - 2)
    got = bookkeeping.unit_scores(q.to("cuda", dtype), real.cuda(), reprs.to("cuda", dtype), torch.tensor(n).cuda()).cpu()
    q, reprs = q.to(dtype).double(), reprs.to(dtype).double()  # the inputs as the kernel reads them
    expect = bookkeeping.unit_scores_spec(q, real, reprs, torch.tensor(n))
    mean = q[:, real].mean(1).reshape(-1)
    scale = reprs.abs() @ mean.abs()  # float32 sums: rounding grows with the terms' size
    assert got.shape == (rows,) and torch.isinf(got[n:]).all() and (got[n:] < 0).all()
    assert ((got[:n].double() - expect[:n]).abs() <= 1e-5 * scale[:n]).all()


@pytest.mark.parametrize("world", [2, 3])
def test_unit_scores_of_each_process_sum_to_one_process(world):
    """Tensor parallel scores units with bookkeeping.unit_scores on each process's query heads and their columns of
    the representative keys, then sums over processes (engine.memory.MemoryUnits.lookup): the sum equals one
    process's scores within float32 rounding, and the units not stored stay -inf (no NaN from adding them)."""
    Hq, T, D, rows, n = 12, 5, 64, 1025, 1000
    q = torch.randn(Hq, T, D, device="cuda", dtype=torch.bfloat16)
    reprs = torch.randn(rows, Hq * D, device="cuda", dtype=torch.bfloat16)
    real, stored = (torch.arange(T) < 3).cuda(), torch.tensor(n).cuda()
    whole = bookkeeping.unit_scores(q, real, reprs, stored)
    h = Hq // world
    parts = sum(bookkeeping.unit_scores(q[r * h:(r + 1) * h], real, reprs[:, r * h * D:(r + 1) * h * D].contiguous(), stored)
                for r in range(world))
    assert torch.isinf(parts[n:]).all() and (parts[n:] < 0).all() and torch.isfinite(parts[:n]).all()
    assert torch.allclose(parts[:n], whole[:n], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_on_the_gpu_equals_float64(dtype):
    """layers.rms_norm (the eager GPU's RMSNorm) within the rounding of the reference's two steps (normalised
    row to the input's dtype, then the product with the weight) of a float64 norm."""
    x = (torch.randn(2, 77, 576, dtype=torch.float64) * 3).to("cuda", dtype)
    w = (torch.rand(576, dtype=torch.float64) + 0.5).to("cuda", dtype)
    x64, w64 = x.double(), w.double()
    expect = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * w64
    got = layers.rms_norm(x, w, 1e-5)
    assert got.shape == x.shape and got.dtype == dtype
    tol = 2 * 2.0 ** -8 if dtype == torch.bfloat16 else 1e-5
    assert ((got.double() - expect).abs() <= tol * expect.abs() + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_residual_norm_and_silu_product_on_the_gpu_equal_pytorchs(dtype):
    """layers.rms_norm with add (the accelerated Block: h = x + attention, then its norm): the residual sum equal to
    x + h, its norm equal to the norm of that sum; layers.silu_mul (model.MLP, the two halves of one product) against
    float64 within its two roundings (the silu, the product) and the GPU's fast exponential, as PyTorch's
    F.silu(g) * u is."""
    g = torch.Generator().manual_seed(0)
    x, h = ((torch.randn(3, 41, 576, generator=g) * 3).to("cuda", dtype) for _ in range(2))
    w = (torch.rand(576, generator=g) + 0.5).to("cuda", dtype)
    total, normed = layers.rms_norm(x, w, 1e-5, add=h)
    assert torch.equal(total, x + h) and torch.equal(normed, layers.rms_norm(x + h, w, 1e-5))
    gate, up = ((torch.randn(5, 3001, generator=g) * 4).to("cuda", dtype) for _ in range(2))
    got, g64, u64 = layers.silu_mul(torch.cat([gate, up], dim=-1)), gate.double(), up.double()
    expect = g64 / (1 + torch.exp(-g64)) * u64
    # Two roundings of half an ulp each, the exponential's relative error (some |g| * 2^-24 in float32), and float16's
    # subnormals (spaced 2^-24) for the silu of a very negative g.
    tol = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}[dtype] * 2 + 30 * 2.0 ** -24
    assert got.dtype == dtype and ((got.double() - expect).abs() <= tol * expect.abs() + 2.0 ** -20).all()
    ref = F.silu(gate) * up  # PyTorch's two operations: as far from float64 as the kernel
    assert ((ref.double() - expect).abs() <= tol * expect.abs() + 2.0 ** -20).all()


def test_pinned_storage_is_mapped_for_the_gpu():
    src = storage.pinned_empty((7, 2, 4, 3), torch.bfloat16)
    src.copy_(torch.randn(7, 2, 4, 3))
    dst = torch.zeros(3, 2, 4, 3, device="cuda", dtype=torch.bfloat16)
    storage.gather_from_host(src, torch.tensor([6, 1, 3], device="cuda"), dst, torch.tensor([0, 2, -1], device="cuda"))
    assert torch.equal(dst[0].cpu(), src[6]) and torch.equal(dst[2].cpu(), src[1]) and not dst[1].any()
    back = torch.randn(2, 2, 4, 3, device="cuda").to(torch.bfloat16)
    storage.scatter_to_host(back, src, torch.tensor([4, 0], device="cuda"))
    torch.cuda.synchronize()
    assert torch.equal(src[4], back[0].cpu()) and torch.equal(src[0], back[1].cpu())


@pytest.mark.parametrize("wavefront", [0, 1])
def test_unit_storage_is_locked_as_the_pieces_come(wavefront, monkeypatch):
    """The prefill's unit storage is reserved at once but page-locked a slice at a time, each slice before
    the pieces that may touch it are queued (MemoryUnits.pin): the same logits, tokens and unit-cache
    statistics as storage locked whole before the prefill, and after the prompt only the rows it needs
    locked (1-row slices here), in many registrations."""
    model = gpu_model()
    ids = torch.randint(0, ARGS.vocab_size, (900,), generator=torch.Generator().manual_seed(3)).tolist()
    runs = []
    for slice_bytes in (1, 1 << 40):  # a row at a time; everything at the first piece
        monkeypatch.setattr(MemoryUnits, "SLICE", slice_bytes)
        caches = make_caches(model, "infllm", SMALL, "triton")
        fixed = FixedShapes(model, caches, wavefront=wavefront)
        for c in caches:
            c.reserve(5000)  # room for a longer prompt: nothing of it locked yet
        units = caches[0].units
        assert units.pinned == SMALL.topk and units.capacity > 5000 // SMALL.block_size  # the rows kept
        kept = units.pinned
        with torch.no_grad():
            logits = prefill(model, caches, ids, 300, forward=fixed, room=8)
            new = decode(model, caches, logits, 8, forward=fixed)
        torch.cuda.synchronize()
        runs.append((logits, new, memory_stats(caches), units.pinned, len(units.locked[0]), kept))
        assert units.storage_k.is_pinned() and units.count > 20
    (a, new_a, stats_a, pinned_a, spans_a, kept_a), (b, new_b, stats_b, pinned_b, spans_b, _) = runs
    assert (a - b).abs().max() < 1e-5 and new_a == new_b and stats_a == stats_b
    need = (900 + 8) // SMALL.block_size + 1
    assert need <= pinned_a < pinned_b == caches[0].units.storage_k.shape[0] and spans_b <= 2
    assert spans_a > 10 and pinned_a > kept_a


# Property tests of the fused kernels on fresh random inputs (hypothesis), in bf16 against the plain path
# in float64 on the same (rounded) inputs. Each FlexAttention shape costs a compilation, so the shapes come
# from a short list and the values are new every example: a steady prefill piece, a ragged last piece and a
# decoding step with mistral-7b's grouping, then small windows (a small n_local): more queries than
# inductor's decoding kernel tiles (they once failed to lower), fewer (that kernel takes them), and a group
# of 3 query heads (SmolLM2's).
FLEX_SHAPES = [dict(n_kv=2, group=4, T=512, N=1024, units=4, D=128), dict(n_kv=2, group=4, T=505, N=4096, units=2, D=64),
               dict(n_kv=2, group=4, T=1, N=4096, units=4, D=64), dict(n_kv=2, group=4, T=77, N=300, units=2, D=64),
               dict(n_kv=2, group=4, T=16, N=64, units=1, D=16), dict(n_kv=3, group=3, T=100, N=500, units=2, D=64)]


def engine_flex(*args):
    """The engine's "flex" entry (FlexAttention, the Triton column sums) as one chunk attention."""
    local, memory = CHUNK_ATTENTION["flex"]
    return memory(local(*args[:4]), *args[4:])


@functools.cache
def fused_flex():
    return torch.compile(engine_flex, dynamic=False)


@pytest.mark.parametrize("shape", FLEX_SHAPES, ids=lambda s: f"T{s['T']}-N{s['N']}-D{s['D']}-G{s['group']}")
@settings(max_examples=3, deadline=None)
@given(st.integers(0, 2000), st.integers(0, 128), st.integers(0, 2**16))
def test_fused_flex_equals_plain(shape, pos, held, seed):
    args = window_case(dict(shape, pos=pos, held=held, seed=seed), dtype=torch.bfloat16, device="cuda", D=shape["D"])
    out, col = fused_flex()(*args)
    ref_out, ref_col = kernels.chunk_attention(*(a.double() if a.is_floating_point() else a for a in args))
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.double(), ref_out, atol=2e-2, rtol=2e-2)
    assert torch.allclose(col.double(), ref_col.double(), atol=2e-3, rtol=2e-3)


# Beside FLEX_SHAPES, the kernel's own cases: decoding steps of SmolLM2 and mistral-7b (keys split into ranges,
# merged after, the column sums from the kept logits), a mistral-7b piece (one range), and pieces of a few
# queries that split and keep logits too (the merge sums each key's probabilities over queries).
TRITON_SHAPES = FLEX_SHAPES + [dict(n_kv=3, group=3, T=1, N=4096, units=16, D=64),
                               dict(n_kv=8, group=4, T=1, N=4096, units=16, D=128),
                               dict(n_kv=8, group=4, T=512, N=1024, units=2, D=128),
                               dict(n_kv=2, group=4, T=4, N=300, units=2, D=64),
                               dict(n_kv=4, group=1, T=13, N=700, units=3, D=128)]


@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=lambda s: f"T{s['T']}-N{s['N']}-D{s['D']}-G{s['group']}-H{s['n_kv']}")
@settings(max_examples=3, deadline=None)
@given(st.integers(0, 2000), st.integers(0, 128), st.integers(0, 20), st.integers(0, 2**16))
def test_triton_attention_equals_plain(shape, pos, held, padding, seed):
    """The Triton kernel (both parts in one online softmax, every key tile computed; with few queries the keys
    split into ranges, 32 a key head for mistral-7b's decoding step, whose partial softmaxes are merged, and the
    column sums come from the logits the kernel kept) against the float64 plain path, padding queries as
    above; and its log-sum-exp, -inf where a query sees nothing."""
    args = list(window_case(dict(shape, pos=pos, held=held, seed=seed), dtype=torch.bfloat16, device="cuda", D=shape["D"]))
    real = torch.arange(shape["T"], device="cuda") < shape["T"] - min(padding, shape["T"] - 1)
    args[3], args[7] = args[3] & real[:, None], args[7] & real[:, None]
    out, col = attention.chunk_attention_triton(*args)
    double = [a.double() if a.is_floating_point() else a for a in args]
    ref_out, ref_col = kernels.chunk_attention(*double)
    assert out.dtype == torch.bfloat16 and not out[:, ~real].any()
    assert torch.allclose(out.double(), ref_out, atol=2e-2, rtol=2e-2)
    assert torch.allclose(col.double(), ref_col.double(), atol=2e-3, rtol=2e-3)
    _, lse, _ = attention._two_part_attention(*args)
    ref_lse = torch.logaddexp(kernels.part_attention(*double[:4])[1], kernels.part_attention(*double[4:])[1])
    assert torch.equal(lse.isneginf(), ref_lse.isneginf()) and lse[:, ~real].isneginf().all()
    assert torch.allclose(lse[:, real].double(), ref_lse[:, real], atol=1e-3, rtol=1e-3)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([16, 64, 128]), st.sampled_from([1e4, 1e5, 5e5, 1e6]), st.integers(1, 600), st.integers(0, 2**21),
       st.sampled_from([torch.float32, torch.bfloat16]), st.integers(0, 2**16))
def test_rotations_on_the_gpu_equal_float64(D, base, T, start, dtype, seed):
    """The rotary angles and rotations of an eager GPU (one Triton kernel each: layers.rope_angles and rotate, through
    the accelerated Rotary) against PyTorch's float64: at positions up to 2M (angles reduced to one turn in float64),
    for a piece's queries as the projections lay them out ([1, H, T, D], transposed) and for one position shared by
    every query (the memory part's)."""
    from model import Rotary
    args = ModelArgs(vocab_size=8, dim=D, n_layers=1, n_heads=1, n_kv_heads=1, ffn_dim=8, head_dim=D, rope_base=base)
    r, fast = Rotary(args), accelerate(Rotary(args, device="cuda"))
    assert fast.forward.__func__ is layers.rotary_forward
    g = torch.Generator().manual_seed(seed)
    pos = start + torch.randperm(4 * T, generator=g)[:T]
    x = torch.randn(1, T, 3, D, generator=g).to(dtype).transpose(1, 2)
    cos, sin = fast.angles(pos.cuda(), dtype)
    ref_cos, ref_sin = r.angles(pos, torch.float64)
    tol = 2e-6 if dtype == torch.float32 else 8e-3  # float32 angles; bf16: one rounding of cos and sin
    assert torch.allclose(cos.double().cpu(), ref_cos, atol=tol) and torch.allclose(sin.double().cpu(), ref_sin, atol=tol)
    got = fast(x.cuda(), angles=(cos, sin))
    ref = r(x.double(), angles=(cos.double().cpu(), sin.double().cpu()))
    assert got.shape == x.shape and got.dtype == dtype
    assert torch.allclose(got.double().cpu(), ref, atol=2 * tol, rtol=2 * tol)
    one = (cos[:1], sin[:1])
    got = fast(x[0].cuda(), angles=one)
    ref = r(x[0].double(), angles=tuple(a.double().cpu() for a in one))
    assert torch.allclose(got.double().cpu(), ref, atol=2 * tol, rtol=2 * tol)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 300), st.integers(1, 700), st.sampled_from([16, 64, 128]), st.sampled_from([1, 3, 4]),
       st.sampled_from([torch.float32, torch.bfloat16]), st.sampled_from(["random", "band"]), st.integers(0, 2**16))
def test_column_sums_kernel_equals_plain(T, L, D, group, dtype, kind, seed):
    """The Triton column sums (attention.column_sums) against kernels.local_column_sums, its spec, in float64, on
    random masks (every block partial) and on window bands (whole blocks unseen or full)."""
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2 * group, T, D, generator=g), torch.randn(2, L, D, generator=g)
    if kind == "random":
        mask = torch.rand(T, L, generator=g) > 0.3
    else:  # query t sees the keys (t + shift - width, t + shift]
        t, i = torch.arange(T)[:, None], torch.arange(L)[None, :]
        shift, width = torch.randint(-T, L, (2,), generator=g).tolist()
        mask = (i <= t + shift) & (i > t + shift - abs(width) - 1)
    lse = torch.logsumexp(kernels._logits(q.double(), k.double(), mask), -1) + torch.rand(2 * group, T, generator=g)
    lse = torch.where(mask.any(1), lse, float("inf"))  # a query that sees nothing adds nothing
    ref = kernels.local_column_sums(q.to(dtype).double(), k.to(dtype).double(), lse, mask).double()
    got = attention.column_sums(q.to("cuda", dtype), k.to("cuda", dtype), lse.float().cuda(), mask.cuda())
    assert torch.allclose(got.double().cpu(), ref, atol=1e-3, rtol=1e-3)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(1, 40), st.integers(1, 9000), st.sampled_from([torch.float32, torch.bfloat16]),
       st.booleans(), st.integers(0, 2**16))
def test_host_copies_move_the_rows_asked(n, stored, row, dtype, on_gpu, seed):
    """gather_from_host and scatter_to_host on random rows (hits marked -1 copy nothing), on a side stream,
    from and to storage in pinned host memory or in GPU memory (unit_storage=device: other programs a row)."""
    g = torch.Generator().manual_seed(seed)

    def new_storage():
        t = torch.empty(stored, row, dtype=dtype, device="cuda") if on_gpu else storage.pinned_empty((stored, row), dtype)
        return t.copy_(torch.randn(stored, row, generator=g))
    host = new_storage()
    before = host.cpu().clone()
    slots = n + 2
    pool = torch.zeros(slots, row, device="cuda", dtype=dtype)
    units = torch.randint(0, stored, (n,), generator=g)
    dst = torch.randperm(slots, generator=g)[:n]
    dst = torch.where(torch.rand(n, generator=g) < 0.3, -1, dst)
    side = torch.cuda.Stream()
    host2 = new_storage()  # a second storage (values), copied by the same launch
    before2, pool2 = host2.cpu().clone(), torch.zeros_like(pool)
    storage.gather_from_host((host, host2), units.cuda(), (pool, pool2), dst.cuda(), side)
    storage.join(side)
    for got, src in ((pool, before), (pool2, before2)):
        expect = torch.zeros(slots, row, dtype=dtype)
        for u, d in zip(units.tolist(), dst.tolist()):
            if d >= 0:
                expect[d] = src[u]
        assert torch.equal(got.cpu(), expect)
    rows = torch.randperm(stored, generator=g)[:min(n, stored)]
    rows = torch.where(torch.rand(len(rows), generator=g) < 0.2, -1, rows)  # -1: a block that makes no unit
    new, new2 = (torch.randn(len(rows), row, generator=g).to("cuda", dtype) for _ in range(2))
    storage.scatter_to_host((new, new2), (host, host2), rows.cuda(), side)
    side.synchronize()
    kept = rows >= 0
    before[rows[kept]], before2[rows[kept]] = new.cpu()[kept], new2.cpu()[kept]
    assert torch.equal(host.cpu(), before) and torch.equal(host2.cpu(), before2)


@pytest.mark.parametrize("kernel", ["triton", "flex"])
def test_fp8_units_on_the_gpu_equal_the_plain_cpu_path(kernel):
    """unit_dtype=fp8 through the fast path (uint8 copies over PCIe, dequantised after the gather)."""
    cfg = InfLLMConfig(**{**vars(SMALL), "unit_dtype": "fp8"})
    on_cpu, model = cpu_model(), gpu_model()
    tokens = torch.randint(0, ARGS.vocab_size, (1, 400), device="cuda")
    fast = make_caches(model, "infllm", cfg, kernel=kernel)
    cpu = make_caches(on_cpu, "infllm", cfg, kernel="plain")
    for c in fast + cpu:
        c.trace = []
    a = run(model, fast, tokens, cfg.chunk_size, 20)
    b = run(on_cpu, cpu, tokens.cpu(), cfg.chunk_size, 20)
    assert (a.cpu() - b).abs().max() < 1e-3
    assert [c.trace for c in fast] == [c.trace for c in cpu] and memory_stats(fast)["misses"] > 0
    assert fast[0].units.storage_k.dtype == torch.uint8 and fast[0].units.storage_k.is_pinned()


@pytest.mark.parametrize("unit_dtype", ["model", "fp8"])
@pytest.mark.parametrize("kernel", ["triton", "flex"])
def test_units_stored_on_the_gpu_change_nothing_but_where_they_are(kernel, unit_dtype):
    """unit_storage=device: the same logits, selections and pool hits and misses as units in pinned host
    memory (the same kernels read other addresses), and both as the plain CPU path."""
    cfgs = {where: InfLLMConfig(**{**vars(SMALL), "unit_dtype": unit_dtype, "unit_storage": where})
            for where in ("host", "device")}
    on_cpu, model = cpu_model(), gpu_model()
    tokens = torch.randint(0, ARGS.vocab_size, (1, 400), device="cuda")
    caches = {where: make_caches(model, "infllm", cfg, kernel=kernel) for where, cfg in cfgs.items()}
    cpu = make_caches(on_cpu, "infllm", cfgs["host"], kernel="plain")
    for c in caches["host"] + caches["device"] + cpu:
        c.trace = []
    out = {where: run(model, c, tokens, SMALL.chunk_size, 20) for where, c in caches.items()}
    plain = run(on_cpu, cpu, tokens.cpu(), SMALL.chunk_size, 20)
    assert torch.equal(out["device"], out["host"])
    assert [c.trace for c in caches["device"]] == [c.trace for c in caches["host"]] == [c.trace for c in cpu]
    assert memory_stats(caches["device"]) == memory_stats(caches["host"]) and memory_stats(cpu)["misses"] > 0
    assert (out["device"].cpu() - plain).abs().max() < 1e-3
    units = caches["device"][0].units
    assert units.storage_k.is_cuda and units.storage_v.is_cuda and caches["host"][0].units.storage_k.is_pinned()


@pytest.mark.parametrize("to_gpu", [True, False])
def test_units_moved_between_host_and_gpu_memory_are_kept(to_gpu):
    """MemoryUnits.place in the middle of a sequence: the units stored so far move, and decoding goes on
    as if they had stayed."""
    start = "host" if to_gpu else "device"
    cfg = InfLLMConfig(**{**vars(SMALL), "unit_storage": start})
    model = accelerate(random_model(ARGS, device="cuda", dtype=torch.float32, seed=0))
    tokens = torch.randint(0, ARGS.vocab_size, (1, 400), device="cuda")
    stay, move = make_caches(model, "infllm", cfg, kernel="triton"), make_caches(model, "infllm", cfg, kernel="triton")
    ref = run(model, stay, tokens, SMALL.chunk_size, 20)
    head = run(model, move, tokens[:, :380], SMALL.chunk_size, 0)
    assert move[0].units.count > SMALL.max_cached_block  # units in storage only, not in the pool
    for c in move:
        c.units.place(to_gpu)
    assert move[0].units.storage_k.is_cuda == to_gpu and move[0].units.storage_k.is_pinned() == (not to_gpu)
    tail = run(model, move, tokens[:, 380:], 1, 20)
    assert torch.equal(torch.cat([head, tail], dim=1), ref)
    assert memory_stats(move) == memory_stats(stay)


def test_units_on_the_gpu_that_do_not_fit_are_refused_with_the_other_storage_named(tiny_ckpt):
    from engine.storage import GPU_HEADROOM, memory_plan
    from reader import ROOM, Reader, UsageError
    knobs = "n_init=8,n_local=64,block_size=16,topk=2,max_cached_block=3,exc_block_size=32,chunk_size=96"
    doc = " ".join(f"item{i} is {i * 7 % 13}." for i in range(600))  # some 3,000 tokens
    r = Reader(tiny_ckpt, "cuda", "fp32", "infllm", knobs)
    n = len(r.tok.encode(doc, bos=True)) + ROOM  # what reading it plans for
    plan = memory_plan(r.model.args, "infllm", InfLLMConfig.parse(knobs + ",unit_storage=device"), n,
                       torch.float32, "cuda")
    assert plan["host"] == 0 and plan["device"] > plan["parts"]["memory units"] > 0
    budget = plan["device"] // 2
    small = Reader(tiny_ckpt, "cuda", "fp32", "infllm", knobs + ",unit_storage=device", gpu_memory=budget)
    with pytest.raises(UsageError, match="of GPU memory .* unit_storage=host"):
        small.read(doc)
    assert small.tokens == 0
    host = Reader(tiny_ckpt, "cuda", "fp32", "infllm", knobs + ",unit_storage=host", gpu_memory=budget)
    host.read(doc)  # the same budget of GPU memory holds it with the units in host memory
    assert host.tokens > 2000 and host.caches[0].units.storage_k.is_pinned()
    ref = host.feed(host.tok.encode(" item3 is"), room=4)
    # auto (the default): GPU memory where the memory leaves room to spare, host memory where it does not.
    # The free memory it is given excludes what a new reader's caches hold already (the window, the pool).
    spare = max(GPU_HEADROOM, torch.cuda.get_device_properties(0).total_memory // 10)
    held = memory_plan(r.model.args, "infllm", InfLLMConfig.parse(knobs), 0, torch.float32, "cuda")["device"]
    assert 0 < held < plan["device"]
    fits = plan["device"] - held + spare
    for extra, on_gpu in ((0, True), (-1, False)):
        auto = Reader(tiny_ckpt, "cuda", "fp32", "infllm", knobs, gpu_memory=fits + extra)
        auto.read(doc)
        units = auto.caches[0].units
        assert auto.units_on_gpu == on_gpu and units.storage_k.is_cuda == on_gpu and units.storage_k.is_pinned() != on_gpu
        assert torch.equal(auto.feed(auto.tok.encode(" item3 is"), room=4), ref)
    # A longer document later, whose growth no longer leaves the room to spare: auto moves the units to host
    # memory and reads it as host storage does.
    longer = doc + " " + " ".join(f"thing{i} is {i * 5 % 11}." for i in range(1800))
    again = Reader(tiny_ckpt, "cuda", "fp32", "infllm", knobs, gpu_memory=fits)
    again.read(doc)
    assert again.units_on_gpu
    again.read(longer)
    assert not again.units_on_gpu and again.caches[0].units.storage_k.is_pinned() and again.tokens > n
    host = Reader(tiny_ckpt, "cuda", "fp32", "infllm", knobs + ",unit_storage=host")
    host.read(longer)
    q = again.tok.encode(" thing3 is")
    assert torch.equal(again.feed(q, room=4), host.feed(q, room=4))


@pytest.mark.parametrize("infllm", [f"{dtype},unit_storage={where}" for dtype in ("", ",unit_dtype=fp8")
                                    for where in ("host", "device")])
def test_snapshot_on_the_gpu_answers_like_one_process(tiny_ckpt, tmp_path, infllm):
    """Read, save, load in another reader, ask: CUDA graphs replayed over restored buffers, units in pinned host
    memory or in GPU memory, in the model's dtype or fp8."""
    from reader import Reader
    knobs = "n_init=8,n_local=64,block_size=16,topk=2,max_cached_block=3,exc_block_size=32,chunk_size=96" + infllm
    doc = " ".join(f"item{i} is {i * 7 % 13}." for i in range(90))
    q = "\nWhat is item3?"
    one = Reader(tiny_ckpt, "cuda", "fp32", "infllm", knobs)
    one.read(doc)
    one.save(tmp_path / "doc.mem")
    ref_logits = one.feed(one.tok.encode(q), room=8)
    ref = one.answer(ref_logits, 8)
    other = Reader(tiny_ckpt, "cuda", "fp32", "infllm", knobs)
    other.load(tmp_path / "doc.mem")
    for who in (one, other):
        who.rewind()
        assert torch.allclose(who.feed(who.tok.encode(q), room=8), ref_logits, atol=1e-5)
        assert who.ask(q, 8) == ref
    assert other.forward.captures >= 2


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("attention", ["infllm", "full"])
def test_two_gpus_generate_what_one_gpu_does(tiny_ckpt, attention):
    """torchrun over 2 GPUs (NCCL): the all-reduces run inside the CUDA graphs of the forward (InfLLM), or
    eagerly (full attention), and give one GPU's greedy text and unit-cache hits."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    args = ["--ckpt", str(tiny_ckpt), "--device", "cuda", "--dtype", "fp32", "--attention", attention, "--json",
            "--prompt", "The list. " + " ".join(f"item{i} is {i * 7 % 13}." for i in range(60)) + " item3 is",
            "--infllm", "n_init=8,n_local=64,block_size=16,topk=2,max_cached_block=3,exc_block_size=32,chunk_size=96",
            "--max-new-tokens", "8"]
    outs = []
    for launch in ([], ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]):
        r = subprocess.run([sys.executable, *launch, str(root / "generate.py"), *args], capture_output=True,
                           text=True, timeout=600, cwd=root)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    one, two = outs
    assert two["processes"] == 2 and two["text"] == one["text"] and two["new_tokens"] == 8
    assert two["unit_cache_hit_rate"] == one["unit_cache_hit_rate"]


REAL = __import__("pathlib").Path(__file__).resolve().parents[1] / "checkpoints" / "smollm2-135m-instruct"


@pytest.mark.skipif(not (REAL / "model.safetensors").exists(), reason="run `python scripts/prepare_test_model.py` first")
def test_both_engines_answer_the_real_32k_passkey_alike():
    """The real SmolLM2 in bf16 on the GPU, a 32K passkey prompt (4x what it was trained on): --engine reference
    (infllm.py, the plain forward) and --engine fast (CUDA graphs, Triton kernels) give the same greedy tokens."""
    import sys
    sys.path.insert(0, str(REAL.parents[1] / "scripts"))
    from passkey import layout, prompt_text

    from reader import Reader
    answers = []
    for engine in ("reference", "fast"):
        r = Reader(REAL, "cuda", "bf16", engine=engine)
        logits = r.read(prompt_text(*layout(r.tok, 32 * 1024, 0.5, 31415), 31415))
        answers.append(r.answer(logits, 12))
    print("answers (reference, fast):", answers)  # shown with pytest -s: the record of a GPU run
    assert answers[0] == answers[1] and "31415" in answers[0], answers


def test_kernel_bench_times_kernels_against_their_compiled_specs(tmp_path):
    """scripts/kernel_bench.py on a tiny shape: every recorded kernel, a piece and a decoding step, timed beside
    its compiled specification, with a verdict."""
    import json
    import sys
    sys.path.insert(0, str(REAL.parents[1] / "scripts"))
    import kernel_bench
    out = tmp_path / "kernels.jsonl"
    names = ("rms_norm", "ring_write", "select_top")
    kernel_bench.main(["--shape", "tiny", "--tokens", "6K", "--layers", "1", "--reps", "3", "--only", ",".join(names),
                       "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["kernel"], r["step"]) for r in rows} == {(n, s) for n in names for s in ("piece", "step")}
    assert all(r["kernel_eager_ms"] > 0 and r["spec_eager_ms"] > 0 and r["spec_cold_s"] > 0 for r in rows)
    assert all(r["verdict"].startswith(("stays", "goes")) for r in rows)
