"""The reference (infllm.py) against independent oracles: full attention where nothing leaves the window,
and the dense float64 DenseInfLLM (tests/dense_infllm.py), which builds the explicit mask and positions
over every token so far. The engine is tested against this reference in test_engine.py."""
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dense_infllm import DenseInfLLM, LRUModel
from infllm import ContextMemory, InfLLMConfig, make_caches, memory_stats
from model import ModelArgs, random_model

SMALL_TEXT = "n_init=4,n_local=32,block_size=8,repr_topk=4,topk=2,max_cached_block=3,exc_block_size=8,chunk_size=24"
SMALL = InfLLMConfig.parse(SMALL_TEXT)
ARGS = ModelArgs(vocab_size=101, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96,
                 rope_base=10000.0, max_seq_len=64)


def run(model, caches, tokens, chunk, decode, forward=None):
    """Prefill `tokens` in chunks of `chunk`, then feed `decode` more tokens one at a time."""
    forward = forward or (lambda x: model(x, caches))
    outs = []
    with torch.no_grad():
        for s in range(0, tokens.shape[1], chunk):
            outs.append(forward(tokens[:, s:s + chunk]))
        for t in range(decode.shape[1]):
            outs.append(forward(decode[:, t:t + 1]))
    return torch.cat(outs, dim=1)


@pytest.fixture(scope="module")
def model64():
    return random_model(ARGS, dtype=torch.float64, seed=1)


def tokens(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, ARGS.vocab_size, (1, n), generator=g)


@pytest.mark.parametrize("attention", ["infllm", "stream"])
def test_without_eviction_equals_full_attention(model64, attention):
    prompt, dec = tokens(26, 0), tokens(6, 1)  # 32 tokens = n_local: nothing leaves the window
    full = run(model64, make_caches(model64, "full"), prompt, 24, dec)
    ours = run(model64, make_caches(model64, attention, SMALL), prompt, 24, dec)
    assert (ours - full).abs().max() < 1e-10


def test_default_knobs_equal_full_attention_below_the_window(model64):
    prompt = tokens(600, 2)
    full = run(model64, make_caches(model64, "full"), prompt, 256, tokens(3, 3))
    ours = run(model64, make_caches(model64, "infllm"), prompt, 256, tokens(3, 3))
    assert (ours - full).abs().max() < 1e-9


@pytest.mark.parametrize("attention", ["infllm", "stream"])
@pytest.mark.parametrize("seed, n", [(0, 150), (1, 97), (2, 203)])
def test_matches_dense_oracle_with_evictions(model64, attention, seed, n):
    """Outputs, every lookup's selected units and the representative keys, through init filling, units
    made, lookups over more units than topk, evictions from the pool and decoding."""
    prompt, dec = tokens(n, 10 + seed), tokens(24, 20 + seed)
    caches = make_caches(model64, attention, SMALL)
    for c in caches:
        c.trace = []
    oracles = [DenseInfLLM(SMALL, model64.rope.inv_freq, stream=attention == "stream") for _ in caches]
    ours = run(model64, caches, prompt, SMALL.chunk_size, dec)
    ref = run(model64, oracles, prompt, SMALL.chunk_size, dec)
    far = (ours[0, -1] - run(model64, make_caches(model64, "full"), prompt, n, dec)[0, -1]).abs().max()
    assert far > 1e-3, "the prompt must be long enough for the memory to matter"
    assert (ours - ref).abs().max() < 1e-9
    if attention == "infllm":
        for c, o in zip(caches, oracles):
            assert c.trace == o.selections
            assert c.n_units == len(o.reprs)
            assert torch.allclose(c.reprs[:c.n_units], torch.stack(o.reprs), atol=1e-12)
        assert any(len(s) == SMALL.topk and len(o.reprs) > SMALL.topk for o in oracles for s in o.selections)
        stats = memory_stats(caches)
        assert stats["misses"] > 0 and stats["hits"] > 0 and stats["units"] == sum(len(o.reprs) for o in oracles)


def test_device_cache_size_changes_speed_not_output(model64):
    """max_cached_block decides which units sit on the device, never what a query sees."""
    prompt, dec = tokens(150, 30), tokens(12, 31)
    outs, stats = [], []
    for size in (SMALL.topk, 64):  # the least allowed; room for every unit
        cfg = dataclasses.replace(SMALL, max_cached_block=size)
        caches = make_caches(model64, "infllm", cfg)
        outs.append(run(model64, caches, prompt, cfg.chunk_size, dec))
        stats.append(memory_stats(caches))
    assert torch.equal(outs[0], outs[1])
    assert stats[1]["misses"] <= stats[1]["units"]  # a pool with room for all loads each unit once at most
    assert stats[0]["misses"] > stats[1]["misses"]


def test_representative_keys_follow_local_scores():
    """A block whose scores single out known tokens: the representative is the mean of their keys."""
    from kernels import representative_keys
    Hkv, Hq, B, D, r = 2, 4, 8, 3, 2
    k = torch.randn(1, Hkv, B, D, dtype=torch.float64)
    score = torch.rand(1, Hq, B, dtype=torch.float64)
    best = [(1, 5), (0, 7), (2, 3), (6, 4)]
    for h, (a, b) in enumerate(best):
        score[0, h, a] = score[0, h, b] = 10.0 + h
    rep = representative_keys(k, score, r).reshape(Hq, D)
    for h, (a, b) in enumerate(best):
        kv = h // (Hq // Hkv)
        assert torch.allclose(rep[h], (k[0, kv, a] + k[0, kv, b]) / 2)


