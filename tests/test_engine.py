"""The engine (engine/) against the reference (infllm.py), which test_infllm.py checks against the dense
float64 oracle: in float64 on a CPU, over prompts of several lengths with evictions and decoding, the
engine's fixed-shape memory selects the same units at every lookup and gives the same logits within 1e-10,
unpadded, in the padded pieces its CUDA graphs replay, and as a wavefront over the layers. Then what only the
engine has: fp8 units (against the oracle's rounding), decoding ahead, warm-up counts, the wavefront, the
compiled piece step, buffers that outlive a reset. Each Triton kernel is tested against its PyTorch
specification in test_gpu.py (on a GPU)."""
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import engine
import infllm
from dense_infllm import DenseInfLLM, LRUModel
from engine.graphs import FixedShapes
from engine.memory import MemoryUnits
from infllm import InfLLMConfig, memory_stats
from model import random_model
from reader import decode, prefill
from test_infllm import ARGS, SMALL, run, tokens


@pytest.fixture(scope="module")
def model64():
    return random_model(ARGS, dtype=torch.float64, seed=1)


def traced(caches):
    for c in caches:
        c.trace = []
    return caches


@pytest.mark.parametrize("attention", ["infllm", "stream"])
@pytest.mark.parametrize("kernel, forward, n, seed", [
    ("plain", "plain", 150, 0), ("blocked", "plain", 97, 1), ("blocked", "plain", 203, 2),
    ("blocked", "pieces", 157, 3), ("plain", "wavefront", 157, 4)])
def test_engine_equals_the_reference(model64, attention, kernel, forward, n, seed):
    """Logits within 1e-10, the same selected units at every lookup, the same representative keys, units
    stored and pool hits and misses. forward: the model's own (unpadded), FixedShapes' padded pieces one after
    another, or FixedShapes' wavefront (layer l on piece s - l at step s)."""
    prompt, dec = tokens(n, 100 + seed), tokens(20, 200 + seed)
    ref = traced(infllm.make_caches(model64, attention, SMALL))
    fast = traced(engine.make_caches(model64, attention, SMALL, kernel=kernel))
    via = None if forward == "plain" else FixedShapes(model64, fast, graphs=False, wavefront=int(forward == "wavefront"))
    a = run(model64, ref, prompt, SMALL.chunk_size, dec)
    b = run(model64, fast, prompt, SMALL.chunk_size, dec, forward=via)
    assert (a - b).abs().max() < 1e-10
    assert memory_stats(ref) == memory_stats(fast)
    assert [c.pos for c in fast] == [c.pos for c in ref] == [n + 20] * ARGS.n_layers
    if attention == "infllm":
        assert [c.trace for c in ref] == [c.trace for c in fast]
        assert any(len(t) == SMALL.topk for c in ref for t in c.trace) and memory_stats(ref)["misses"] > 0
        for r, f in zip(ref, fast):
            n_units = f.units.count
            assert n_units == r.n_units > SMALL.topk
            assert torch.allclose(r.reprs[:n_units], f.units.reprs[:n_units], atol=1e-12)


def test_default_engine_kernels_equal_the_reference_in_float32():
    """The compiled piece step (inductor fuses lookup, LRU, retirement and attention) on the CPU, float32:
    the same selected units and statistics as the reference, logits within float32 rounding."""
    model = random_model(ARGS, dtype=torch.float32, seed=3)
    prompt, dec = tokens(150, 30), tokens(12, 31)
    ref, fast = traced(infllm.make_caches(model, "infllm", SMALL)), traced(engine.make_caches(model, "infllm", SMALL, "compiled"))
    a, b = run(model, ref, prompt, SMALL.chunk_size, dec), run(model, fast, prompt, SMALL.chunk_size, dec)
    assert (a - b).abs().max() < 1e-4
    assert [c.trace for c in ref] == [c.trace for c in fast]
    assert memory_stats(ref) == memory_stats(fast) and memory_stats(fast)["misses"] > 0


