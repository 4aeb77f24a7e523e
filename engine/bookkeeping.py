"""The bookkeeping of a piece of the fixed-shape context memory (engine/memory.py), each step twice: a Triton
kernel for an eager GPU, and beside it its specification in PyTorch, `name_spec`, with the same arguments and
results. FixedShapeMemory picks one of the two per step once, in its table of ops (memory.pick_ops); the spec
runs on a CPU, in float64, compiled (inductor fuses it itself) and with kernel="plain". On an eager GPU the
PyTorch lines launch some 150 tiny kernels a piece, each covering the GPU; these few Triton kernels do the same.
In the order of a piece:
  piece_angles  the piece's positions, which of its queries are real, and their rotary angles
  ring_write    its keys and values into the ring (keys also rotated at their positions)
  window_mask   which ring slots each query sees (the local part's mask)
  unit_scores   the lookup's score of each unit (the mean query dotted with its representative key)
  select_top    the topk best units, ascending, and which are valid
  lru_fetch     the device pool's LRU: the slot of each selected unit, and the loads of the missing ones
  memory_part   keys, values and mask of the memory part (units, init tokens, far remainder)
  retire        tokens leaving the window to init, then to new units with their representative keys
tests/test_gpu.py checks each kernel against its spec: lru_fetch, select_top and unit_scores alone (hypothesis),
and all of them together through a prompt with evictions (test_bookkeeping_kernels_equal_their_specs).
"""
import torch

import kernels
from engine.layers import rotate_spec
from engine.storage import from_fp8

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU build of torch: the specs alone run
    triton = None