def stored_units(n, cfg):
    """A reference cache holding n units whose keys and values tell them apart."""
    c = ContextMemory(lambda x, pos: x, cfg, n_heads=2, n_kv_heads=1, head_dim=2, dtype=torch.float64)
    data = torch.arange(n * cfg.block_size * 2, dtype=torch.float64).reshape(n, 1, cfg.block_size, 2)
    c.store_units(data, -data, torch.zeros(n, 2, cfg.block_size))
    return c, data


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sets(st.integers(0, 9), min_size=1, max_size=3), min_size=1, max_size=30))
def test_lru_eviction_matches_plain_model(selections):
    cfg = InfLLMConfig(block_size=2, topk=3, max_cached_block=4, n_local=4, exc_block_size=2, repr_topk=1)
    c, data = stored_units(10, cfg)
    ref = LRUModel(4)
    for sel in selections:
        sel = sorted(sel)
        slots = c.fetch(sel)
        ref.fetch(sel)
        assert torch.equal(c.pool_k[slots], data[sel]) and torch.equal(c.pool_v[slots], -data[sel])
        assert sorted(c.last_used, key=lambda u: (c.last_used[u], u)) == ref.order()
    assert (c.hits, c.misses) == (ref.hits, ref.misses)


def test_lru_evicts_the_least_recently_used():
    cfg = InfLLMConfig(block_size=1, topk=2, max_cached_block=3, n_local=2, exc_block_size=1, repr_topk=1)
    c, _ = stored_units(6, cfg)
    for sel in ([0, 1], [2], [0], [3, 4]):  # 1 then 2 are the least recently used when 3, 4 arrive
        c.fetch(sel)
    assert sorted(c.slot_of) == [0, 3, 4]
    c.fetch([4, 5])  # 0 is older than 3
    assert sorted(c.slot_of) == [3, 4, 5]
    assert (c.hits, c.misses) == (2, 6)


@pytest.mark.parametrize("text, words", [
    ("exc_block_size=64,n_local=32", "exc_block_size"),
    ("topk=40", "max_cached_block"),
    ("block_size=0", "block_size"),
    ("n_local=-5", "n_local"),
    ("topk=two", "integer"),
    ("frobnicate=3", "unknown"),
    ("repr_scoring=best", "unknown"),  # removed: docs/quality.md found it no better than the paper's
    ("unit_dtype=fp4", "unit_dtype='fp4' must be one of model, fp8"),
])
def test_impossible_settings_are_refused(text, words):
    with pytest.raises(ValueError) as e:
        InfLLMConfig.parse(text)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_batch_larger_than_one_and_engine_features_are_refused(model64):
    with pytest.raises(ValueError, match="batch size 2"):
        model64(torch.zeros(2, 5, dtype=torch.long), make_caches(model64, "infllm", SMALL))
    assert isinstance(make_caches(model64, "infllm")[0], ContextMemory)
    with pytest.raises(ValueError, match="--engine fast"):
        make_caches(model64, "infllm", dataclasses.replace(SMALL, unit_dtype="fp8"))
    with pytest.raises(ValueError, match="engine"):
        make_caches(model64, "infllm", SMALL)[0].attend(*[torch.zeros(1, 2, 8, 16)] * 3, n_valid=torch.tensor(8))


@pytest.mark.parametrize("attention", ["infllm", "stream", "full"])
def test_a_snapshot_continues_like_the_sequence_it_was_taken_from(model64, attention):
    """snapshot() mid-sequence, restore() into fresh caches (storage=True) or rewind the same caches after
    more tokens (storage=False): what follows is bit for bit what followed in the first place."""
    prompt, more, dec = tokens(120, 80), tokens(30, 81), tokens(6, 82)
    caches = make_caches(model64, attention, SMALL)
    run(model64, caches, prompt, SMALL.chunk_size, tokens(0, 0))
    saved = [c.snapshot() for c in caches]
    mark = [c.snapshot(storage=False) for c in caches]
    want = run(model64, caches, more, SMALL.chunk_size, dec)
    fresh = make_caches(model64, attention, SMALL)
    for c, s in zip(fresh, saved):
        c.restore(s)
    assert torch.equal(run(model64, fresh, more, SMALL.chunk_size, dec), want)
    for c, s in zip(caches, mark):
        c.restore(s)
    assert torch.equal(run(model64, caches, more, SMALL.chunk_size, dec), want)
    if attention == "infllm":
        assert caches[0].n_units > SMALL.topk


@pytest.mark.parametrize("attention", ["infllm", "stream"])
def test_reset_starts_a_new_sequence(model64, attention):
    first, second, dec = tokens(130, 7), tokens(110, 8), tokens(5, 9)
    reused = make_caches(model64, attention, SMALL)
    run(model64, reused, first, SMALL.chunk_size, dec)
    for c in reused:
        c.reset()
    a = run(model64, reused, second, SMALL.chunk_size, dec)
    fresh = make_caches(model64, attention, SMALL)
    assert torch.equal(a, run(model64, fresh, second, SMALL.chunk_size, dec))
    assert memory_stats(reused) == memory_stats(fresh)