@pytest.mark.parametrize("kernel", ["plain", "blocked"])
def test_fp8_units_match_dense_oracle_with_their_rounding(model64, kernel):
    """unit_dtype=fp8 (the engine's alone): the oracle rounds each unit's keys and values through float8 e4m3
    (a scale per unit and head) when the unit is made; everything else stays float64."""
    cfg = dataclasses.replace(SMALL, unit_dtype="fp8")
    prompt, dec = tokens(150, 40), tokens(16, 41)
    caches = engine.make_caches(model64, "infllm", cfg, kernel=kernel)
    oracles = [DenseInfLLM(cfg, model64.rope.inv_freq) for _ in caches]
    ours = run(model64, caches, prompt, cfg.chunk_size, dec)
    ref = run(model64, oracles, prompt, cfg.chunk_size, dec)
    unrounded = run(model64, engine.make_caches(model64, "infllm", SMALL, kernel=kernel), prompt, cfg.chunk_size, dec)
    assert (ours - ref).abs().max() < 1e-9
    assert (ours - unrounded).abs().max() > 1e-4, "the rounding must show, or this test tests nothing"
    assert caches[0].units.storage_k.dtype == torch.uint8 and caches[0].units.pool_k.dtype == torch.uint8


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sets(st.integers(0, 9), min_size=1, max_size=3), min_size=1, max_size=30))
def test_engine_lru_matches_plain_model(selections):
    """The engine's device-side LRU (MemoryUnits.fetch) against the rule in plain Python."""
    cfg = InfLLMConfig(block_size=2, topk=3, max_cached_block=4, n_local=4, exc_block_size=2, repr_topk=1)
    units = MemoryUnits(cfg, n_heads=2, n_kv_heads=1, head_dim=2, device="cpu", dtype=torch.float64)
    units.reserve(10)
    data = torch.arange(10 * 4, dtype=torch.float64).reshape(10, 1, 2, 2)
    units.add(data, -data, torch.zeros(10, 4, dtype=torch.float64))
    ref = LRUModel(4)
    for sel in selections:
        sel = sorted(sel)
        slots = units.fetch(torch.tensor(sel))
        ref.fetch(sel)
        assert torch.equal(units.pool_k[slots], data[sel]) and torch.equal(units.pool_v[slots], -data[sel])
        assert units.cached_units() == ref.order()
    assert (int(units.hits), int(units.misses)) == (ref.hits, ref.misses)


@pytest.mark.parametrize("stop_at", [0, 3, None])
def test_greedy_decoding_ahead_equals_decoding_step_by_step(model64, stop_at):
    """decode through FixedShapes chooses each greedy token on the device and queues its step before the host
    has seen it (decode_ahead); a stop token is then fed as padding and taken back. Against the same forward
    driven token by token (the host choosing): the same tokens, ended by a stop token (the first, a later one)
    or by max_new_tokens, and caches that go on alike: the same positions on host and device, statistics and
    selections, and the same logits for tokens fed after the answer."""
    ids, more = tokens(120, 70).tolist()[0], tokens(9, 71)
    runs = []
    for ahead in (False, True):
        caches = traced(engine.make_caches(model64, "infllm", SMALL, kernel="blocked"))
        fixed = FixedShapes(model64, caches, graphs=False)
        logits = prefill(model64, caches, ids, SMALL.chunk_size, forward=fixed)
        if stop_at is None:
            stop = ()
        else:  # a stop token where the free run has its stop_at-th token
            free = decode(model64, caches, logits, 8, forward=lambda t: fixed(t))
            for c in caches:
                c.reset()
                c.trace = []
            logits = prefill(model64, caches, ids, SMALL.chunk_size, forward=fixed)
            stop = (free[stop_at],)
        new = decode(model64, caches, logits, 8, stop, forward=fixed if ahead else (lambda t: fixed(t)))
        state = [(c.pos, int(c.pos_d), int(c.start_d), int(c.n_init_d), c.units.count) for c in caches]
        after = fixed(more)
        runs.append((new, state, memory_stats(caches), [c.trace for c in caches], after))
    (new_a, state_a, stats_a, trace_a, after_a), (new_b, state_b, stats_b, trace_b, after_b) = runs
    assert new_a == new_b
    assert len(new_a) == 8 if stop_at is None else (new_a == free[:free.index(stop[0])] and len(new_a) <= stop_at)
    assert state_a == state_b and state_a[0][0] == len(ids) + len(new_a) - (stop_at is None)  # the last token not fed
    assert stats_a == stats_b and trace_a == trace_b
    assert torch.equal(after_a, after_b)


def test_fixed_shapes_count_warm_up_once(model64):
    """FixedShapes times the first run (and capture) of each kind of forward: a first prompt pays it, a later
    prompt of another length runs the same two kinds (a padded piece, one token) and adds nothing."""
    caches = engine.make_caches(model64, "infllm", SMALL, kernel="blocked")
    fixed = FixedShapes(model64, caches, graphs=False, wavefront=0)
    warm = []
    for n in (157, 100):  # bodies of 156 and 99 tokens in pieces of 8: the last padded, never one token alone
        for c in caches:
            c.reset()
        logits = prefill(model64, caches, tokens(n, 7).tolist()[0], SMALL.chunk_size, forward=fixed)
        decode(model64, caches, logits, 3, forward=fixed)
        warm.append(fixed.warmup_s)
    assert warm[0] > 0 and warm[1] == warm[0]
    assert fixed.warm == {(SMALL.exc_block_size, True), (1, False)}