def piece_angles(pos_d, n, P, rope, dtype):
    """piece_angles_spec in one kernel (instead of 4)."""
    inv_freq = rope.inv_freq
    dev = inv_freq.device
    at = torch.empty(P, dtype=torch.long, device=dev)
    real = torch.empty(P, dtype=torch.bool, device=dev)
    half = inv_freq.shape[0]
    cos = torch.empty(P, 2 * half, dtype=dtype, device=dev)
    sin = torch.empty_like(cos)
    BT = min(32, max(2, triton.next_power_of_2(P)))  # positions per program (a decoding step's 1: 2 rows, not 32)
    _piece_angles_kernel[(-(-P // BT),)](pos_d, n, at, real, inv_freq, cos, sin, P, half, BT=BT,
                                         BH=triton.next_power_of_2(half))
    return at, real, (cos, sin)


def piece_angles_spec(pos_d, n, P, rope, dtype):
    """A piece of P queries at positions at = pos_d + arange(P), the first n real (pos_d and n device counts):
    (at, real, the angles of at as rope.angles gives them), for the piece's keys and its queries in the window."""
    t = torch.arange(P, device=pos_d.device)
    at = pos_d + t
    return at, t < n, rope.angles(at, dtype)


def ring_write(k, v, cos, sin, at, real, ring_k, ring_kr, ring_v, ring_score, ring_pos):
    """ring_write_spec in one kernel (instead of 7); the keys rotated as layers.rotate rotates them."""
    Hkv, T, D = k.shape
    k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v))
    BT = 32  # tokens per program
    _ring_write_kernel[(-(-T // BT), Hkv + 1)](k, v, cos, sin, at, real, ring_k, ring_kr, ring_v, ring_score, ring_pos,
                                              T, D // 2, ring_k.shape[1], ring_score.shape[0], k.stride(0), k.stride(1),
                                              v.stride(0), v.stride(1), BT=BT, BH=triton.next_power_of_2(D // 2),
                                              BQ=triton.next_power_of_2(ring_score.shape[0]))


def ring_write_spec(k, v, cos, sin, at, real, ring_k, ring_kr, ring_v, ring_score, ring_pos):
    """Keys k and values v [Hkv, T, D] of positions at into the ring, at slot position % ring size; the keys
    also rotated by cos and sin [T, D] (ring_kr); the slots' local scores zeroed; their positions set (-1:
    padding, which lands in slots of tokens that already left the ring, marked empty)."""
    new = at % ring_k.shape[1]
    ring_k.index_copy_(1, new, k)
    ring_kr.index_copy_(1, new, rotate_spec(k, cos, sin))
    ring_v.index_copy_(1, new, v)
    ring_score.index_fill_(1, new, 0.0)
    ring_pos.index_copy_(0, new, torch.where(real, at, -1))


def window_mask(ring_pos, at, real, n_local):
    """window_mask_spec in one kernel (instead of 6)."""
    T, R = at.shape[0], ring_pos.shape[0]
    mask = torch.empty(T, R, dtype=torch.bool, device=at.device)
    BT, BR = 32, 128
    _window_mask_kernel[(-(-T // BT), -(-R // BR))](ring_pos, at, real, mask, T, R, n_local, BT=BT, BR=BR)
    return mask


def window_mask_spec(ring_pos, at, real, n_local):
    """The local part's mask [T, R]: query t (at position at[t]) sees the ring slots that hold one of its n_local
    latest positions, up to its own; padding queries see none."""
    p = ring_pos
    return (p[None, :] <= at[:, None]) & (p[None, :] > at[:, None] - n_local) & (p >= 0)[None, :] & real[:, None]


def unit_scores(q_mem, real, reprs, n):
    """unit_scores_spec in two kernels that read the representative keys in their own dtype (the spec makes a
    float32 copy of all of them for every lookup). Never float64: the scores are float32."""
    Hq, T, D = q_mem.shape
    q_mem = q_mem if q_mem.stride(-1) == 1 else q_mem.contiguous()
    mean = torch.empty(Hq * D, dtype=torch.float32, device=q_mem.device)
    _mean_query_kernel[(Hq,)](q_mem, real, mean, T, D, q_mem.stride(0), q_mem.stride(1), BT=32,
                              BD=triton.next_power_of_2(D))
    rows = reprs.shape[0]
    scores = torch.empty(rows, dtype=torch.float32, device=q_mem.device)
    # Units per program: 4 keep every SM busy at 128K's 1,025 units; from some 8K units on, 16 a program read
    # faster (docs/benchmarks.md).
    BU, BK = (4, 512) if rows <= 4096 else (16, 256)
    _unit_scores_kernel[(-(-rows // BU),)](reprs, mean, scores, n, rows, Hq * D, BU=BU, BK=BK)
    return scores


def unit_scores_spec(q_mem, real, reprs, n):
    """kernels.score_units of every row of reprs [rows, Hq * D] for the queries q_mem [Hq, T, D] (real: not
    padding), -inf past the n units stored (a device count). -> [rows]."""
    scores = kernels.score_units(q_mem, reprs, real)
    stored = torch.arange(reprs.shape[0], device=scores.device) < n
    return scores.masked_fill(~stored, float("-inf"))


SELECT_MOST = 16384  # scores select_top ranks (units of 2M tokens; its work grows as their square); more go to the spec


def select_top(scores, topk, n, real, lookups):
    """select_top_spec in two kernels (instead of some 13: top-k, two sorts, copies, the valid entries, the lookup
    count), for more than topk and at most SELECT_MOST rows (else the spec). Ties between scores go to the lower
    row (torch.topk leaves them unspecified); the rows of entries that are not valid may differ from the spec's,
    and nothing reads them. A row is chosen when fewer than topk rows beat it: the first kernel counts that for
    blocks of rows side by side (a decoding step's 1,025 rows in 65 programs), a block stopping as soon as topk
    rows beat each of its rows (most blocks after a tile or two); the second lists the chosen rows in order. One
    program taking the best row topk times over was several times slower (docs/benchmarks.md)."""
    rows = scores.shape[0]
    if not topk < rows <= SELECT_MOST:
        return select_top_spec(scores, topk, n, real, lookups)
    units = torch.empty(topk, dtype=torch.long, device=scores.device)
    valid = torch.empty(topk, dtype=torch.bool, device=scores.device)
    chosen = torch.empty(rows, dtype=torch.int8, device=scores.device)
    BI, BJ = 16, 128  # rows ranked per program, rows compared with them at a time (tiles: docs/benchmarks.md)
    _rank_rows_kernel[(-(-rows // BI),)](scores, chosen, rows, K=topk, BI=BI, BJ=BJ, num_warps=2)
    _list_chosen_kernel[(1,)](chosen, real, n, lookups, units, valid, rows, real.shape[0], BR=2048,
                              BT=triton.next_power_of_2(real.shape[0]))
    return units, valid


def select_top_spec(scores, topk, n, real, lookups):
    """The lookup's selection: the topk best rows of scores [rows] (-inf past the n stored units), ascending
    (kernels.select_units); valid where the row is stored and some query is real (real [T] bool); the
    lookup count lookups (a device count) += 1 if any is valid."""
    units = kernels.select_units(scores, topk)
    valid = (units < n) & real.any()  # ascending: the stored units come first
    lookups += valid.any()
    return units, valid


LRU_MOST = 128  # slots lru_fetch ranks in one program (comparing every pair); a larger pool takes the spec


def lru_fetch(units, valid, unit_slot, slot_unit, slot_used, clock, hits, misses, load_units, load_slots, age_key):
    """lru_fetch_spec in one kernel of one program (instead of some 50 kernels). Among free slots it may pick
    another than the spec's argsort does: which free slot a unit takes changes no result."""
    K, S = units.shape[0], slot_used.shape[0] - 1
    victim = torch.empty_like(units)
    _lru_fetch_kernel[(1,)](units, valid, unit_slot, slot_unit, slot_used, clock, hits, misses, load_units, load_slots,
                            victim, K, S, unit_slot.shape[0] - 1, AGE=age_key, BK=triton.next_power_of_2(K),
                            BS=triton.next_power_of_2(S))
    return victim


def lru_fetch_spec(units, valid, unit_slot, slot_unit, slot_used, clock, hits, misses, load_units, load_slots, age_key):
    """The device pool's LRU for the selected units [K <= topk] (valid: entries that count): each valid unit's slot,
    a missing one evicting the least recently used unit not selected now (free slots first; among units last
    used together, the lower one). Updates the maps unit_slot [units + 1] and slot_unit, slot_used [S + 1]
    (last use, -1: free; the last entry of each is scratch), the clock and the hit and miss counts, and writes
    the copies to start: load_units [K], load_slots [K] (-1: nothing to load). Entries that are not valid take
    the scratch slot S and change nothing. Returns the slots [K]."""
    S = slot_used.shape[0] - 1
    clock += 1
    slots = torch.where(valid, unit_slot[units], -1)
    hit = slots >= 0  # a unit that is not stored never has a slot
    miss = valid & ~hit
    hits += hit.sum()
    misses += miss.sum()
    # Eviction order over slots: free ones first, then by age; slots of selected units never.
    age = slot_used[:S] * age_key + slot_unit[:S]
    protect = torch.where(hit, torch.iinfo(torch.long).max, torch.iinfo(torch.long).min)
    age.scatter_reduce_(0, slots.clamp(min=0), protect, reduce="amax")
    order = age.argsort()
    victim = torch.where(hit, slots, torch.where(miss, order[(miss.cumsum(0) - 1).clamp(min=0)], S))
    old = slot_unit[victim]
    scratch = unit_slot.shape[0] - 1
    unit_slot.index_fill_(0, torch.where(miss & (old >= 0), old, scratch), -1)
    K = units.shape[0]  # topk (fewer: a test's fetch)
    load_units[:K].copy_(units)
    load_slots[:K].copy_(torch.where(miss, victim, -1))
    load_slots[K:] = -1
    slot_unit[victim] = torch.where(valid, units, -1)
    unit_slot[torch.where(valid, units, scratch)] = torch.where(valid, victim, -1)
    slot_used[victim] = torch.where(valid, clock, -1)
    return victim


def memory_part(pool_k, pool_v, units, slots, valid, init_k, init_v, n_init_d, ring_k, ring_v, start_d, at, real, n_local,
                scales=None):
    """memory_part_spec in one kernel (instead of some 37); units in the model's dtype only (scales None)."""
    _, Hkv, B, D = pool_k.shape
    U, I, R, T = slots.shape[0] * B, init_k.shape[1], ring_k.shape[1], at.shape[0]
    M = U + I + T + B - 1
    k = torch.empty(Hkv, M, D, dtype=ring_k.dtype, device=ring_k.device)
    v = torch.empty_like(k)
    mask = torch.empty(T, M, dtype=torch.bool, device=ring_k.device)
    chosen = torch.empty_like(units)
    BJ = 64  # key slots per program
    _memory_part_kernel[(-(-M // BJ), Hkv + 1)](pool_k, pool_v, units, slots, valid, init_k, init_v, n_init_d, ring_k,
                                                ring_v, start_d, at, real, k, v, mask, chosen, n_local, Hkv, B, D, U, I,
                                                R, T, M, BJ=BJ, BT=32, BD=triton.next_power_of_2(D),
                                                BK=triton.next_power_of_2(slots.shape[0]))
    return k, v, mask, chosen


def memory_part_spec(pool_k, pool_v, units, slots, valid, init_k, init_v, n_init_d, ring_k, ring_v, start_d, at, real,
                     n_local, scales=None):
    """Keys and values [Hkv, M, D] of the memory part, in this order: the selected units from their device slots
    (fp8 units dequantised by their scales), the init tokens (n_init_d of them held), and the far remainder from
    the ring: the oldest recent tokens, of which at most T + block_size - 1 are out of some query's window. The
    mask [T, M] of the piece's queries at positions at (real: not padding), where a remainder token is seen by a
    query n_local or more tokens after it, so that every token is seen in exactly one part; and the selected
    units, -1 where not valid."""
    _, Hkv, B, D = pool_k.shape
    held = torch.arange(init_k.shape[1], device=init_k.device) < n_init_d
    mask_init = held[None, :] & real[:, None]
    far = start_d + torch.arange(at.shape[0] + B - 1, device=ring_k.device)
    mask_far = (at[:, None] - far[None, :] >= n_local) & real[:, None]
    k_units, v_units = pool_k[slots], pool_v[slots]
    if scales is not None:  # fp8 units: bytes, and a scale per unit, head and K/V
        scale = scales[units]
        k_units, v_units = from_fp8(k_units, scale[:, 0], init_k.dtype), from_fp8(v_units, scale[:, 1], init_k.dtype)
    k_units, v_units = (x.transpose(0, 1).reshape(Hkv, -1, D) for x in (k_units, v_units))
    mask_units = valid.repeat_interleave(B)[None, :] & real[:, None]
    R = ring_k.shape[1]
    return (torch.cat([k_units, init_k, ring_k[:, far % R]], dim=1), torch.cat([v_units, init_v, ring_v[:, far % R]], dim=1),
            torch.cat([mask_units, mask_init, mask_far], dim=1), torch.where(valid, units, -1))


def retire(ring_k, ring_v, ring_score, init_k, init_v, pos_d, start_d, n_init_d, memory_units, n_local, block_size,
           repr_topk, most_init, most_units):
    """retire_spec in two kernels (instead of some 50), its new units' keys and values staged on the device and
    written back to their storage on the side stream. Units in the model's dtype only. How many tokens and
    units move only the device knows: the first kernel reads the counters, the second (after it) moves them."""
    u = memory_units
    Hkv, R, D = ring_k.shape
    Hq, n_init = ring_score.shape[0], init_k.shape[1] - 1
    args = (pos_d, start_d, n_init_d, u.n, u.stage_rows, n_local, n_init, block_size, most_units)
    programs = most_units * Hq + (1 if most_init else 0)
    if programs:
        _retire_kernel[(programs,)](ring_k, ring_v, ring_score, init_k, init_v, u.reprs, u.stage_k, u.stage_v, R, D, Hkv,
                                    Hq, *args, RTOP=repr_topk, MOST_INIT=most_init,
                                    BB=triton.next_power_of_2(block_size), BD=triton.next_power_of_2(D),
                                    BI=triton.next_power_of_2(max(most_init, 1)))
    _retire_counters_kernel[(1,)](*args, u.stage_rows.shape[0], BS=triton.next_power_of_2(u.stage_rows.shape[0]))
    u._start_write_back()


def retire_spec(ring_k, ring_v, ring_score, init_k, init_v, pos_d, start_d, n_init_d, memory_units, n_local, block_size,
                repr_topk, most_init, most_units):
    """Tokens that left the window (the ring's oldest, from position start_d) fill init first; after that every
    full block_size run of them becomes a memory unit (memory_units.add; None: they are forgotten, the stream
    cache), its representative key chosen by the tokens' local scores (kernels.representative_keys). How many of
    each is known on the device only: a piece moves a fixed most of each (most_init, most_units), masked."""
    R, n_init, B = ring_k.shape[1], init_k.shape[1] - 1, block_size
    extra = pos_d - start_d - n_local  # tokens beyond the window
    take = torch.minimum(n_init - n_init_d, extra).clamp(min=0)
    if most_init:
        i = torch.arange(most_init, device=ring_k.device)
        src = (start_d + i) % R
        dst = torch.where(i < take, n_init_d + i, n_init)  # column n_init: scratch
        init_k.index_copy_(1, dst, ring_k[:, src])
        init_v.index_copy_(1, dst, ring_v[:, src])
        n_init_d += take
        start_d += take
    n_new = ((extra - take) // B).clamp(min=0)
    if memory_units is not None:
        src = (start_d + torch.arange(most_units * B, device=ring_k.device)) % R
        Hkv, _, D = ring_k.shape
        k = ring_k[:, src].reshape(Hkv, most_units, B, D).transpose(0, 1)
        v = ring_v[:, src].reshape(Hkv, most_units, B, D).transpose(0, 1)
        score = ring_score[:, src].reshape(ring_score.shape[0], most_units, B).transpose(0, 1)
        memory_units.add(k, v, kernels.representative_keys(k, score, repr_topk), n_new)
    start_d += n_new * B


# ----------------------------------------------------------------------------- Triton kernels (GPU only)

if triton is not None:
    # Triton compiles a kernel anew for each value class of its integer arguments (1, a multiple of 16, other).
    # Arguments that differ between a piece (T = 512) and a decoding step (T = 1), or grow with the prompt (the
    # units stored), are left unspecialised (do_not_specialize): one compile serves both, and a prompt of
    # another length compiles nothing (tests/test_gpu.py counts the compiles).
    from engine.layers import _angles

    @triton.jit(do_not_specialize=["T"])
    def _piece_angles_kernel(pos_d, n, at, real, inv_freq, cos, sin, T, HALF, BT: tl.constexpr, BH: tl.constexpr):
        t = tl.program_id(0) * BT + tl.arange(0, BT)
        p = tl.load(pos_d) + t
        tl.store(at + t, p, mask=t < T)
        tl.store(real + t, t < tl.load(n), mask=t < T)
        _angles(p, t, inv_freq, cos, sin, T, HALF, BH)

    @triton.jit(do_not_specialize=["T"])
    def _ring_write_kernel(k, v, cos, sin, at, real, ring_k, ring_kr, ring_v, ring_score, ring_pos, T, HALF, R, HQ,
                           SKH, SKT, SVH, SVT, BT: tl.constexpr, BH: tl.constexpr, BQ: tl.constexpr):
        tb, h = tl.program_id(0), tl.program_id(1)
        t = tb * BT + tl.arange(0, BT)
        pos = tl.load(at + t, mask=t < T, other=0)
        slot = pos % R  # padding lands in slots of tokens that already left the ring, marked empty below
        if h < tl.num_programs(1) - 1:  # key head h
            i = tl.arange(0, BH)
            ok = (t < T)[:, None] & (i < HALF)[None, :]
            src, dst = k + h * SKH + t[:, None] * SKT + i[None, :], (h * R + slot)[:, None] * 2 * HALF + i[None, :]
            x1, x2 = tl.load(src, mask=ok, other=0.0), tl.load(src + HALF, mask=ok, other=0.0)
            tl.store(ring_k + dst, x1, mask=ok)
            tl.store(ring_k + dst + HALF, x2, mask=ok)
            a = t[:, None] * 2 * HALF + i[None, :]
            c = tl.load(cos + a, mask=ok, other=0.0).to(tl.float32)
            s = tl.load(sin + a, mask=ok, other=0.0).to(tl.float32)
            x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
            tl.store(ring_kr + dst, (x1 * c - x2 * s).to(ring_kr.dtype.element_ty), mask=ok)
            tl.store(ring_kr + dst + HALF, (x2 * c + x1 * s).to(ring_kr.dtype.element_ty), mask=ok)
            src = v + h * SVH + t[:, None] * SVT + i[None, :]
            tl.store(ring_v + dst, tl.load(src, mask=ok), mask=ok)
            tl.store(ring_v + dst + HALF, tl.load(src + HALF, mask=ok), mask=ok)
        else:  # the slots' positions and local scores
            live = tl.load(real + t, mask=t < T, other=0) != 0
            tl.store(ring_pos + slot, tl.where(live, pos, -1), mask=t < T)
            q = tl.arange(0, BQ)
            tl.store(ring_score + q[:, None] * R + slot[None, :], tl.zeros([BQ, BT], tl.float32),
                     mask=(q < HQ)[:, None] & (t < T)[None, :])

    @triton.jit(do_not_specialize=["T"])
    def _window_mask_kernel(ring_pos, at, real, mask, T, R, n_local, BT: tl.constexpr, BR: tl.constexpr):
        t = tl.program_id(0) * BT + tl.arange(0, BT)
        r = tl.program_id(1) * BR + tl.arange(0, BR)
        q_at = tl.load(at + t, mask=t < T, other=0)
        live = tl.load(real + t, mask=t < T, other=0) != 0
        p = tl.load(ring_pos + r, mask=r < R, other=-1)
        seen = ((p[None, :] <= q_at[:, None]) & (p[None, :] > q_at[:, None] - n_local) & (p >= 0)[None, :]
                & live[:, None])
        tl.store(mask + t[:, None] * R + r[None, :], seen, mask=(t < T)[:, None] & (r < R)[None, :])

    @triton.jit(do_not_specialize=["T"])
    def _mean_query_kernel(q, real, mean, T, D, SQH, SQT, BT: tl.constexpr, BD: tl.constexpr):
        h, d = tl.program_id(0), tl.arange(0, BD)
        acc = tl.zeros([BD], tl.float32)
        count = tl.zeros([BT], tl.float32)
        for t0 in range(0, T, BT):
            t = t0 + tl.arange(0, BT)
            live = (tl.load(real + t, mask=t < T, other=0) != 0) & (t < T)
            x = tl.load(q + h * SQH + t[:, None] * SQT + d[None, :], mask=live[:, None] & (d < D)[None, :], other=0.0)
            acc += tl.sum(x.to(tl.float32), axis=0)
            count += live.to(tl.float32)
        tl.store(mean + h * D + d, acc / tl.maximum(tl.sum(count, axis=0), 1.0), mask=d < D)

    @triton.jit(do_not_specialize=["ROWS"])
    def _unit_scores_kernel(reprs, mean, scores, n, ROWS, K, BU: tl.constexpr, BK: tl.constexpr):
        u = tl.program_id(0) * BU + tl.arange(0, BU)
        acc = tl.zeros([BU], tl.float32)
        for k0 in range(0, K, BK):
            k = k0 + tl.arange(0, BK)
            w = tl.load(mean + k, mask=k < K, other=0.0)
            x = tl.load(reprs + u[:, None].to(tl.int64) * K + k[None, :], mask=(u < ROWS)[:, None] & (k < K)[None, :],
                        other=0.0)
            acc += tl.sum(x.to(tl.float32) * w[None, :], axis=1)
        tl.store(scores + u, tl.where(u < tl.load(n), acc, float("-inf")), mask=u < ROWS)

    @triton.jit(do_not_specialize=["ROWS"])
    def _rank_rows_kernel(scores, chosen, ROWS, K: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr):
        i = tl.program_id(0) * BI + tl.arange(0, BI)
        x = tl.load(scores + i, mask=i < ROWS, other=float("-inf"))
        beaten = tl.where(i < ROWS, 0, K)  # rows that beat row i: a higher score, or the same one and a lower row
        j0 = 0
        while (j0 < ROWS) & (tl.min(beaten, axis=0) < K):  # until each row is out or every row was compared
            j = j0 + tl.arange(0, BJ)
            y = tl.load(scores + j, mask=j < ROWS, other=float("-inf"))
            beats = ((y[None, :] > x[:, None]) | ((y[None, :] == x[:, None]) & (j[None, :] < i[:, None])))
            beaten += tl.sum((beats & (j < ROWS)[None, :]).to(tl.int32), axis=1)
            j0 += BJ
        tl.store(chosen + i, (beaten < K).to(tl.int8), mask=i < ROWS)

    @triton.jit(do_not_specialize=["ROWS", "T"])
    def _list_chosen_kernel(chosen, real, n, lookups, units, valid, ROWS, T, BR: tl.constexpr, BT: tl.constexpr):
        t = tl.arange(0, BT)
        some = tl.max((tl.load(real + t, mask=t < T, other=0) != 0).to(tl.int32), axis=0) > 0
        stored = tl.load(n)
        before = 0  # chosen rows below this stretch: where its first one goes
        looked = 0
        for r0 in range(0, ROWS, BR):
            i = r0 + tl.arange(0, BR)
            c = tl.load(chosen + i, mask=i < ROWS, other=0).to(tl.int32)
            at = before + tl.cumsum(c, axis=0) - 1
            ok = (c > 0) & (i < stored) & some
            tl.store(units + at, i.to(tl.int64), mask=c > 0)
            tl.store(valid + at, ok, mask=c > 0)
            looked = tl.maximum(looked, tl.max(ok.to(tl.int32), axis=0))
            before += tl.sum(c, axis=0)
        tl.store(lookups, tl.load(lookups) + looked.to(tl.int64))

    @triton.jit(do_not_specialize=["SCRATCH"])
    def _lru_fetch_kernel(units, valid, unit_slot, slot_unit, slot_used, clock, hits, misses, load_units, load_slots,
                          victim, K, S, SCRATCH, AGE: tl.constexpr, BK: tl.constexpr, BS: tl.constexpr):
        k, s = tl.arange(0, BK), tl.arange(0, BS)
        in_k, in_s = k < K, s < S
        u = tl.load(units + k, mask=in_k, other=0)
        ok = (tl.load(valid + k, mask=in_k, other=0) != 0) & in_k
        slot = tl.where(ok, tl.load(unit_slot + u, mask=ok, other=-1), -1)
        hit, miss = slot >= 0, ok & (slot < 0)
        now = tl.load(clock) + 1
        # Eviction order as in fetch: free slots first, then by last use, then by unit; never a slot selected now.
        age = tl.load(slot_used + s, mask=in_s, other=0) * AGE + tl.load(slot_unit + s, mask=in_s, other=0)
        protected = tl.sum((hit[None, :] & (slot[None, :] == s[:, None])).to(tl.int32), axis=1) > 0
        age = tl.where(protected | (s >= S), 1 << 62, age)
        # Each slot's rank in that order (ties by slot): the j-th miss takes the slot of rank j.
        before = (age[None, :] < age[:, None]) | ((age[None, :] == age[:, None]) & (s[None, :] < s[:, None]))
        rank = tl.sum(before.to(tl.int32), axis=1)
        j = tl.cumsum(miss.to(tl.int32), axis=0) - 1
        pick = tl.sum(tl.where(rank[None, :] == j[:, None], s[None, :], 0), axis=1)
        v = tl.where(hit, slot, tl.where(miss, pick, S))  # slot S: scratch
        old = tl.load(slot_unit + v, mask=in_k, other=-1)
        # Every read is done: the writes below cannot change what it read.
        tl.store(clock, now)
        tl.store(hits, tl.load(hits) + tl.sum(hit.to(tl.int64), axis=0))
        tl.store(misses, tl.load(misses) + tl.sum(miss.to(tl.int64), axis=0))
        tl.store(victim + k, v, mask=in_k)
        tl.store(load_units + k, u, mask=in_k)
        tl.store(load_slots + k, tl.where(miss, v, -1), mask=in_k)
        tl.store(unit_slot + old, tl.full([BK], -1, tl.int64), mask=miss & (old >= 0))
        tl.store(slot_unit + v, tl.where(ok, u, -1), mask=in_k)
        tl.store(unit_slot + tl.where(ok, u, SCRATCH), tl.where(ok, v, -1), mask=in_k)
        tl.store(slot_used + v, tl.where(ok, now, -1), mask=in_k)

    @triton.jit
    def _three_sources(unit, init, ring, dst, at_unit, at_init, at_far, out, is_unit, is_init, is_far, ok, ok_j):
        # Each row comes from one of the three (the other two loads are masked off and add zeros).
        x = (tl.load(unit + at_unit, mask=is_unit[:, None] & ok, other=0.0)
             + tl.load(init + at_init, mask=is_init[:, None] & ok, other=0.0)
             + tl.load(ring + at_far, mask=is_far[:, None] & ok, other=0.0))
        tl.store(dst + out, x, mask=ok_j)

    @triton.jit(do_not_specialize=["T", "M"])
    def _memory_part_kernel(pool_k, pool_v, units, slots, valid, init_k, init_v, n_init_d, ring_k, ring_v, start_d, at,
                            real, k, v, mask, chosen, n_local, HKV, B, D, U, I, R, T, M,
                            BJ: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr):
        jb, h = tl.program_id(0), tl.program_id(1)
        j = jb * BJ + tl.arange(0, BJ)
        is_unit, is_init, is_far = j < U, (j >= U) & (j < U + I), (j >= U + I) & (j < M)
        unit_i = tl.where(is_unit, j // B, 0)
        far_pos = tl.load(start_d) + tl.where(is_far, j - U - I, 0)  # the far remainder's positions
        if h < HKV:  # key head h's keys and values of this block of slots
            d = tl.arange(0, BD)
            ok = (d < D)[None, :]
            at_unit = ((tl.load(slots + unit_i, mask=is_unit, other=0) * HKV + h) * B + j % B)[:, None] * D + d[None, :]
            at_init = (h * I + tl.where(is_init, j - U, 0))[:, None] * D + d[None, :]
            at_far = (h * R + far_pos % R)[:, None] * D + d[None, :]
            out = (h * M + j)[:, None] * D + d[None, :]
            ok_j = (j < M)[:, None] & ok
            _three_sources(pool_k, init_k, ring_k, k, at_unit, at_init, at_far, out, is_unit, is_init, is_far, ok, ok_j)
            _three_sources(pool_v, init_v, ring_v, v, at_unit, at_init, at_far, out, is_unit, is_init, is_far, ok, ok_j)
        else:  # the mask: a valid unit, an init token held, a far token n_local or more behind the query
            seen = ((is_unit & (tl.load(valid + unit_i, mask=is_unit, other=0) != 0))
                    | (is_init & (j - U < tl.load(n_init_d))) | is_far)
            if jb == 0:  # the selected units, -1 where not valid
                u = tl.arange(0, BK)
                ok_u = u < U // B
                chosen_u = tl.load(units + u, mask=ok_u, other=-1)
                tl.store(chosen + u, tl.where(tl.load(valid + u, mask=ok_u, other=0) != 0, chosen_u, -1), mask=ok_u)
            for t0 in range(0, T, BT):
                t = t0 + tl.arange(0, BT)
                q_at = tl.load(at + t, mask=t < T, other=0)
                q_real = tl.load(real + t, mask=t < T, other=0) != 0
                m = (seen[None, :] & q_real[:, None]
                     & (~is_far[None, :] | (q_at[:, None] - far_pos[None, :] >= n_local)))
                tl.store(mask + t[:, None] * M + j[None, :], m, mask=(t < T)[:, None] & (j < M)[None, :])

    @triton.jit
    def _retiring(pos_d, start_d, n_init_d, n_units, n_local, n_init, B):
        """From the counters: where the oldest recent token sits, init tokens held, units stored, and how many
        tokens go to init (take) and units are made (n_new) now, as _retire decides them."""
        start, held, n = tl.load(start_d), tl.load(n_init_d), tl.load(n_units)
        extra = tl.load(pos_d) - start - n_local  # tokens beyond the window
        take = tl.maximum(tl.minimum(n_init - held, extra), 0)
        n_new = tl.maximum(extra - take, 0) // B
        return start, held, n, take, n_new

    @triton.jit
    def _retire_kernel(ring_k, ring_v, ring_score, init_k, init_v, reprs, stage_k, stage_v, R, D, HKV, HQ,
                       pos_d, start_d, n_init_d, n_units, stage_rows, n_local, n_init, B, MOST_UNITS,
                       RTOP: tl.constexpr, MOST_INIT: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr, BI: tl.constexpr):
        p = tl.program_id(0)
        start, held, n, take, n_new = _retiring(pos_d, start_d, n_init_d, n_units, n_local, n_init, B)
        d = tl.arange(0, BD)
        if p < MOST_UNITS * HQ:  # unit m, query head h
            m, h = p // HQ, p % HQ
            b = tl.arange(0, BB)
            inside = b < B
            slot = (start + take + m * B + b) % R
            if m < n_new:
                # The repr_topk keys of the highest local score for head h (ties: the earlier token), averaged.
                sc = tl.load(ring_score + h * R + slot, mask=inside, other=float("-inf"))
                before = (sc[None, :] > sc[:, None]) | ((sc[None, :] == sc[:, None]) & (b[None, :] < b[:, None]))
                best = (tl.sum(before.to(tl.int32), axis=1) < RTOP) & inside
                kv = h // (HQ // HKV)
                ok = best[:, None] & (d < D)[None, :]
                keys = tl.load(ring_k + kv * R * D + slot[:, None] * D + d[None, :], mask=ok, other=0.0).to(tl.float32)
                tl.store(reprs + (n + m) * HQ * D + h * D + d, (tl.sum(keys, axis=0) / RTOP).to(reprs.dtype.element_ty),
                         mask=d < D)
                if h < HKV:  # the unit's keys and values of key head h, staged for the write-back
                    ok = inside[:, None] & (d < D)[None, :]
                    src = h * R * D + slot[:, None] * D + d[None, :]
                    dst = (m * HKV + h) * B * D + b[:, None] * D + d[None, :]
                    tl.store(stage_k + dst, tl.load(ring_k + src, mask=ok), mask=ok)
                    tl.store(stage_v + dst, tl.load(ring_v + src, mask=ok), mask=ok)
                if h == 0:
                    tl.store(stage_rows + m, n + m)
            elif h == 0:
                tl.store(stage_rows + m, -1)  # no unit: nothing crosses PCIe
        else:  # the tokens that fill init, every key head
            i = tl.arange(0, BI)
            ok = (i < tl.minimum(take, MOST_INIT))[:, None] & (d < D)[None, :]
            src = ((start + i) % R)[:, None] * D + d[None, :]
            dst = (held + i)[:, None] * D + d[None, :]
            for kv in range(0, HKV):
                tl.store(init_k + kv * (n_init + 1) * D + dst, tl.load(ring_k + kv * R * D + src, mask=ok), mask=ok)
                tl.store(init_v + kv * (n_init + 1) * D + dst, tl.load(ring_v + kv * R * D + src, mask=ok), mask=ok)

    @triton.jit
    def _retire_counters_kernel(pos_d, start_d, n_init_d, n_units, stage_rows, n_local, n_init, B, MOST_UNITS, NSTAGE,
                                BS: tl.constexpr):
        start, held, n, take, n_new = _retiring(pos_d, start_d, n_init_d, n_units, n_local, n_init, B)
        tl.store(n_init_d, held + take)
        tl.store(start_d, start + take + n_new * B)
        tl.store(n_units, n + n_new)
        j = tl.arange(0, BS)
        tl.store(stage_rows + j, tl.full([BS], -1, tl.int64), mask=(j >= MOST_UNITS) & (j < NSTAGE))
