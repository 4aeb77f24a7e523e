"""The engine's chunk attention: the CHUNK_ATTENTION table, and the Triton kernels of the eager GPU path.

Each entry of CHUNK_ATTENTION computes kernels.chunk_attention (the specification) as a (local part, memory
part) pair, which FixedShapeMemory calls with the selected units' copies running between the two:
  "plain"     kernels.chunk_attention itself;
  "blocked"   kernels.chunk_attention_blocked (a CPU's path);
  "triton"    one Triton flash-attention kernel over both parts on a GPU, _two_part_attention (the eager GPU
              path; the blocked kernel elsewhere);
  "compiled"  the blocked kernel in one block, compiled together with the rest of the piece step (inductor
              fuses the masking, softmax and column-sum passes over the probabilities);
  "flex"      FlexAttention, compiled with the piece step on a GPU (fused kernels); on a CPU it runs unfused.
The GPU paths take their local column sums from the Triton column_sums (the Triton kernel's decoding step from
its own range merge). tests/test_gpu.py checks each against kernels.chunk_attention in float64 (hypothesis:
test_triton_attention_equals_plain, test_fused_flex_equals_plain, test_column_sums_kernel_equals_plain).
"""
import functools
import math

import torch

import kernels

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU build of torch: the table's GPU paths fall back to the blocked kernel
    triton = None


def chunk_attention_triton(q_local, k_local, v_local, mask_local, q_mem, k_mem, v_mem, mask_mem):
    """kernels.chunk_attention for the eager GPU path as one Triton kernel (_two_part_attention_kernel): flash
    attention over the local keys, then the memory keys, in one online softmax, each part scored with its own
    queries. It copies no keys or values per query head and builds no additive mask (it reads the boolean mask
    tile by tile). The local column sums come from column_sums with the kernel's log-sum-exp, or for a few
    queries (a decoding step) from the logits the kernel kept, in its range merge. Same results as
    chunk_attention up to the rounding of the probabilities to the input dtype (bf16) before they weigh the
    values. A decoding step takes it too, its keys split over many programs; a CPU or float64 take the blocked
    kernel."""
    if not q_local.is_cuda or q_local.dtype == torch.float64:
        return kernels.chunk_attention_blocked(q_local, k_local, v_local, mask_local, q_mem, k_mem, v_mem, mask_mem)
    out, lse, columns = _two_part_attention(q_local, k_local, v_local, mask_local, q_mem, k_mem, v_mem, mask_mem)
    return out, columns if columns is not None else column_sums(q_local, k_local, lse, mask_local)


def column_sums(q, k, lse, mask):
    """kernels.local_column_sums (its specification), on a GPU in one Triton kernel per key block and head that
    never writes the [T, L] probabilities."""
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16, torch.float32) and triton is not None:
        return _column_sums_cuda(q, k, lse, mask)
    return kernels.local_column_sums(q, k, lse, mask)


def flex_memory_part(local, q_mem, k_mem, v_mem, mask_mem):
    """kernels.flex_memory_part with the Triton column sums."""
    return kernels.flex_memory_part(local, q_mem, k_mem, v_mem, mask_mem, column_sums=column_sums)


def in_one_go(chunk_attention_fn):
    """A chunk attention as the (local part, memory part) pair that FixedShapeMemory calls: a kernel that
    treats both parts at once does all its work in the second call."""
    return (lambda *local: local), (lambda local, *memory: chunk_attention_fn(*local, *memory))


CHUNK_ATTENTION = {"plain": in_one_go(kernels.chunk_attention), "blocked": in_one_go(kernels.chunk_attention_blocked),
                   "triton": in_one_go(chunk_attention_triton),
                   "compiled": in_one_go(functools.partial(kernels.chunk_attention_blocked, block=None)),
                   "flex": (kernels.flex_local_part, flex_memory_part)}