def test_wavefront_runs_each_layer_once_a_piece():
    """A wavefront's first and last n_layers - 1 steps run only the layers that hold a piece: over a prompt of
    20 pieces through 5 layers (24 steps), each layer runs 20 times, one a piece, and then once for the last
    token; no layer runs a piece without a real token."""
    model = random_model(dataclasses.replace(ARGS, n_layers=5), dtype=torch.float32, seed=5)
    caches = engine.make_caches(model, "infllm", SMALL, kernel="blocked")
    runs = [[] for _ in model.layers]
    for layer, seen in zip(model.layers, runs):
        layer.register_forward_hook(lambda mod, args, out, seen=seen: seen.append(int(args[2])))
    prefill(model, caches, tokens(158, 42).tolist()[0], SMALL.chunk_size, forward=FixedShapes(model, caches, graphs=False, wavefront=5))
    pieces = [SMALL.exc_block_size] * 19 + [157 - 19 * SMALL.exc_block_size]
    assert runs == [pieces + [1]] * 5


@pytest.mark.parametrize("attention", ["infllm", "stream"])
def test_wavefront_prefill_equals_pieces_in_order(attention):
    """prefill through FixedShapes with a wavefront (the whole prompt in one call: 20 pieces through 5 layers
    in 24 steps) leaves every layer's cache exactly as the pieces one after another do: the same logits after
    the prompt and after decoding, selections, statistics and state, bit for bit; the progress bar counts
    every prompt token once."""
    model = random_model(dataclasses.replace(ARGS, n_layers=5), dtype=torch.float32, seed=5)
    ids = tokens(158, 42).tolist()[0]  # 157 tokens in 20 pieces, the last padded; the last token alone
    runs = []
    for wavefront in (0, 5):
        caches = traced(engine.make_caches(model, attention, SMALL, kernel="blocked"))
        fixed = FixedShapes(model, caches, graphs=False, wavefront=wavefront)
        fed = []
        progress = type("Progress", (), {"update": lambda self, n: fed.append(n)})()
        logits = prefill(model, caches, ids, SMALL.chunk_size, progress, forward=fixed)
        new = decode(model, caches, logits, 6, forward=fixed)
        runs.append((logits, new, [c.trace for c in caches], memory_stats(caches), [c.snapshot() for c in caches]))
        assert sum(fed) == len(ids) and [c.pos for c in caches] == [len(ids) + 5] * 5
    (a, new_a, trace_a, stats_a, snap_a), (b, new_b, trace_b, stats_b, snap_b) = runs
    assert torch.equal(a, b) and new_a == new_b and trace_a == trace_b and stats_a == stats_b
    for x, y in zip(snap_a, snap_b):  # a snapshot holds the recent tokens in position order, not the ring's slots
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        assert x["recent_k"].shape[1] == int(x["pos_d"] - x["start_d"]) > 0
    if attention == "infllm":
        assert stats_a["misses"] > 0 and any(len(t) > 5 for t in trace_a)


def test_a_wave_cut_short_leaves_nothing_for_the_next_prompt():
    """A prefill interrupted mid-wave (Ctrl-C) leaves pieces inside the wavefront; the next prompt, read from
    the start in the same caches, must not see them: the same logits as in fresh caches."""
    model = random_model(dataclasses.replace(ARGS, n_layers=4), dtype=torch.float32, seed=6)
    first, second = tokens(120, 43).tolist()[0], tokens(100, 44).tolist()[0]

    class Interrupt:
        def __init__(self):
            self.steps = 0

        def update(self, n):
            self.steps += 1
            if self.steps == 6:
                raise KeyboardInterrupt

    caches = engine.make_caches(model, "infllm", SMALL, kernel="blocked")
    fixed = FixedShapes(model, caches, graphs=False, wavefront=1)
    with pytest.raises(KeyboardInterrupt):
        prefill(model, caches, first, SMALL.chunk_size, Interrupt(), forward=fixed)
    for c in caches:
        c.reset()
    again = prefill(model, caches, second, SMALL.chunk_size, forward=fixed)
    fresh_caches = engine.make_caches(model, "infllm", SMALL, kernel="blocked")
    fresh = prefill(model, fresh_caches, second, SMALL.chunk_size, forward=FixedShapes(model, fresh_caches, graphs=False, wavefront=1))
    assert torch.equal(again, fresh)


