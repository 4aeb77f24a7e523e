"""InfLLM context memory against independent oracles: full attention where nothing is evicted, and a
dense float64 re-implementation of ../shared/INFLLM.md that builds the explicit mask and positions
over every token so far (no windows, no buffers, no pools)."""
import dataclasses
import math
from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from infllm import ContextMemory, InfLLMConfig, MemoryUnits, make_caches, memory_stats
from model import ModelArgs, random_model

SMALL_TEXT = "n_init=4,n_local=32,block_size=8,repr_topk=4,topk=2,max_cached_block=3,exc_block_size=8,chunk_size=24"
SMALL = InfLLMConfig.parse(SMALL_TEXT)
ARGS = ModelArgs(vocab_size=101, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96,
                 rope_base=10000.0, max_seq_len=64)


def rotate(x, pos, inv_freq):
    """Rotary embedding written out: pairs (i, i + d/2) turn by pos * inv_freq[i]."""
    ang = pos.double()[:, None] * inv_freq.double()[None, :]
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], dim=-1)


class DenseInfLLM:
    """One layer of InfLLM in float64: each chunk's attention is one softmax over every token so far,
    with a per-(query, key) choice of part written from the rules of INFLLM.md."""

    def __init__(self, cfg, inv_freq, stream=False):
        self.cfg, self.inv_freq, self.stream = cfg, inv_freq, stream
        self.fp8 = cfg.unit_dtype == "fp8"
        self.K = self.V = self.score = None
        self.state = []  # per token: "recent", "init", "gone" or a unit number
        self.reprs = []
        self.selections = []

    def attend(self, q, k, v, n_valid=None):
        assert n_valid is None
        e = self.cfg.exc_block_size
        return torch.cat([self.chunk(q[0, :, s:s + e], k[0, :, s:s + e], v[0, :, s:s + e])
                          for s in range(0, q.shape[2], e)], dim=1)[None]

    def memory_positions(self, selected):
        """memory_positions=ordered: each memory key's position [N] in one stretch of text before the
        window, in document order: init tokens, then the selected units' tokens (a unit's place among the
        selected times block_size, plus the token's place in the unit), then the far remainder (its place
        among the recent tokens). Queries sit n_local - 1 beyond the last slot of a whole piece's memory:
        init, topk units and exc_block_size + block_size - 1 far slots, masked or not."""
        c, B = self.cfg, self.cfg.block_size
        first_recent = self.state.index("recent")
        pos, n_init, in_unit = [], 0, {}
        for i, s in enumerate(self.state):
            if s == "init":
                pos.append(n_init)
                n_init += 1
            elif s == "recent":
                pos.append(c.n_init + 1 + c.topk * B + i - first_recent)
            elif s in selected:
                b = in_unit[s] = in_unit.get(s, -1) + 1
                pos.append(c.n_init + 1 + selected.index(s) * B + b)
            else:
                pos.append(0)  # not attended in the memory part
        if self.stream:
            slots = c.n_init + 1
        else:
            slots = c.n_init + 1 + c.topk * B + c.exc_block_size + B - 1
        return torch.tensor(pos), c.n_local - 1 + slots - 1

    def relevance(self, u, q_mem):
        """Unit u's score for a chunk's queries [Hq, T, D] at the memory position. lookup_queries: the
        chunk's mean query ("mean") or each query, the best of them counting ("each"). repr_scoring: that
        query concatenated over heads dotted with the unit's mean keys ("mean"), or per head the best of
        its representative tokens' keys, summed over heads ("best")."""
        c, Hq, D = self.cfg, q_mem.shape[0], q_mem.shape[2]
        queries = [q_mem.mean(dim=1)] if c.lookup_queries == "mean" else [q_mem[:, t] for t in range(q_mem.shape[1])]
        scores = []
        for query in queries:  # [Hq, D]
            if c.repr_scoring == "mean":
                scores.append(float(query.reshape(-1) @ self.reprs[u]))
            else:
                keys = self.reprs[u].reshape(Hq, c.repr_topk, D)
                scores.append(sum(max(float(query[h] @ key) for key in keys[h]) for h in range(Hq)))
        return max(scores)

    def chunk(self, q, k, v):
        c = self.cfg
        Hq, T, D = q.shape
        G = Hq // k.shape[0]
        p0 = 0 if self.K is None else self.K.shape[1]
        self.K = k if self.K is None else torch.cat([self.K, k], 1)
        self.V = v if self.V is None else torch.cat([self.V, v], 1)
        self.score = torch.zeros(Hq, T, dtype=torch.float64) if self.score is None else \
            torch.cat([self.score, torch.zeros(Hq, T, dtype=torch.float64)], 1)
        self.state += ["recent"] * T
        N = p0 + T
        qpos, kpos = torch.arange(p0, N), torch.arange(N)

        q_mem = rotate(q, torch.full((T,), c.n_local - 1), self.inv_freq)  # memory: one fixed angle
        selected = []
        if not self.stream and self.reprs:
            if len(self.reprs) <= c.topk:
                selected = list(range(len(self.reprs)))
            else:
                rel = torch.tensor([self.relevance(u, q_mem) for u in range(len(self.reprs))], dtype=torch.float64)
                selected = sorted(rel.topk(c.topk).indices.tolist())
            self.selections.append(selected)

        dist = qpos[:, None] - kpos[None, :]
        local = (dist >= 0) & (dist < c.n_local)
        is_init = torch.tensor([s == "init" for s in self.state])
        is_sel = torch.tensor([s in selected if isinstance(s, int) else False for s in self.state])
        is_recent = torch.tensor([s == "recent" for s in self.state])
        if self.stream:
            memory = is_init[None, :].expand(T, N)
        else:
            memory = is_init[None, :] | is_sel[None, :] | (is_recent[None, :] & (dist >= c.n_local))
        assert not (local & memory).any(), "a key must be in one part only"

        out = torch.zeros(Hq, T, D, dtype=torch.float64)
        for h in range(Hq):
            kh, vh = self.K[h // G], self.V[h // G]
            s_local = rotate(q[h], qpos, self.inv_freq) @ rotate(kh, kpos, self.inv_freq).T
            if self.cfg.memory_positions == "ordered":
                kpos_mem, qpos_mem = self.memory_positions(selected)
                s_mem = rotate(q[h], torch.full((T,), qpos_mem), self.inv_freq) @ rotate(kh, kpos_mem, self.inv_freq).T
            else:
                s_mem = q_mem[h] @ kh.T  # memory keys unrotated
            s = torch.where(local, s_local, torch.where(memory, s_mem, -math.inf)) / math.sqrt(D)
            p = torch.softmax(s, dim=-1)
            out[h] = p @ vh
            self.score[h] += (p * local).sum(dim=0)
        self.retire(G)
        return out

    def retire(self, G):
        c = self.cfg
        recent = [i for i, s in enumerate(self.state) if s == "recent"]
        extra = len(recent) - c.n_local
        if extra <= 0:
            return
        take = min(c.n_init - self.state.count("init"), extra)
        for i in recent[:take]:
            self.state[i] = "init"
        recent, extra = recent[take:], extra - take
        for b in range(extra // c.block_size):
            idx = torch.tensor(recent[b * c.block_size:(b + 1) * c.block_size])
            if self.stream:
                for i in idx.tolist():
                    self.state[i] = "gone"
                continue
            parts = []  # per query head: the mean key of its top tokens, or (repr_scoring=best) their keys
            for h in range(self.score.shape[0]):
                top = idx[self.score[h, idx].topk(c.repr_topk).indices]
                parts.append(self.K[h // G, top].mean(dim=0) if c.repr_scoring == "mean" else self.K[h // G, top].reshape(-1))
            for i in idx.tolist():
                self.state[i] = len(self.reprs)
            self.reprs.append(torch.cat(parts))
            if self.fp8:  # from now on the unit's tokens are seen only as stored: rounded to float8 e4m3
                for kv in range(self.K.shape[0]):
                    self.K[kv, idx] = fp8_round(self.K[kv, idx])
                    self.V[kv, idx] = fp8_round(self.V[kv, idx])


def fp8_round(x):
    """One unit's keys (or values) of one head [B, D] through float8 e4m3, its largest magnitude at 448."""
    scale = x.abs().max().float().clamp(min=torch.finfo(torch.float32).tiny) / 448.0
    return ((x.float() / scale).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


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
@pytest.mark.parametrize("seed, kernel", [(0, "plain"), (1, "blocked"), (2, "blocked"), (3, "flex")])
def test_matches_dense_oracle_with_evictions(model64, attention, seed, kernel):
    prompt, dec = tokens(150, 10 + seed), tokens(24, 20 + seed)
    caches = make_caches(model64, attention, SMALL, kernel=kernel)
    for c in caches:
        c.trace = []
    oracles = [DenseInfLLM(SMALL, model64.rope.inv_freq, stream=attention == "stream") for _ in caches]
    ours = run(model64, caches, prompt, SMALL.chunk_size, dec)
    ref = run(model64, oracles, prompt, SMALL.chunk_size, dec)
    far = (ours[0, -1] - run(model64, make_caches(model64, "full"), prompt, 150, dec)[0, -1]).abs().max()
    assert far > 1e-3, "the prompt must be long enough for the memory to matter"
    exact = kernel != "flex"  # unfused FlexAttention on a CPU is good to about 1e-7, not 1e-12
    assert (ours - ref).abs().max() < (1e-9 if exact else 1e-6)
    if attention == "infllm":
        for c, o in zip(caches, oracles):
            assert c.trace == o.selections
            assert c.units.count == len(o.reprs)
            assert torch.allclose(c.units.reprs[:c.units.count], torch.stack(o.reprs), atol=1e-12 if exact else 1e-6)
        assert any(len(s) == SMALL.topk and len(o.reprs) > SMALL.topk for o in oracles for s in o.selections)
        stats = memory_stats(caches)
        assert stats["misses"] > 0 and stats["hits"] > 0


@pytest.mark.parametrize("attention, kernel, pieces", [("infllm", "plain", False), ("infllm", "blocked", False),
                                                       ("infllm", "flex", False), ("infllm", "blocked", True),
                                                       ("stream", "blocked", True)])
def test_ordered_memory_positions_match_dense_oracle(model64, attention, kernel, pieces):
    """memory_positions=ordered: the memory's keys in document order before the window, against the
    float64 oracle, unpadded or in the padded pieces CUDA graphs replay; the same lookups as the
    reference (it scores units as before), other outputs."""
    from generate import FixedShapes
    cfg = dataclasses.replace(SMALL, memory_positions="ordered")
    prompt, dec = tokens(150, 50), tokens(16, 51)
    caches = make_caches(model64, attention, cfg, kernel=kernel)
    oracles = [DenseInfLLM(cfg, model64.rope.inv_freq, stream=attention == "stream") for _ in caches]
    for c in caches:
        c.trace = []
    ours = run(model64, caches, prompt, cfg.chunk_size, dec, forward=FixedShapes(model64, caches, graphs=False) if pieces else None)
    ref = run(model64, oracles, prompt, cfg.chunk_size, dec)
    assert (ours - ref).abs().max() < (1e-6 if kernel == "flex" else 1e-9)
    fixed = run(model64, make_caches(model64, attention, SMALL, kernel=kernel), prompt, cfg.chunk_size, dec)
    assert (ours - fixed).abs().max() > 1e-3, "the positions must change what the memory part gives"
    if attention == "infllm":
        assert [c.trace for c in caches] == [o.selections for o in oracles]
        assert any(len(s) == cfg.topk for o in oracles for s in o.selections)


LOOKUP_OPTIONS = ["repr_scoring=best", "lookup_queries=each", "repr_scoring=best,lookup_queries=each",
                  "repr_scoring=best,lookup_queries=each,memory_positions=ordered,unit_dtype=fp8"]


@pytest.mark.parametrize("options", LOOKUP_OPTIONS, ids=lambda o: o.replace(",", "+"))
@pytest.mark.parametrize("attention, kernel, pieces", [("infllm", "plain", False), ("infllm", "blocked", False),
                                                       ("infllm", "flex", False), ("infllm", "blocked", True),
                                                       ("stream", "blocked", True)])
def test_lookup_options_match_dense_oracle(model64, options, attention, kernel, pieces):
    """repr_scoring=best (a unit scored per head by its best representative token) and lookup_queries=each
    (a unit scored by its best query of the piece), alone, together and with the other options, against
    the float64 oracle, unpadded or in the padded pieces CUDA graphs replay: outputs, selections and the
    stored representative keys. The same input with the lookup of the reference (the other settings kept)
    selects other units somewhere, or the options would be tested doing nothing. StreamingLLM has no
    units: the options change nothing there."""
    from generate import FixedShapes
    cfg = InfLLMConfig.parse(SMALL_TEXT + "," + options)
    ref_cfg = dataclasses.replace(cfg, repr_scoring="mean", lookup_queries="mean")
    prompt, dec = tokens(150, 60), tokens(16, 61)
    caches, ref_caches = make_caches(model64, attention, cfg, kernel=kernel), make_caches(model64, attention, ref_cfg, kernel=kernel)
    oracles = [DenseInfLLM(cfg, model64.rope.inv_freq, stream=attention == "stream") for _ in caches]
    for c in caches + ref_caches:
        c.trace = []
    forward = (lambda cs: FixedShapes(model64, cs, graphs=False)) if pieces else (lambda cs: None)
    ours = run(model64, caches, prompt, cfg.chunk_size, dec, forward=forward(caches))
    ref = run(model64, oracles, prompt, cfg.chunk_size, dec)
    reference_lookup = run(model64, ref_caches, prompt, cfg.chunk_size, dec, forward=forward(ref_caches))
    assert (ours - ref).abs().max() < (1e-6 if kernel == "flex" else 1e-9)
    if attention == "stream":
        assert torch.equal(ours, reference_lookup)
        return
    exact = kernel != "flex"
    for c, o in zip(caches, oracles):
        assert c.trace == o.selections and c.units.count == len(o.reprs)
        assert torch.allclose(c.units.reprs[:c.units.count], torch.stack(o.reprs), atol=1e-12 if exact else 1e-6)
    assert any(len(s) == cfg.topk and len(o.reprs) > cfg.topk for o in oracles for s in o.selections)
    assert [c.trace for c in caches] != [c.trace for c in ref_caches], "the option must change some lookup"


def test_lookup_options_score_units_as_written():
    """kernels.score_units against its definition, loop by loop, on random units and a piece with padding:
    repr_scoring=best is a sum over heads of each head's best key, lookup_queries=each the best real query;
    one query (decoding) scores as the mean does, bit for bit; and scores split over two halves of the heads
    (tensor parallel), added by over_heads before the max over queries, are those of all heads at once."""
    import kernels
    g = torch.Generator().manual_seed(5)
    Hq, T, D, r, n, real_n = 4, 6, 8, 3, 7, 4
    q = torch.randn(Hq, T, D, generator=g, dtype=torch.float64)
    keys = torch.randn(n, Hq, r, D, generator=g, dtype=torch.float64)
    real = torch.arange(T) < real_n
    q[:, real_n:] = 1e3  # padding that would win if it counted
    mean_keys = keys.mean(dim=2).reshape(n, -1)
    for best in (False, True):
        reprs = keys.reshape(n, -1) if best else mean_keys
        for each in (False, True):
            queries = [q[:, t] for t in range(real_n)] if each else [q[:, :real_n].mean(dim=1)]
            want = torch.tensor([max(sum(max(float(x[h] @ k) for k in keys[u, h]) for h in range(Hq)) if best
                                     else float(x.reshape(-1) @ mean_keys[u]) for x in queries) for u in range(n)],
                                dtype=torch.float64)
            got = kernels.score_units(q, reprs, real, best_token=best, each_query=each)
            assert torch.allclose(got, want, atol=1e-12), (best, each)
            # Two processes' shares of the heads: B's partial sums arrive through over_heads.
            half = lambda x: (x[:Hq // 2], x[Hq // 2:])  # noqa: E731
            (qa, qb), (ka, kb) = half(q), half(keys.transpose(0, 1))
            shares = [k.transpose(0, 1).reshape(n, -1) if best else k.transpose(0, 1).mean(dim=2).reshape(n, -1) for k in (ka, kb)]
            partial = []
            kernels.score_units(qb, shares[1], real, best, each, over_heads=lambda s: partial.append(s) or s)
            split = kernels.score_units(qa, shares[0], real, best, each, over_heads=lambda s: s + partial[0])
            assert torch.allclose(split, want, atol=1e-12), (best, each)
        one = q[:, :1]
        assert torch.equal(kernels.score_units(one, reprs, real[:1], best, each_query=True),
                           kernels.score_units(one, reprs, real[:1], best, each_query=False))


def test_snapshot_keeps_the_representative_keys_of_its_scoring(model64, tmp_path):
    """A snapshot holds repr_scoring=best's repr_topk keys per head and loads them back; a cache of the
    reference (one mean key per head) refuses it by their shape, whatever the header says (generate.py
    also compares the settings: lookup_queries, which stores nothing, is refused there)."""
    from infllm import SnapshotError, load_memory, save_memory
    cfg = dataclasses.replace(SMALL, repr_scoring="best")
    best = make_caches(model64, "infllm", cfg)
    run(model64, best, tokens(100, 70), cfg.chunk_size, tokens(0, 71))
    save_memory(tmp_path / "m.mem", best, {})
    back = make_caches(model64, "infllm", cfg)
    load_memory(tmp_path / "m.mem", back, {})
    n = best[0].units.count
    assert n > cfg.topk and torch.equal(back[0].units.reprs[:n], best[0].units.reprs[:n])
    assert back[0].units.reprs.shape[1] == ARGS.n_heads * cfg.repr_topk * ARGS.head_dim
    with pytest.raises(SnapshotError, match="reprs"):
        load_memory(tmp_path / "m.mem", make_caches(model64, "infllm", SMALL), {})


@pytest.mark.parametrize("kernel", ["plain", "blocked"])
def test_fp8_units_match_dense_oracle_with_their_rounding(model64, kernel):
    """unit_dtype=fp8: the oracle rounds each unit's keys and values through float8 e4m3 (a scale per unit
    and head) when the unit is made; everything else stays float64."""
    cfg = dataclasses.replace(SMALL, unit_dtype="fp8")
    prompt, dec = tokens(150, 40), tokens(16, 41)
    caches = make_caches(model64, "infllm", cfg, kernel=kernel)
    oracles = [DenseInfLLM(cfg, model64.rope.inv_freq) for _ in caches]
    ours = run(model64, caches, prompt, cfg.chunk_size, dec)
    ref = run(model64, oracles, prompt, cfg.chunk_size, dec)
    unrounded = run(model64, make_caches(model64, "infllm", SMALL, kernel=kernel), prompt, cfg.chunk_size, dec)
    assert (ours - ref).abs().max() < 1e-9
    assert (ours - unrounded).abs().max() > 1e-4, "the rounding must show, or this test tests nothing"
    assert caches[0].units.storage_k.dtype == torch.uint8 and caches[0].units.pool_k.dtype == torch.uint8


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


class LRUModel:
    """The eviction rule in plain Python: evict the least recently used unselected unit, ties to the
    lower unit number, only when the cache is full."""

    def __init__(self, slots):
        self.slots, self.last, self.clock, self.hits, self.misses = slots, {}, 0, 0, 0

    def fetch(self, units):
        self.clock += 1
        missing = [u for u in units if u not in self.last]
        self.hits += len(units) - len(missing)
        self.misses += len(missing)
        evictable = sorted((t, u) for u, t in self.last.items() if u not in units)
        for _, u in evictable[: max(0, len(self.last) + len(missing) - self.slots)]:
            del self.last[u]
        for u in units:
            self.last[u] = self.clock

    def order(self):
        return [u for _, u in sorted((t, u) for u, t in self.last.items())]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sets(st.integers(0, 9), min_size=1, max_size=3), min_size=1, max_size=30))
def test_lru_eviction_matches_plain_model(selections):
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
    assert (units.hits, units.misses) == (ref.hits, ref.misses)


def test_lru_evicts_the_least_recently_used():
    cfg = InfLLMConfig(block_size=1, topk=2, max_cached_block=3, n_local=2, exc_block_size=1, repr_topk=1)
    units = MemoryUnits(cfg, n_heads=1, n_kv_heads=1, head_dim=1, device="cpu", dtype=torch.float32)
    units.reserve(6)
    units.add(torch.arange(6.0).reshape(6, 1, 1, 1), torch.zeros(6, 1, 1, 1), torch.zeros(6, 1))
    for sel in ([0, 1], [2], [0], [3, 4]):  # 1 then 2 are the least recently used when 3, 4 arrive
        units.fetch(torch.tensor(sel))
    assert units.cached_units() == [0, 3, 4]
    units.fetch(torch.tensor([4, 5]))  # 0 is older than 3
    assert units.cached_units() == [3, 4, 5]
    assert (units.hits, units.misses) == (2, 6)


@pytest.mark.parametrize("text, words", [
    ("exc_block_size=64,n_local=32", "exc_block_size"),
    ("topk=40", "max_cached_block"),
    ("block_size=0", "block_size"),
    ("n_local=-5", "n_local"),
    ("topk=two", "integer"),
    ("frobnicate=3", "unknown"),
    ("repr_scoring=bogus", "repr_scoring='bogus' must be one of mean, best"),
    ("lookup_queries=all", "lookup_queries='all' must be one of mean, each"),
])
def test_impossible_settings_are_refused(text, words):
    with pytest.raises(ValueError) as e:
        InfLLMConfig.parse(text)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_batch_larger_than_one_is_refused(model64):
    with pytest.raises(ValueError, match="batch size 2"):
        model64(torch.zeros(2, 5, dtype=torch.long), make_caches(model64, "infllm", SMALL))
    assert isinstance(make_caches(model64, "infllm")[0], ContextMemory)


@pytest.mark.parametrize("attention", ["infllm", "stream"])
@pytest.mark.parametrize("kernel, wavefront", [("plain", 0), ("blocked", 0), ("plain", 1), ("blocked", 1)])
def test_fixed_shapes_match_dense_oracle(model64, attention, kernel, wavefront):
    """The forward CUDA graphs replay, without the graphs: every forward a padded piece of exc_block_size
    tokens or one token (so a chunk runs piece by piece through all layers), the number of real tokens a
    device count; each chunk's pieces one after another, or as a wavefront over the layers (layer l on
    piece s - l at step s). Padding, and the steps where a layer has no piece, change nothing:
    the dense float64 oracle's outputs, selections and representative keys, and the same statistics as
    unpadded forwards."""
    from generate import FixedShapes
    prompt, dec = tokens(157, 40), tokens(9, 41)  # a ragged tail: the last piece is padded
    caches = make_caches(model64, attention, SMALL, kernel=kernel)
    plain = make_caches(model64, attention, SMALL, kernel=kernel)
    for c in caches:
        c.trace = []
    oracles = [DenseInfLLM(SMALL, model64.rope.inv_freq, stream=attention == "stream") for _ in caches]
    fixed = FixedShapes(model64, caches, graphs=False, wavefront=wavefront)
    ours = run(model64, caches, prompt, SMALL.chunk_size, dec, forward=fixed)
    ref = run(model64, oracles, prompt, SMALL.chunk_size, dec)
    assert (ours - ref).abs().max() < 1e-9
    assert torch.equal(ours, run(model64, plain, prompt, SMALL.chunk_size, dec))
    assert [c.pos for c in caches] == [157 + 9] * len(caches)
    assert memory_stats(caches) == memory_stats(plain)
    if attention == "infllm":
        for c, o in zip(caches, oracles):
            assert c.trace == o.selections and c.units.count == len(o.reprs)
            assert torch.allclose(c.units.reprs[:c.units.count], torch.stack(o.reprs), atol=1e-12)


@pytest.mark.parametrize("stop_at", [0, 3, None])
def test_greedy_decoding_ahead_equals_decoding_step_by_step(model64, stop_at):
    """decode through FixedShapes chooses each greedy token on the device and queues its step before the host
    has seen it (decode_ahead); a stop token is then fed as padding and taken back. Against the same forward
    driven token by token (the host choosing): the same tokens, ended by a stop token (the first, a later one)
    or by max_new_tokens, and caches that go on alike: the same positions on host and device, statistics and
    selections, and the same logits for tokens fed after the answer."""
    from generate import FixedShapes, decode, prefill
    ids, more = tokens(120, 70).tolist()[0], tokens(9, 71)
    runs = []
    for ahead in (False, True):
        caches = make_caches(model64, "infllm", SMALL, kernel="blocked")
        for c in caches:
            c.trace = []
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
    from generate import FixedShapes, decode, prefill
    caches = make_caches(model64, "infllm", SMALL, kernel="blocked")
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
    from generate import FixedShapes, prefill
    model = random_model(dataclasses.replace(ARGS, n_layers=5), dtype=torch.float32, seed=5)
    caches = make_caches(model, "infllm", SMALL, kernel="blocked")
    runs = [[] for _ in model.layers]
    for layer, seen in zip(model.layers, runs):
        layer.register_forward_hook(lambda mod, args, out, seen=seen: seen.append(int(args[2])))
    prefill(model, caches, tokens(158, 42).tolist()[0], SMALL.chunk_size, forward=FixedShapes(model, caches, graphs=False, wavefront=5))
    pieces = [SMALL.exc_block_size] * 19 + [157 - 19 * SMALL.exc_block_size]
    assert runs == [pieces + [1]] * 5


@pytest.mark.parametrize("attention", ["infllm", "stream"])
def test_wavefront_prefill_equals_pieces_in_order(attention):
    """generate.prefill through FixedShapes with a wavefront (the whole prompt in one call: 20 pieces
    through 5 layers in 24 steps) leaves every layer's cache exactly as the pieces one after another do:
    the same logits after the prompt and after decoding, selections, statistics and state, bit for bit;
    the progress bar counts every prompt token once."""
    from generate import FixedShapes, decode, prefill
    model = random_model(dataclasses.replace(ARGS, n_layers=5), dtype=torch.float32, seed=5)
    ids = tokens(158, 42).tolist()[0]  # 157 tokens in 20 pieces, the last padded; the last token alone
    runs = []
    for wavefront in (0, 5):
        caches = make_caches(model, attention, SMALL, kernel="blocked")
        for c in caches:
            c.trace = []
        fixed = FixedShapes(model, caches, graphs=False, wavefront=wavefront)
        fed = []
        progress = type("Progress", (), {"update": lambda self, n: fed.append(n)})()
        logits = prefill(model, caches, ids, SMALL.chunk_size, progress, forward=fixed)
        new = decode(model, caches, logits, 6, forward=fixed)
        runs.append((logits, new, [c.trace for c in caches], memory_stats(caches), [c.snapshot() for c in caches]))
        assert sum(fed) == len(ids) and [c.pos for c in caches] == [len(ids) + 5] * 5
    (a, new_a, trace_a, stats_a, snap_a), (b, new_b, trace_b, stats_b, snap_b) = runs
    assert torch.equal(a, b) and new_a == new_b and trace_a == trace_b and stats_a == stats_b
    for x, y in zip(snap_a, snap_b):  # ring slots of tokens that left the window are free: only the rest count
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x if not k.startswith("ring_"))
        live = (x["ring_pos"] >= x["start_d"]) & (x["ring_pos"] < x["pos_d"])
        assert torch.equal(live, (y["ring_pos"] >= y["start_d"]) & (y["ring_pos"] < y["pos_d"])) and live.sum() > 0
        assert torch.equal(x["ring_pos"][live], y["ring_pos"][live])
        assert all(torch.equal(x[k][:, live], y[k][:, live]) for k in ("ring_k", "ring_kr", "ring_v", "ring_score"))
    if attention == "infllm":
        assert stats_a["misses"] > 0 and any(len(t) > 5 for t in trace_a)


def test_a_wave_cut_short_leaves_nothing_for_the_next_prompt():
    """A prefill interrupted mid-wave (Ctrl-C) leaves pieces inside the wavefront; the next prompt, read from
    the start in the same caches, must not see them: the same logits as in fresh caches."""
    from generate import FixedShapes, prefill
    model = random_model(dataclasses.replace(ARGS, n_layers=4), dtype=torch.float32, seed=6)
    first, second = tokens(120, 43).tolist()[0], tokens(100, 44).tolist()[0]

    class Interrupt:
        def __init__(self):
            self.steps = 0

        def update(self, n):
            self.steps += 1
            if self.steps == 6:
                raise KeyboardInterrupt

    caches = make_caches(model, "infllm", SMALL, kernel="blocked")
    fixed = FixedShapes(model, caches, graphs=False, wavefront=1)
    with pytest.raises(KeyboardInterrupt):
        prefill(model, caches, first, SMALL.chunk_size, Interrupt(), forward=fixed)
    for c in caches:
        c.reset()
    again = prefill(model, caches, second, SMALL.chunk_size, forward=fixed)
    fresh_caches = make_caches(model, "infllm", SMALL, kernel="blocked")
    fresh = prefill(model, fresh_caches, second, SMALL.chunk_size, forward=FixedShapes(model, fresh_caches, graphs=False, wavefront=1))
    assert torch.equal(again, fresh)


@pytest.mark.parametrize("attention", ["infllm", "stream"])
def test_reset_starts_a_new_sequence_in_the_same_buffers(model64, attention):
    first, second, dec = tokens(130, 7), tokens(110, 8), tokens(5, 9)
    reused = make_caches(model64, attention, SMALL)
    run(model64, reused, first, SMALL.chunk_size, dec)
    buffers = [c.ring_k.data_ptr() for c in reused]
    for c in reused:
        c.reset()
    a = run(model64, reused, second, SMALL.chunk_size, dec)
    fresh = make_caches(model64, attention, SMALL)
    b = run(model64, fresh, second, SMALL.chunk_size, dec)
    assert torch.equal(a, b)
    assert memory_stats(reused) == memory_stats(fresh)
    assert [c.ring_k.data_ptr() for c in reused] == buffers


@pytest.mark.parametrize("options", ["", ",repr_scoring=best,lookup_queries=each"])
def test_compiled_chunk_step_equals_plain_path_on_cpu(options):
    """The GPU path's torch.compile'd chunk step (lookup, LRU, retirement and attention in one compiled
    function) runs on the CPU too: same logits, selections and statistics as the specification, with the
    reference lookup and with the lookup options."""
    model = random_model(ARGS, dtype=torch.float32, seed=3)
    prompt, dec = tokens(150, 30), tokens(12, 31)
    cfg = InfLLMConfig.parse(SMALL_TEXT + options)
    plain, fast = make_caches(model, "infllm", cfg, "plain"), make_caches(model, "infllm", cfg, "compiled")
    for c in plain + fast:
        c.trace = []
    a, b = run(model, plain, prompt, cfg.chunk_size, dec), run(model, fast, prompt, cfg.chunk_size, dec)
    assert (a - b).abs().max() < 1e-4
    assert [c.trace for c in plain] == [c.trace for c in fast]
    assert memory_stats(plain) == memory_stats(fast) and memory_stats(fast)["misses"] > 0


@pytest.mark.parametrize("kernel", ["plain", "compiled"])
def test_caches_are_freed_without_the_cycle_collector(model64, kernel):
    """A cache holds a prompt's worth of (pinned) unit storage: it must go as soon as its last reference
    does, not when Python's cycle collector next runs, or a second prompt's caches double the memory."""
    import gc
    import weakref
    gc.collect()
    gc.disable()
    try:
        caches = make_caches(model64, "infllm", SMALL, kernel)
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

    from generate import decode, prefill
    model = random_model(ARGS, dtype=torch.float32, seed=4)
    model.compile_blocks()
    caches = make_caches(model, "infllm", SMALL, "compiled")
    graphs = []
    for n in (100, 157, 61, 290):  # a first prompt of 4 chunks plus a tail, then shorter and longer ones
        for c in caches:
            c.reset()
        logits = prefill(model, caches, tokens(n, n).tolist()[0], SMALL.chunk_size)
        decode(model, caches, logits, 4)
        graphs.append(counters["stats"]["unique_graphs"])
    assert caches[0].units.capacity > 100 // SMALL.block_size + 1  # the storage did grow
    assert graphs[1:] == [graphs[0]] * 3, f"unique graphs after each prompt: {graphs}"