# Tiles of the column sums kernel, BQ queries x BK keys: for a chunk of queries the fastest of 9 tried; for a
# decoding step (one query) the smallest query tile tl.dot takes (docs/benchmarks.md).
COLUMN_SUMS_CONFIG = dict(BQ=64, BK=64, num_warps=4, num_stages=3)
COLUMN_SUMS_CONFIG_FEW = dict(BQ=16, BK=128, num_warps=4, num_stages=2)


def _column_sums_cuda(q, k, lse, mask):
    (Hq, T, D), L = q.shape, k.shape[1]
    out = torch.empty(Hq, L, dtype=torch.float32, device=q.device)
    config = COLUMN_SUMS_CONFIG_FEW if T <= COLUMN_SUMS_CONFIG_FEW["BQ"] else COLUMN_SUMS_CONFIG
    _column_sums_kernel[(-(-L // config["BK"]), Hq)](
        q.contiguous(), k.contiguous(), lse.contiguous(), mask.contiguous(), out, T, L, D, Hq // k.shape[0],
        SCALE_LOG2=1.4426950408889634 / math.sqrt(D), BD=max(16, 1 << (D - 1).bit_length()),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", **config)
    return out


# Tiles of the two-part attention, BM rows (query head, query) x BN keys, fixed, not autotuned: autotuning would
# cost time in every fresh process. Every tile is computed, also one no query of the block sees: a branch that
# skipped those kept Triton from pipelining the loads; without it, the best of the 40 tile settings that fit
# (docs/benchmarks.md). A few rows (a decoding step: one query per head of a group) take the smallest tile tl.dot
# allows.
TWO_PART_CONFIG = dict(BM=128, BN=64, num_warps=8, num_stages=3)
TWO_PART_CONFIG_FEW = dict(BM=16, BN=64, num_warps=4, num_stages=3)
# A launch of fewer programs than this splits the keys into up to SPLIT_MOST ranges, one program each, merged
# after by their log-sum-exps (flash-decoding): a decoding step has one program per key head otherwise, each
# walking all ~7K keys alone while the rest of the GPU idles. A decoding step aims at twice as many programs
# (mistral-7b's 8 key heads then take 32 ranges each instead of 16, faster: docs/benchmarks.md); a piece keeps
# the lower aim, never measured higher. 64 ranges were slower at every head count tried (8, 16 and 32 query heads).
SPLIT_BELOW = 128
SPLIT_BELOW_FEW = 256
SPLIT_MOST = 32
# Rows of the range merge per program. A program reads every range's partial output of its rows: 16 rows of 32
# ranges are 256 KB for one SM, so a decoding step's few rows take 2 a program (faster at 8 and 16 query heads,
# the same at 32).
MERGE_ROWS, MERGE_ROWS_FEW = 16, 2


def _two_part_attention(q_local, k_local, v_local, mask_local, q_mem, k_mem, v_mem, mask_mem):
    """The launch of _two_part_attention_kernel: the output [Hq, T, D] in the input dtype, the natural-log
    log-sum-exp over both parts [Hq, T] fp32 (-inf for a query that sees no key, whose output is 0), and the
    local column sums [Hq, L] fp32 for a few queries split into ranges (a decoding step; else None). A program
    takes BM rows of one key head's group (its query heads' queries, so each key is read once for all of
    them) and one range of its keys. Sizes only from shapes, no host sync: it replays in CUDA graphs."""
    (Hq, T, D), (Hkv, L), M = q_local.shape, k_local.shape[:2], k_mem.shape[1]
    G = Hq // Hkv
    few = G * T <= TWO_PART_CONFIG_FEW["BM"]
    config = TWO_PART_CONFIG_FEW if few else TWO_PART_CONFIG
    BN = config["BN"]
    blocks = -(-G * T // config["BM"])
    split = max(1, min(SPLIT_MOST, (SPLIT_BELOW_FEW if few else SPLIT_BELOW) // max(1, blocks * Hkv)))
    step = lambda n: -(-n // (split * BN)) * BN  # keys of a part per range, whole tiles  # noqa: E731
    f32 = dict(dtype=torch.float32, device=q_local.device)
    out = torch.empty(Hq, T, D, dtype=q_local.dtype, device=q_local.device)
    lse = torch.empty(Hq, T, **f32)
    part = (torch.empty(split, Hq, T, **f32), torch.empty(split, Hq, T, **f32),  # each range's running max, sum
            torch.empty(split, Hq, T, D, **f32)) if split > 1 else (lse, lse, out)  # and output
    # A decoding step's column sums come with the merge: the kernel keeps the local logits it computes (a few
    # queries' worth), and the merge turns them into probabilities once it knows each query's log-sum-exp.
    # That replaces column_sums, which computes every logit again (docs/benchmarks.md).
    keep = few and split > 1
    logits = torch.empty(Hq, T, L, **f32) if keep else lse
    args = (x.contiguous() for x in (q_local, k_local, v_local, mask_local, q_mem, k_mem, v_mem, mask_mem))
    BD = max(16, 1 << (D - 1).bit_length())
    _two_part_attention_kernel[(blocks, Hkv, split)](
        *args, out, lse, *part, logits, T, L, M, D, G, step(L), step(M),
        SCALE_LOG2=1.4426950408889634 / math.sqrt(D), BD=BD, SPLIT=split, KEEP=keep,
        PRECISION="ieee" if q_local.dtype == torch.float32 else "tf32", **config)
    if split == 1:
        return out, lse, None
    cols = torch.empty(Hq, L, **f32) if keep else lse
    BR, BK = MERGE_ROWS_FEW if few else MERGE_ROWS, 512
    merges = -(-Hq * T // BR)
    _merge_ranges_kernel[(merges + (Hq * -(-L // BK) if keep else 0),)](
        *part, out, lse, logits, cols, Hq * T, D, T, L, merges, SPLIT=split, BR=BR, BD=BD, BK=BK)
    return out, lse, cols if keep else None


# ----------------------------------------------------------------------------- Triton kernels (GPU only)

if triton is not None:
    # Triton compiles a kernel anew for each value class of its integer arguments (1, a multiple of 16, other).
    # Arguments that differ between a piece (T = 512) and a decoding step (T = 1), or grow with the prompt (the
    # units stored), are left unspecialised (do_not_specialize): one compile serves both, and a prompt of
    # another length compiles nothing (tests/test_gpu.py counts the compiles).

    @triton.jit
    def _column_sums_kernel(q, k, lse, mask, out, T, L, D, G, SCALE_LOG2: tl.constexpr, BQ: tl.constexpr,
                            BK: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr):
        """out[h, i] for BK keys i of query head h: their probabilities summed over the T queries."""
        kb, h = tl.program_id(0), tl.program_id(1)
        i = kb * BK + tl.arange(0, BK)
        d = tl.arange(0, BD)
        key = tl.load(k + (h // G) * L * D + i[:, None] * D + d[None, :], mask=(i[:, None] < L) & (d[None, :] < D), other=0.0)
        acc = tl.zeros([BQ, BK], dtype=tl.float32)  # summed over query rows once, at the end
        for tb in range(tl.cdiv(T, BQ)):
            t = tb * BQ + tl.arange(0, BQ)
            query = tl.load(q + h * T * D + t[:, None] * D + d[None, :], mask=(t[:, None] < T) & (d[None, :] < D), other=0.0)
            s = tl.dot(query, tl.trans(key), input_precision=PRECISION)  # [BQ, BK], fp32
            z = tl.load(lse + h * T + t, mask=t < T, other=0.0) * 1.4426950408889634  # to log2
            seen = tl.load(mask + t[:, None] * L + i[None, :], mask=(t[:, None] < T) & (i[None, :] < L), other=False)
            acc += tl.where(seen, tl.exp2(s * SCALE_LOG2 - z[:, None]), 0.0)
        tl.store(out + h * L + i, tl.sum(acc, axis=0), mask=i < L)

    @triton.jit
    def _attend_keys(query, k, v, mask, n, lo, span, t, ok, d, D, m_i, l_i, acc, logits, SCALE_LOG2: tl.constexpr,
                     BN: tl.constexpr, PRECISION: tl.constexpr, KEEP: tl.constexpr):
        """Adds the keys [lo, lo + span) of a part (k, v: one key head's [n, D], mask [T, n]; span a whole number
        of tiles) to the online softmax of the rows ok whose queries are t: running max m_i and sum l_i of the
        logits in log2 units, output acc not yet divided by l_i. Every tile is computed, also one nobody sees: a
        branch that skipped those kept Triton from pipelining the tiles' loads. KEEP: each row's logits (-inf
        where unseen) are also stored at its pointer in logits [BM] (n a row)."""
        for start in range(0, span, BN):
            i = lo + start + tl.arange(0, BN)
            inside = ok[:, None] & (i[None, :] < n)
            seen = tl.load(mask + t[:, None] * n + i[None, :], mask=inside, other=False)
            m_i, l_i, acc, s = _attend_tile(query, k, v, seen, i, n, d, D, m_i, l_i, acc, SCALE_LOG2, PRECISION)
            if KEEP:
                tl.store(logits[:, None] + i[None, :], s, mask=inside)
        return m_i, l_i, acc

    @triton.jit
    def _attend_tile(query, k, v, seen, i, n, d, D, m_i, l_i, acc, SCALE_LOG2: tl.constexpr, PRECISION: tl.constexpr):
        """One tile of keys i in the online softmax; also returns its logits (log2 units, -inf where unseen). A
        tile nobody sees changes nothing: its p are all 0 (every key slot a part can hold is written or zero, so
        0 * value is 0)."""
        rows = (i[:, None] < n) & (d[None, :] < D)
        key = tl.load(k + i[:, None] * D + d[None, :], mask=rows, other=0.0)
        s = tl.dot(query, tl.trans(key), input_precision=PRECISION) * SCALE_LOG2
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a query that has seen nothing yet: 0, not NaN
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        value = tl.load(v + i[:, None] * D + d[None, :], mask=rows, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(value.dtype), value, input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        return m_new, l_i, acc, s

    @triton.jit
    def _two_part_attention_kernel(q_local, k_local, v_local, mask_local, q_mem, k_mem, v_mem, mask_mem, out, lse,
                                   part_m, part_l, part_acc, logits, T, L, M, D, G, STEP_L, STEP_M,
                                   SCALE_LOG2: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                                   SPLIT: tl.constexpr, PRECISION: tl.constexpr, KEEP: tl.constexpr):
        """For BM rows of key head hk's group (row r: query head hk * G + r // T, query r % T) and key range j:
        the local keys, then the memory keys, in one online softmax (exp2, the scale folded into log2 units),
        each part dotted with its own queries. One range (SPLIT = 1): out and lse. Several: each range's
        running max, sum and unnormalised output, for _merge_ranges_kernel. KEEP: the local logits too, in
        logits [Hq, T, L] (log2 units)."""
        rb, hk, j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        r = rb * BM + tl.arange(0, BM)
        ok = r < G * T
        h, t = hk * G + r // T, r % T
        d = tl.arange(0, BD)
        at, inside = h[:, None] * T * D + t[:, None] * D + d[None, :], ok[:, None] & (d[None, :] < D)
        m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BM], dtype=tl.float32)
        acc = tl.zeros([BM, BD], dtype=tl.float32)
        query = tl.load(q_local + at, mask=inside, other=0.0)
        m_i, l_i, acc = _attend_keys(query, k_local + hk * L * D, v_local + hk * L * D, mask_local, L, j * STEP_L,
                                     STEP_L, t, ok, d, D, m_i, l_i, acc, logits + (h * T + t) * L, SCALE_LOG2, BN,
                                     PRECISION, KEEP)
        query = tl.load(q_mem + at, mask=inside, other=0.0)
        m_i, l_i, acc = _attend_keys(query, k_mem + hk * M * D, v_mem + hk * M * D, mask_mem, M, j * STEP_M,
                                     STEP_M, t, ok, d, D, m_i, l_i, acc, logits, SCALE_LOG2, BN,
                                     PRECISION, False)
        if SPLIT == 1:
            # A query that saw nothing has l_i = 0: output 0 and lse -inf (log2(0) = -inf), no NaN.
            tl.store(out + at, (acc * tl.where(l_i > 0, 1.0 / l_i, 0.0)[:, None]).to(out.dtype.element_ty), mask=inside)
            tl.store(lse + h * T + t, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=ok)  # log2 -> natural
        else:
            HT = G * T * tl.num_programs(1)  # rows of all heads
            tl.store(part_m + j * HT + h * T + t, m_i, mask=ok)
            tl.store(part_l + j * HT + h * T + t, l_i, mask=ok)
            tl.store(part_acc + j * HT * D + at, acc, mask=inside)

    @triton.jit
    def _ranges_total(part_m, part_l, r, ok, R, SPLIT: tl.constexpr):
        """Rows r's softmax over all SPLIT key ranges: its max m (log2 units), m_use (0 where no range saw a key,
        so that every weight is 0 there) and sum l."""
        m = tl.full(r.shape, float("-inf"), dtype=tl.float32)
        for j in tl.static_range(SPLIT):
            m = tl.maximum(m, tl.load(part_m + j * R + r, mask=ok, other=float("-inf")))
        m_use = tl.where(m == float("-inf"), 0.0, m)
        l_i = tl.zeros(r.shape, dtype=tl.float32)
        for j in tl.static_range(SPLIT):
            l_i += tl.exp2(tl.load(part_m + j * R + r, mask=ok, other=float("-inf")) - m_use) * \
                tl.load(part_l + j * R + r, mask=ok, other=0.0)
        return m, m_use, l_i

    @triton.jit(do_not_specialize=["T"])
    def _merge_ranges_kernel(part_m, part_l, part_acc, out, lse, logits, cols, R, D, T, L, MERGES, SPLIT: tl.constexpr,
                             BR: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr):
        """The first MERGES programs: out and lse of BR rows each (of all R = Hq * T) from the SPLIT key ranges'
        partial softmaxes. Any after them: the local column sums cols [Hq, L] of BK keys of one query head from
        the kept logits [Hq, T, L], each query's probabilities summed."""
        pid = tl.program_id(0)
        if pid < MERGES:
            r = pid * BR + tl.arange(0, BR)
            d = tl.arange(0, BD)
            ok, inside = r < R, (r[:, None] < R) & (d[None, :] < D)
            m, m_use, l_i = _ranges_total(part_m, part_l, r, ok, R, SPLIT)
            acc = tl.zeros([BR, BD], dtype=tl.float32)
            for j in tl.static_range(SPLIT):
                w = tl.exp2(tl.load(part_m + j * R + r, mask=ok, other=float("-inf")) - m_use)
                acc += w[:, None] * tl.load(part_acc + j * R * D + r[:, None] * D + d[None, :], mask=inside, other=0.0)
            tl.store(out + r[:, None] * D + d[None, :],
                     (acc * tl.where(l_i > 0, 1.0 / l_i, 0.0)[:, None]).to(out.dtype.element_ty), mask=inside)
            tl.store(lse + r, (m + tl.log2(l_i)) * 0.6931471805599453, mask=ok)
        else:
            blocks = tl.cdiv(L, BK)
            h, i = (pid - MERGES) // blocks, ((pid - MERGES) % blocks) * BK + tl.arange(0, BK)
            col = tl.zeros([BK], dtype=tl.float32)
            for t in range(T):
                r = h * T + t + tl.zeros([BK], dtype=tl.int32)  # one row, as wide as the keys
                m, m_use, l_i = _ranges_total(part_m, part_l, r, r < R, R, SPLIT)
                s = tl.load(logits + (h * T + t) * L + i, mask=i < L, other=float("-inf"))
                # A query that saw no key (l = 0) adds nothing; elsewhere an unseen key's -inf gives 0.
                col += tl.where(l_i > 0, tl.exp2(s - (m + tl.log2(l_i))), 0.0)
            tl.store(cols + h * L + i, col, mask=i < L)
