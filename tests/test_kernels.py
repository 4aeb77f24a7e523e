"""The attention kernels of kernels.py (and the engine's table of them, engine/attention.py) against full attention
and against each other, on random shapes (hypothesis), on a CPU. tests/test_gpu.py runs the GPU kernels."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from engine import storage
from engine.attention import CHUNK_ATTENTION


def dense_softmax_attention(q, k, v, mask):
    """Textbook attention per query head, float64: softmax(q k^T / sqrt(d) + mask) v."""
    G = q.shape[0] // k.shape[0]
    out = torch.empty_like(q)
    for h in range(q.shape[0]):
        s = q[h] @ k[h // G].T / math.sqrt(q.shape[-1])
        out[h] = torch.softmax(s.masked_fill(~mask, -math.inf), -1) @ v[h // G]
    return out


shapes = st.fixed_dictionaries({
    "n_kv": st.integers(1, 3), "group": st.sampled_from([1, 2, 4]), "T": st.integers(1, 40),
    "L": st.integers(0, 50), "M": st.integers(0, 30), "D": st.sampled_from([2, 8, 16]),
    "seed": st.integers(0, 2**16), "block": st.integers(1, 17),
})


def random_case(p, dtype=torch.float64):
    g = torch.Generator().manual_seed(p["seed"])
    Hq, Hkv, T, D = p["n_kv"] * p["group"], p["n_kv"], p["T"], p["D"]
    L = p["L"] + T  # the window holds the chunk itself
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    ml = torch.rand(T, L, generator=g) > 0.4
    ml[torch.arange(T), L - T + torch.arange(T)] = True  # every query sees itself
    mm = torch.rand(T, p["M"], generator=g) > 0.5
    return (r(Hq, T, D), r(Hkv, L, D), r(Hkv, L, D), ml, r(Hq, T, D), r(Hkv, p["M"], D), r(Hkv, p["M"], D), mm)


@settings(max_examples=80, deadline=None)
@given(shapes)
def test_two_parts_equal_one_softmax_over_their_union(p):
    """With the same queries for both parts, the merged attention is full attention over the union
    of keys; the column sums are that softmax's probabilities summed over queries."""
    ql, kl, vl, ml, _, km, vm, mm = random_case(p)
    out, col = kernels.chunk_attention(ql, kl, vl, ml, ql, km, vm, mm)
    k, v, mask = torch.cat([kl, km], 1), torch.cat([vl, vm], 1), torch.cat([ml, mm], 1)
    assert torch.allclose(out, dense_softmax_attention(ql, k, v, mask), atol=1e-12)
    G = ql.shape[0] // kl.shape[0]
    for h in range(ql.shape[0]):
        s = (ql[h] @ k[h // G].T / math.sqrt(ql.shape[-1])).masked_fill(~mask, -math.inf)
        probs = torch.softmax(s, -1)[:, : kl.shape[1]]
        assert torch.allclose(col[h].double(), probs.sum(0), atol=1e-6)


@settings(max_examples=80, deadline=None)
@given(shapes)
def test_blocked_kernel_equals_plain(p):
    args = random_case(p)
    a_out, a_col = kernels.chunk_attention(*args)
    b_out, b_col = kernels.chunk_attention_blocked(*args, block=p["block"])
    assert torch.allclose(a_out, b_out, atol=1e-12) and torch.allclose(a_col, b_col, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(shapes, st.sampled_from(sorted(CHUNK_ATTENTION)))
def test_every_chunk_attention_of_the_engine_equals_plain(p, kernel):
    """Each entry of the engine's table, called as FixedShapeMemory calls it (the local part, then the memory
    part), on a CPU: the GPU kernels ("triton", and "flex" fused) fall back to the PyTorch paths here."""
    args = random_case(p)
    local, memory = CHUNK_ATTENTION[kernel]
    a_out, a_col = kernels.chunk_attention(*args)
    b_out, b_col = memory(local(*args[:4]), *args[4:])
    assert torch.allclose(a_out, b_out, atol=1e-6) and torch.allclose(a_col, b_col, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_flex_kernel_equals_plain(p):
    """FlexAttention in two parts, merged by log-sum-exp, with the column sums recomputed from the merged
    log-sum-exp (on a CPU FlexAttention runs unfused; the GPU test runs the fused kernels)."""
    args = random_case(p)
    a_out, a_col = kernels.chunk_attention(*args)
    b_out, b_col = kernels.chunk_attention_flex(*args)
    # FlexAttention on a CPU (unfused) is not exact in float64: errors near 1e-7, so 1e-6, not 1e-12.
    assert torch.allclose(a_out, b_out, atol=1e-6) and torch.allclose(a_col, b_col, atol=1e-6)


windows = st.fixed_dictionaries({
    "n_kv": st.integers(1, 2), "group": st.sampled_from([1, 3]), "T": st.integers(1, 300),
    "N": st.integers(1, 400), "pos": st.integers(0, 900), "units": st.integers(0, 3), "held": st.integers(0, 128),
    "seed": st.integers(0, 2**16),
})


def window_case(p, dtype=torch.float64, device="cpu", D=16):
    """Masks shaped like ContextMemory's, at FlexAttention's block scale (128): a band over the window
    (most of its blocks seen by every query), units that are valid or not as a whole, init tokens held,
    and a far remainder that some queries see."""
    g = torch.Generator().manual_seed(p["seed"])
    Hq, Hkv, T, N = p["n_kv"] * p["group"], p["n_kv"], p["T"], p["N"]
    t, i = torch.arange(T)[:, None], torch.arange(N + T)[None, :]
    ml = (i > t) & (i <= N + t) & (i >= N - p["pos"])
    valid = torch.rand(p["units"], generator=g) > 0.3
    far = torch.arange(200)[None, :] < (t + torch.randint(0, 200, (1,), generator=g))
    mm = torch.cat([valid.repeat_interleave(128)[None, :].expand(T, -1),
                    (torch.arange(128) < p["held"])[None, :].expand(T, -1), far], dim=1)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device, dtype)  # noqa: E731
    M = mm.shape[1]
    return (r(Hq, T, D), r(Hkv, N + T, D), r(Hkv, N + T, D), ml.to(device), r(Hq, T, D), r(Hkv, M, D),
            r(Hkv, M, D), mm.to(device))


@settings(max_examples=25, deadline=None)
@given(windows)
def test_flex_block_mask_on_window_shaped_masks(p):
    """Where whole 128-blocks are seen or unseen, FlexAttention skips or takes them without reading the
    mask (kernels.block_mask); the result must not change."""
    args = window_case(p)
    a_out, a_col = kernels.chunk_attention(*args)
    b_out, b_col = kernels.chunk_attention_flex(*args)
    assert torch.allclose(a_out, b_out, atol=1e-6) and torch.allclose(a_col, b_col, atol=1e-6)


def test_compiled_flex_on_cpu_or_a_clean_skip():
    """The fused FlexAttention path under torch.compile on a CPU, against the float64 plain path. Inductor's
    CPU lowering cannot return the log-sum-exp yet (torch 2.13), which ContextMemory works around by running
    FlexAttention unfused there; this says so as a skip, and checks the fusion once a torch can do it."""
    args = window_case(dict(n_kv=2, group=4, T=40, N=200, pos=100, units=2, held=50, seed=0), dtype=torch.float32)
    try:
        out, col = torch.compile(kernels.chunk_attention_flex, dynamic=False)(*args)
    except Exception as e:  # inductor wraps its lowering's NotImplementedError
        if "return_lse" in str(e) and "not supported" in str(e):
            pytest.skip("inductor's CPU FlexAttention cannot return the log-sum-exp yet")
        raise
    ref_out, ref_col = kernels.chunk_attention(*(a.double() if a.is_floating_point() else a for a in args))
    assert torch.allclose(out.double(), ref_out, atol=1e-5) and torch.allclose(col.double(), ref_col, atol=1e-5)


def test_block_mask_classifies_blocks():
    m = torch.zeros(200, 300, dtype=torch.bool)
    m[:, :128] = True  # seen by every query: full
    m[5, 130] = True  # seen by one query: partial
    m[:150, 256:] = True  # a short last block is never full (flex must not read past the keys)
    bm = kernels.block_mask(m)
    partial = [set(bm.kv_indices[0, 0, r, :n].tolist()) for r, n in enumerate(bm.kv_num_blocks[0, 0].tolist())]
    full = [set(bm.full_kv_indices[0, 0, r, :n].tolist()) for r, n in enumerate(bm.full_kv_num_blocks[0, 0].tolist())]
    assert full == [{0}, {0}] and partial == [{1, 2}, {2}]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_blocked_kernel_low_precision(dtype, tol):
    p = dict(n_kv=2, group=4, T=64, L=200, M=70, D=64, seed=3, block=32)
    args64 = random_case(p)
    args = [a.to(dtype) if a.is_floating_point() else a for a in args64]
    ref, ref_col = kernels.chunk_attention(*args64)
    out, col = kernels.chunk_attention_blocked(*args, block=p["block"])
    assert out.dtype == dtype
    assert (out.double() - ref).abs().max() < tol and (col.double() - ref_col).abs().max() < tol * 10


def test_causal_attention_matches_dense():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 5, 8, generator=g), torch.randn(1, 2, 9, 8, generator=g), torch.randn(1, 2, 9, 8, generator=g)
    mask = torch.ones(5, 9, dtype=torch.bool).tril(4)
    ref = dense_softmax_attention(q[0].double(), k[0].double(), v[0].double(), mask)
    assert torch.allclose(kernels.causal_attention(q, k, v)[0].double(), ref, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 30), st.integers(1, 8), st.integers(1, 5), st.integers(0, 2**16))
def test_select_units_picks_the_best(n, topk, real, seed):
    """Units scored by the mean of a piece's real queries (padding after them ignored), the best kept."""
    g = torch.Generator().manual_seed(seed)
    q, reprs = torch.randn(4, 5, 8, generator=g), torch.randn(n, 32, generator=g)
    scores = kernels.score_units(q, reprs, torch.arange(5) < real)
    assert torch.allclose(scores, reprs @ q[:, :real].mean(1).reshape(-1), atol=1e-5)
    chosen = kernels.select_units(scores, topk).tolist()
    assert chosen == sorted(chosen) and len(chosen) == min(n, topk)
    others = [i for i in range(n) if i not in chosen]
    if others:
        assert min(scores[chosen]) >= max(scores[others])


@settings(max_examples=300, deadline=None)
@given(base=st.integers(4096, 1 << 40), row_bytes=st.integers(1, 70000), rows=st.integers(1, 400),
       cuts=st.lists(st.integers(1, 399), max_size=12))
def test_lock_spans_cover_the_rows_and_share_no_page(base, row_bytes, rows, cuts):
    """Host storage page-locked in slices of rows (MemoryUnits.pin): the spans registered one after the
    other tile the storage exactly, never share a page (a second registration of a page fails), and once
    rows [0, r) are locked every byte of them lies in a registered span."""
    page = storage.PAGE
    bounds = [0] + sorted({c for c in cuts if c < rows}) + [rows]
    spans = [storage.lock_span(base, row_bytes, rows, r0, r1) for r0, r1 in zip(bounds, bounds[1:])]
    spans = [(s, e) for s, e in spans if e > s]  # lock_rows registers nothing for an empty span
    assert spans[0][0] == base and spans[-1][1] == base + rows * row_bytes
    for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
        assert e0 == s1 and s1 % page == 0  # contiguous, each cut on a page boundary
        assert (e0 - 1) // page < s1 // page  # so no page in both
    for r in bounds[1:]:
        locked_to = max(e for s, e in spans if s < base + r * row_bytes) if r else base
        assert locked_to >= base + r * row_bytes