@pytest.mark.parametrize("attention, unit_dtype", [("infllm", "model"), ("infllm", "fp8"), ("stream", "model")])
def test_a_snapshot_holds_what_was_filled_and_continues_the_sequence(model64, attention, unit_dtype):
    """snapshot() mid-sequence, after the ring has wrapped around (slots are not positions): it holds the
    recent tokens in the order of their positions and the init tokens held, the reference's own (within
    1e-10), and nothing of the buffers beyond them. Restored into fresh caches (storage=True), or rewinding the
    same caches after more tokens (storage=False), what follows is bit for bit what followed in the first
    place, in buffers of the same shapes and addresses (CUDA graphs hold them)."""
    cfg = dataclasses.replace(SMALL, unit_dtype=unit_dtype)
    prompt, more, dec = tokens(120, 80), tokens(30, 81), tokens(6, 82)
    caches = engine.make_caches(model64, attention, cfg)
    run(model64, caches, prompt, cfg.chunk_size, tokens(0, 0))
    assert caches[0].pos > caches[0].ring
    saved = [c.snapshot() for c in caches]
    mark = [c.snapshot(storage=False) for c in caches]
    if unit_dtype == "model":  # the reference keeps its recent tokens oldest first, and its init tokens
        ref = infllm.make_caches(model64, attention, cfg)
        run(model64, ref, prompt, cfg.chunk_size, tokens(0, 0))
        for s, r in zip(saved, (c.snapshot() for c in ref)):
            for name in ("init_k", "init_v", "recent_k", "recent_v", "recent_score"):
                assert s[name].shape == r[name].shape and (s[name] - r[name]).abs().max() < 1e-10, name
    for s in saved:
        assert s["recent_k"].shape[1] == int(s["pos_d"] - s["start_d"]) < cfg.n_local + cfg.block_size
        assert s["init_k"].shape[1] == int(s["n_init_d"]) == cfg.n_init
    want = run(model64, caches, more, cfg.chunk_size, dec)
    fresh = engine.make_caches(model64, attention, cfg)
    buffers = [(t.data_ptr(), t.shape) for c in fresh for t in (c.ring_k, c.ring_kr, c.ring_pos, c.init_k)]
    for c, s in zip(fresh, saved):
        c.restore(s)
    assert [(t.data_ptr(), t.shape) for c in fresh for t in (c.ring_k, c.ring_kr, c.ring_pos, c.init_k)] == buffers
    assert torch.equal(run(model64, fresh, more, cfg.chunk_size, dec), want)
    for c, s in zip(caches, mark):
        c.restore(s)
    assert torch.equal(run(model64, caches, more, cfg.chunk_size, dec), want)
    if attention == "infllm":
        assert caches[0].units.count > cfg.topk


@pytest.mark.parametrize("attention", ["infllm", "stream"])
def test_reset_starts_a_new_sequence_in_the_same_buffers(model64, attention):
    """CUDA graphs hold the engine's buffers: a new sequence must reuse them, and run as in fresh caches."""
    first, second, dec = tokens(130, 7), tokens(110, 8), tokens(5, 9)
    reused = engine.make_caches(model64, attention, SMALL)
    run(model64, reused, first, SMALL.chunk_size, dec)
    buffers = [c.ring_k.data_ptr() for c in reused]
    for c in reused:
        c.reset()
    a = run(model64, reused, second, SMALL.chunk_size, dec)
    fresh = engine.make_caches(model64, attention, SMALL)
    b = run(model64, fresh, second, SMALL.chunk_size, dec)
    assert torch.equal(a, b)
    assert memory_stats(reused) == memory_stats(fresh)
    assert [c.ring_k.data_ptr() for c in reused] == buffers


@pytest.mark.parametrize("kernel", ["plain", "compiled"])
def test_caches_are_freed_without_the_cycle_collector(model64, kernel):
    """A cache holds a prompt's worth of (pinned) unit storage: it must go as soon as its last reference
    does, not when Python's cycle collector next runs, or a second prompt's caches double the memory."""
    import gc
    import weakref
    gc.collect()
    gc.disable()
    try:
        caches = engine.make_caches(model64, "infllm", SMALL, kernel)
        refs = [weakref.ref(c) for c in caches] + [weakref.ref(c.units.storage_k) for c in caches]
        del caches
        assert all(r() is None for r in refs)
    finally:
        gc.enable()


def test_no_new_compiled_graph_after_the_first_prompt():
    """The compiled path (generate.py --compile on a CPU: compiled layers and piece step) compiles a fixed
    set of graphs on its first prompt, and none for later prompts of other lengths, longer ones included
    (the unit storage grows; its size is a dynamic dimension)."""
    from torch._dynamo.utils import counters
    model = random_model(ARGS, dtype=torch.float32, seed=4)
    engine.compile_blocks(model)
    caches = engine.make_caches(model, "infllm", SMALL, "compiled")
    graphs = []
    for n in (100, 157, 61, 290):  # a first prompt of 4 chunks plus a tail, then shorter and longer ones
        for c in caches:
            c.reset()
        logits = prefill(model, caches, tokens(n, n).tolist()[0], SMALL.chunk_size)
        decode(model, caches, logits, 4)
        graphs.append(counters["stats"]["unique_graphs"])
    assert caches[0].units.capacity > 100 // SMALL.block_size + 1  # the storage did grow
    assert graphs[1:] == [graphs[0]] * 3, f"unique graphs after each prompt: {graphs}"

