"""Attention arithmetic for the caches of infllm.py.

The plain path below is the specification: short PyTorch that runs on any device and in float64,
which every faster path is tested against. Shapes are per sequence (batch 1): queries [Hq, T, D],
keys and values [Hkv, L, D] with Hq a multiple of Hkv (grouped-query attention: query head h reads
key head h // (Hq / Hkv)), masks [T, L] with True where a query may see a key.

The fast paths: chunk_attention_blocked (CPU), chunk_attention_triton (a prefill piece or a decoding step on an
eager GPU; chunk_attention_fused before it, kept for comparison), and on a GPU under torch.compile the
FlexAttention pair flex_local_part / flex_memory_part; the GPU paths take their local column sums from the Triton
local_column_sums (the Triton kernel's decoding step from its own range merge). Then the rest of an eager GPU's
piece step, each the Triton twin of PyTorch lines that stay beside its call in model.py and infllm.py as the
specification: rotary angles and rotations (rope_angles, rotate, and piece_angles with a piece's positions),
rms_norm (with the residual sum before it), the MLP's silu_mul, the LRU (lru_fetch), the lookup's scores and
selection (unit_scores, select_top), the ring writes and local mask (ring_write, window_mask), the memory part
(memory_part) and retirement (retire). Last, the page-locked host storage, and at the end the Triton kernels and
the copies between ContextMemory's unit storage (pinned host memory, or GPU memory) and its device pool.
"""
import functools
import math
import weakref

import torch
import torch.nn.functional as F


def expand_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[Hkv, ...] -> [Hq, ...]: each key head serves the query heads of its group."""
    return x.repeat_interleave(n_heads // x.shape[0], dim=0)


def _acc(t: torch.Tensor) -> torch.dtype:
    """Softmax arithmetic runs in at least fp32; a float64 oracle stays float64."""
    return torch.promote_types(t.dtype, torch.float32)


def _logits(q, k, mask):
    acc = _acc(q)
    s = (q.to(acc) @ expand_kv(k, q.shape[0]).to(acc).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return s.masked_fill(~mask, float("-inf"))


def part_attention(q, k, v, mask):
    """Attention of q over one set of keys: the output normalised within the part, its log-sum-exp
    [H, T] (-inf for a query that sees no key of the part) and the raw logits."""
    s = _logits(q, k, mask)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)  # rows that see nothing: 0, not NaN
    return p @ expand_kv(v, q.shape[0]).to(p.dtype), lse, s


def merge_parts(o1, lse1, o2, lse2):
    """Two softmaxes over disjoint key sets -> the softmax over their union (log-sum-exp weights)."""
    lse = torch.logaddexp(lse1, lse2)
    w1 = torch.exp(lse1 - lse).nan_to_num(0.0)[..., None]
    w2 = torch.exp(lse2 - lse).nan_to_num(0.0)[..., None]
    return o1 * w1 + o2 * w2, lse


def chunk_attention(q_local, k_local, v_local, mask_local, q_mem, k_mem, v_mem, mask_mem):
    """InfLLM's attention for one chunk of queries: the local part (window keys at window positions)
    and the memory part (init tokens, selected units, far remainder at one fixed distance), normalised
    together. Returns the output [Hq, T, D] in the input dtype and the local part's column sums [Hq, L]:
    the attention probability each window key received from this chunk's queries, which feeds the
    tokens' local scores (representative keys are chosen by them)."""
    o_l, lse_l, s_l = part_attention(q_local, k_local, v_local, mask_local)
    o_m, lse_m, _ = part_attention(q_mem, k_mem, v_mem, mask_mem)
    out, lse = merge_parts(o_l, lse_l, o_m, lse_m)
    col_sums = torch.exp(s_l - lse[..., None]).nan_to_num(0.0).sum(dim=1)
    return out.to(q_local.dtype), col_sums.float()


def causal_attention(q, k, v):
    """Full attention of the last T positions over all L keys (batched [B, H, T, D]): the baseline."""
    T, L = q.shape[-2], k.shape[-2]
    mask = None
    if T > 1:
        mask = torch.ones(T, L, dtype=torch.bool, device=q.device).tril(diagonal=L - T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


def representative_keys(k_blocks, scores, repr_topk: int, keep_each: bool = False):
    """Representative keys per query head for each new memory unit, from the (unrotated) keys of the
    repr_topk tokens with the highest local score for that head. k_blocks [n, Hkv, B, D], scores
    [n, Hq, B] -> [n, Hq * D]: their mean per head (the reference), heads concatenated, the layout the
    lookup dots with; keep_each (repr_scoring=best): the keys themselves, [n, Hq * repr_topk * D] laid
    out [Hq, repr_topk, D], for a lookup that takes each head's best of them."""
    n, Hq, B = scores.shape
    k = expand_kv(k_blocks.transpose(0, 1), Hq).transpose(0, 1)  # [n, Hq, B, D]
    # (a sort, not topk: on rows this short torch.topk takes 4x longer on a GPU)
    top = scores.argsort(dim=-1, descending=True, stable=True)[..., :repr_topk]  # [n, Hq, r]
    picked = torch.gather(k, 2, top[..., None].expand(-1, -1, -1, k.shape[-1]))
    if keep_each:
        return picked.reshape(n, -1)
    return picked.to(_acc(picked)).mean(dim=2).to(k_blocks.dtype).reshape(n, -1)


FP8 = torch.float8_e4m3fn


def to_fp8(x):
    """Units [n, H, B, D] -> (bytes [n, H, B, D] uint8, scales [n, H] fp32): float8 e4m3 with one scale
    per unit and head, which maps the largest magnitude to e4m3's largest number. The bytes travel as
    uint8, which every copy and index kernel takes (CPU index_copy_ has no float8)."""
    amax = x.abs().amax(dim=(2, 3)).float().clamp(min=torch.finfo(torch.float32).tiny)
    scale = amax / torch.finfo(FP8).max
    return (x.float() / scale[:, :, None, None]).to(FP8).view(torch.uint8), scale


def from_fp8(bits, scale, dtype):
    """The inverse of to_fp8, up to e4m3's rounding: bytes [n, H, B, D], scales [n, H] -> dtype."""
    return (bits.view(FP8).float() * scale[:, :, None, None]).to(dtype)


def score_units(q_mem, reprs, real, best_token=False, each_query=False, over_heads=None):
    """Relevance of every unit to a piece -> [n]. q_mem [Hq, T, D]: the piece's queries at the memory
    position; real [T]: False for padding; reprs [n, Hq * r * D]: each unit's r representative keys per
    head, laid out [Hq, r, D] (r = 1: the reference's averaged key).
    The reference (both False): the real queries averaged, concatenated over heads, dotted with reprs.
    best_token (repr_scoring=best): per head the best of the unit's r keys, summed over heads.
    each_query (lookup_queries=each): every real query scores the unit; it keeps its best query's score.
    over_heads: applied to the scores summed over these heads, before the max over queries (tensor
    parallel: adds the other processes' heads; a max over queries must come after the whole sum)."""
    acc = _acc(q_mem)
    Hq, T, D = q_mem.shape
    reprs = reprs.to(acc)
    keys = reprs.view(reprs.shape[0], Hq, -1, D)  # [n, Hq, r, D]
    if not each_query or T == 1:  # one query (decoding): its own score is the mean's
        mean = (q_mem.to(acc) * real[:, None]).sum(dim=1) / real.sum().clamp(min=1)  # [Hq, D]
        if best_token:
            scores = torch.einsum("nhrd,hd->nhr", keys, mean).amax(dim=2).sum(dim=1)
        else:
            scores = reprs @ mean.reshape(-1)
        return scores if over_heads is None else over_heads(scores)
    q = q_mem.to(acc)
    if best_token:  # a head at a time: [n, r, T] each, not [n, Hq, r, T] (GBs at a million tokens)
        scores = sum((keys[:, h] @ q[h].T).amax(dim=1) for h in range(Hq))  # [n, T]
    else:
        scores = reprs @ q.transpose(0, 1).reshape(T, Hq * D).T  # [n, T]
    if over_heads is not None:
        scores = over_heads(scores)
    return scores.masked_fill(~real, float("-inf")).amax(dim=1)  # padding never wins


def select_units(scores, topk: int):
    """Indices of the topk best units (all of them when there are no more than topk), ascending."""
    if scores.shape[0] <= topk:
        return torch.arange(scores.shape[0], device=scores.device)
    return scores.topk(topk).indices.sort().values


def chunk_attention_blocked(q_local, k_local, v_local, mask_local, q_mem, k_mem, v_mem, mask_mem, block=128):
    """chunk_attention computed the way a CPU (or an eager GPU) likes it: queries in blocks so the
    probabilities stay a few MB, query heads of a group batched against their shared key head (no
    copies of K/V per query head), one softmax over both parts done in place. Same results."""
    Hq, T, D = q_local.shape
    Hkv, L = k_local.shape[:2]
    G, acc = Hq // Hkv, _acc(q_local)
    scale = 1.0 / math.sqrt(D)
    block = block or T
    kl, km = k_local.to(acc).transpose(1, 2), k_mem.to(acc).transpose(1, 2)  # [Hkv, D, keys]
    vl, vm = v_local.to(acc), v_mem.to(acc)
    bias_l = torch.zeros(mask_local.shape, dtype=acc, device=q_local.device).masked_fill_(~mask_local, float("-inf"))
    bias_m = torch.zeros(mask_mem.shape, dtype=acc, device=q_local.device).masked_fill_(~mask_mem, float("-inf"))
    out = torch.empty(Hkv, G, T, D, dtype=acc, device=q_local.device)
    col = torch.zeros(Hkv, G, 1, L, dtype=acc, device=q_local.device)
    for s in range(0, T, block):
        e = min(s + block, T)
        t = e - s
        # Scaled after the product: bf16 queries and keys stay exact in fp32, and so in TF32 on a GPU.
        ql = q_local[:, s:e].to(acc).reshape(Hkv, G * t, D)
        qm = q_mem[:, s:e].to(acc).reshape(Hkv, G * t, D)
        sl = (ql @ kl).view(Hkv, G, t, L).mul_(scale).add_(bias_l[s:e])
        sm = (qm @ km).view(Hkv, G, t, -1).mul_(scale).add_(bias_m[s:e])
        m = sl.amax(-1, keepdim=True)
        if sm.shape[-1]:
            m = torch.maximum(m, sm.amax(-1, keepdim=True))
        m = m.clamp(min=torch.finfo(acc).min)  # a padding query sees nothing: its row stays 0, not NaN
        sl.sub_(m).exp_()
        sm.sub_(m).exp_()
        z = sl.sum(-1, keepdim=True) + sm.sum(-1, keepdim=True)
        inv_z = torch.where(z > 0, 1.0 / z, 0.0)
        o = sl.view(Hkv, G * t, L) @ vl + sm.view(Hkv, G * t, -1) @ vm
        out[:, :, s:e] = o.view(Hkv, G, t, D) * inv_z
        col += inv_z.transpose(-1, -2) @ sl  # [Hkv, G, 1, t] @ [Hkv, G, t, L]: probabilities summed over queries
    return out.reshape(Hq, T, D).to(q_local.dtype), col.reshape(Hq, L).float()


def chunk_attention_fused(q_local, k_local, v_local, mask_local, q_mem, k_mem, v_mem, mask_mem):
    """chunk_attention for an eager GPU (before chunk_attention_triton; kept for comparison, `--kernel fused`):
    both parts in one call of PyTorch's fused memory-efficient attention (no compilation), which takes an
    additive mask and returns the log-sum-exp. The two parts have
    queries at different positions, so they sit side by side along the head dimension: [q_local, q_mem]
    dotted with [k, 0] for a window key and [0, k] for a memory key gives each key the logit of its own part,
    and one softmax covers the union. The local column sums come from local_column_sums. Same results as
    chunk_attention up to bf16 rounding. A decoding step (one query) takes the blocked kernel: the fused call
    would copy every key and value once per query head for a single query. So does a CPU."""
    if not q_local.is_cuda or q_local.shape[1] == 1:
        return chunk_attention_blocked(q_local, k_local, v_local, mask_local, q_mem, k_mem, v_mem, mask_mem)
    Hq, T, D = q_local.shape
    L = k_local.shape[1] + k_mem.shape[1]
    pad = -L % 16  # the kernel reads the mask in rows aligned to 16 elements
    q = torch.cat([q_local, q_mem], dim=-1)
    k = torch.cat([F.pad(k_local, (0, D)), F.pad(k_mem, (D, 0))], dim=1)
    v = torch.cat([v_local, v_mem], dim=1)
    k, v = (expand_kv(F.pad(x, (0, 0, 0, pad)), Hq) for x in (k, v))
    mask = F.pad(torch.cat([mask_local, mask_mem], dim=1), (0, pad))
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        q[None], k[None], v[None], bias[None, None].expand(1, Hq, T, L + pad), True, scale=1.0 / math.sqrt(D))[:2]
    seen = mask.any(dim=1)[:, None]  # a padding query sees nothing: 0, not the kernel's NaN
    out = torch.where(seen, out[0], 0.0)
    lse = lse[0, :, :T].float()
    return out.to(q_local.dtype), local_column_sums(q_local, k_local, lse, mask_local)


def chunk_attention_triton(q_local, k_local, v_local, mask_local, q_mem, k_mem, v_mem, mask_mem):
    """chunk_attention for the eager GPU path as one Triton kernel (_two_part_attention_kernel): flash attention
    over the local keys, then the memory keys, in one online softmax, each part scored with its own queries.
    Unlike chunk_attention_fused it copies no keys or values per query head and builds no additive mask (it
    reads the boolean mask tile by tile). The local column sums come from local_column_sums with the kernel's
    log-sum-exp, or for a few queries (a decoding step) from the logits the kernel kept, in its range merge.
    Same results as chunk_attention up to the rounding of the probabilities to the input dtype (bf16) before
    they weigh the values. A decoding step takes it too, its keys split over many programs; a CPU or float64
    take the blocked kernel."""
    if not q_local.is_cuda or q_local.dtype == torch.float64:
        return chunk_attention_blocked(q_local, k_local, v_local, mask_local, q_mem, k_mem, v_mem, mask_mem)
    out, lse, columns = _two_part_attention(q_local, k_local, v_local, mask_local, q_mem, k_mem, v_mem, mask_mem)
    return out, columns if columns is not None else local_column_sums(q_local, k_local, lse, mask_local)


def chunk_attention_flex(q_local, k_local, v_local, mask_local, q_mem, k_mem, v_mem, mask_mem):
    """chunk_attention as two FlexAttention calls, which under torch.compile on a GPU become fused
    flash-style kernels: bf16 tensor cores, fp32 softmax, no probability matrix written to memory. Each
    part returns its log-sum-exp; the two are merged, and the local column sums are recomputed from the
    merged log-sum-exp (local_column_sums). Same results as chunk_attention up to the rounding of the two
    parts' outputs to the input dtype before the merge."""
    return flex_memory_part(flex_local_part(q_local, k_local, v_local, mask_local), q_mem, k_mem, v_mem, mask_mem)


def flex_local_part(q_local, k_local, v_local, mask_local):
    """The first half of chunk_attention_flex: the local part alone (it needs no memory unit, so it can
    run while the selected units are still being loaded)."""
    return (q_local, k_local, mask_local) + _flex(q_local, k_local, v_local, mask_local)


def flex_memory_part(local, q_mem, k_mem, v_mem, mask_mem):
    """The second half: the memory part, the merge and the local column sums."""
    q_local, k_local, mask_local, o_l, lse_l = local
    if k_mem.shape[1]:
        o_m, lse_m = _flex(q_mem, k_mem, v_mem, mask_mem)
        out, lse = merge_parts(o_l.float(), lse_l, o_m.float(), lse_m)
    else:
        out, lse = o_l, lse_l
    return out.to(q_local.dtype), local_column_sums(q_local, k_local, lse.float(), mask_local)


def _flex(q, k, v, mask):
    """One FlexAttention call on [H, n, D] tensors with a [n_q, n_k] boolean mask. Returns the output and
    the log-sum-exp [Hq, n_q] (-inf for a query that sees no key)."""
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention
    # Inductor serves fewer than 128 queries with its decoding kernel, which tiles a key head's whole group of
    # queries (group x n_q rows) inside one 128-query block; with more rows than that it has no kernel to
    # choose (NoValidChoicesError), so those shapes take the general kernel.
    group = q.shape[0] // k.shape[0]
    options = {"FORCE_USE_FLEX_ATTENTION": True} if q.shape[1] * group > 128 else None
    out, aux = flex_attention(q[None], k[None], v[None], block_mask=block_mask(mask), enable_gqa=group != 1,
                              return_aux=AuxRequest(lse=True), kernel_options=options)
    return out[0], aux.lse[0]


def block_mask(mask, block=128):
    """FlexAttention's view of a dense [n_q, n_k] mask, made on the device without a host sync: a block of
    keys that no query of a query block sees is skipped, one that every query sees is "full" (no mask read
    inside: most of the window and of the units), the rest read the dense mask. create_block_mask would
    call the mask function on every element instead of reducing the mask we already have."""
    from torch.nn.attention.flex_attention import BlockMask
    n_q, n_k = mask.shape
    rows, cols = -(-n_q // block), -(-n_k // block)
    # Padding: keys past n_k are never seen (a short last key block is never full); queries past n_q don't
    # count (their output is dropped).
    m = F.pad(mask, (0, cols * block - n_k)).view(n_q, cols, block)
    seen = F.pad(m.any(2), (0, 0, 0, rows * block - n_q), value=False).view(rows, block, cols).any(1)
    full = F.pad(m.all(2), (0, 0, 0, rows * block - n_q), value=True).view(rows, block, cols).all(1)

    def listed(b):  # the blocks where b holds first, in an index of fixed size (flex reads only the count)
        count = b.sum(-1, dtype=torch.int32)
        return count[None, None], b.to(torch.int8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)[None, None]

    return BlockMask.from_kv_blocks(*listed(seen & ~full), *listed(full), BLOCK_SIZE=block,
                                    mask_mod=lambda b, h, t, i: mask[t, i], seq_lengths=(n_q, n_k),
                                    compute_q_blocks=False)


def local_column_sums(q, k, lse, mask):
    """For every local key, the probability it received from the chunk's queries, given each query's
    log-sum-exp over both parts: sum_t exp(q_t . k / sqrt(D) - lse_t) over the queries that see it.
    q [Hq, T, D], k [Hkv, L, D], lse [Hq, T] fp32, mask [T, L] -> [Hq, L] fp32. On a GPU one Triton
    kernel per key block and head, never writing the [T, L] probabilities."""
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16, torch.float32):
        return _column_sums_cuda(q, k, lse, mask)
    return torch.exp(_logits(q, k, mask) - lse[..., None]).nan_to_num(0.0).sum(dim=1).float()


# Tiles of the column sums kernel, BQ queries x BK keys: for a chunk of queries the fastest of 9 tried on an
# H100; for a decoding step (one query) the smallest query tile tl.dot takes (17 us instead of 22 on an H100).
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
# skipped those kept Triton from pipelining the loads. Without it, the best of the 40 tile settings that fit took
# a prefill piece from 227 to 207 us (mistral-7b) and from 168 to 86 us (SmolLM2) on an H200
# (docs/results/attention_tiles_2026-11-28g_h200.txt). A few rows (a decoding step: one query per head of a group)
# take the smallest tile tl.dot allows: without the skip, and with the merge below, mistral-7b's step took 19.4 us
# instead of 20.7, its half under tensor parallel 14.3 instead of 18.1
# (docs/results/decode_attention_tiles_2026-11-29_h200.txt).
TWO_PART_CONFIG = dict(BM=128, BN=64, num_warps=8, num_stages=3)
TWO_PART_CONFIG_FEW = dict(BM=16, BN=64, num_warps=4, num_stages=3)
# A launch of fewer programs than this splits the keys into up to SPLIT_MOST ranges, one program each, merged
# after by their log-sum-exps (flash-decoding): a decoding step has one program per key head otherwise, each
# walking all ~7K keys alone while the rest of the GPU idles. A decoding step aims at twice as many programs:
# mistral-7b's 8 key heads then take 32 ranges each instead of 16, and its attention 16.7 us instead of 22.8
# (range merge 5.2 instead of 6.5) on an H200 (docs/benchmarks.md, 2026-11-28); a piece keeps the lower aim,
# never measured higher. 64 ranges were slower at every head count tried (8, 16 and 32 query heads).
SPLIT_BELOW = 128
SPLIT_BELOW_FEW = 256
SPLIT_MOST = 32
# Rows of the range merge per program. A program reads every range's partial output of its rows: 16 rows of 32
# ranges are 256 KB for one SM, so a decoding step's few rows take 2 a program (1.2-1.6 us less at 8 and 16
# query heads, the same at 32).
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
    # That replaces local_column_sums, which computes every logit again (10-16 us a layer on an H200).
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


def rope_angles(pos, inv_freq, dtype):
    """model.Rotary.angles on an eager GPU in one kernel (instead of some 14): cos and sin of positions pos [T],
    each [T, head_dim] in dtype, the angle in float64 reduced to one turn, then float32, as Rotary.angles has it."""
    T, half = pos.shape[0], inv_freq.shape[0]
    cos = torch.empty(T, 2 * half, dtype=dtype, device=pos.device)
    sin = torch.empty_like(cos)
    BT = 32  # positions per program
    _rope_angles_kernel[(-(-T // BT),)](pos, inv_freq, cos, sin, T, half, BT=BT, BH=triton.next_power_of_2(half))
    return cos, sin


def piece_angles(pos_d, n, P, inv_freq, dtype):
    """infllm.ContextMemory._attend_piece's positions at = pos_d + arange(P), padding real = arange(P) < n (pos_d
    and n device counts) and their angles (as rope_angles gives them), in one kernel (instead of 4)."""
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


def rotate(x, cos, sin):
    """model.Rotary.forward on an eager GPU in one kernel (instead of 5): x [H, T, D] (any strides) rotated by cos
    and sin [T or 1, D] (both halves equal), in float32 and rounded once to x's dtype (PyTorch's operations round
    three times). Returns a contiguous [H, T, D]."""
    H, T, D = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty(H, T, D, dtype=x.dtype, device=x.device)
    BT = min(32, max(2, triton.next_power_of_2(T)))  # positions per program
    row = cos.stride(0) if cos.shape[0] > 1 else 0  # one position for every query (memory's): broadcast
    _rotate_kernel[(H, -(-T // BT))](x, cos, sin, out, T, D // 2, x.stride(0), x.stride(1), row, BT=BT,
                                     BH=triton.next_power_of_2(D // 2))
    return out


def rms_norm(x, weight, eps, add=None):
    """model.RMSNorm on an eager GPU in one kernel (instead of 9): each row normalised in float32, rounded to
    x's dtype, then scaled by the weight, as the reference rounds. With add (h, x's shape and dtype): the
    residual sum s = x + h first, and (s, its norm) returned (model.RMSNorm.add; 2 kernels otherwise)."""
    rows = _rows(x)
    out = torch.empty(rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    h = rows if add is None else _rows(add)
    total = torch.empty_like(rows) if add is not None else rows
    _rms_norm_kernel[(rows.shape[0],)](rows, h, total, weight, out, rows.shape[1], rows.stride(0), h.stride(0), eps,
                                       ADD=add is not None, BD=triton.next_power_of_2(rows.shape[1]))
    out = out.view(*x.shape[:-1], -1)
    return out if add is None else (total.view(x.shape), out)


def _rows(x):
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def silu_mul(gate_up):
    """model.MLP's F.silu(gate) * up on an eager GPU in one kernel (instead of 2), gate and up the two halves of
    the last dimension of gate_up (the MLP's one matrix product): silu in float32 rounded to the dtype, then the
    product rounded, as PyTorch's two operations round."""
    gate_up = gate_up.contiguous()
    F2 = gate_up.shape[-1]
    rows = gate_up.numel() // F2
    out = torch.empty(*gate_up.shape[:-1], F2 // 2, dtype=gate_up.dtype, device=gate_up.device)
    # 512 elements and 8 warps a program: 15.9 us for a mistral-7b piece's 512 x 14,336 on an H200, against 25.8 us
    # with 1,024 and 4 warps and 22.8 us for PyTorch's two kernels (docs/results/silu_mul_tiles_2026-11-28f_h200.txt).
    BLOCK = 512
    _silu_mul_kernel[(rows, -(-(F2 // 2) // BLOCK))](gate_up, out, F2 // 2, BLOCK=BLOCK, num_warps=8)
    return out


def lru_fetch(units, valid, unit_slot, slot_unit, slot_used, clock, hits, misses, load_units, load_slots, age_key):
    """infllm.MemoryUnits.fetch's bookkeeping on an eager GPU in one kernel of one program (instead of some
    50 kernels): the slot each selected unit takes (a miss evicts the least recently used unit not selected
    now), the state's update, and the copies to start (load_units, load_slots). Returns the slots. Among free
    slots it may pick another than fetch's argsort does: which free slot a unit takes changes no result."""
    K, S = units.shape[0], slot_used.shape[0] - 1
    victim = torch.empty_like(units)
    _lru_fetch_kernel[(1,)](units, valid, unit_slot, slot_unit, slot_used, clock, hits, misses, load_units, load_slots,
                            victim, K, S, unit_slot.shape[0] - 1, AGE=age_key, BK=triton.next_power_of_2(K),
                            BS=triton.next_power_of_2(S))
    return victim


def unit_scores(q_mem, real, reprs, n):
    """score_units as the reference scores (the real queries averaged, dotted with each unit's representative
    key), then -inf past the n units stored, on an eager GPU in two kernels that read the representative keys
    in their own dtype (score_units makes a float32 copy of all of them for every lookup). -> [rows] float32."""
    Hq, T, D = q_mem.shape
    q_mem = q_mem if q_mem.stride(-1) == 1 else q_mem.contiguous()
    mean = torch.empty(Hq * D, dtype=torch.float32, device=q_mem.device)
    _mean_query_kernel[(Hq,)](q_mem, real, mean, T, D, q_mem.stride(0), q_mem.stride(1), BT=32,
                              BD=triton.next_power_of_2(D))
    rows = reprs.shape[0]
    scores = torch.empty(rows, dtype=torch.float32, device=q_mem.device)
    # Units per program: 4 keep every SM of an H200 busy at 128K's 1,025 units (5.2 us a mistral-7b lookup against
    # 7.7 with 16); from some 8K units on, 16 a program read faster (19.4 us against 21.0; docs/benchmarks.md).
    BU, BK = (4, 512) if rows <= 4096 else (16, 256)
    _unit_scores_kernel[(-(-rows // BU),)](reprs, mean, scores, n, rows, Hq * D, BU=BU, BK=BK)
    return scores


SELECT_MOST = 16384  # scores select_top ranks (units of 2M tokens; its work grows as their square); more go to select_units


def select_top(scores, topk, n, real, lookups):
    """MemoryUnits.lookup's selection on an eager GPU in two kernels (instead of some 13: top-k, two sorts, copies,
    the valid entries, the lookup count): the topk best rows of scores [rows > topk] float32 (-inf past the n
    stored units), ascending; valid where the row is stored and some query is real (real [T] bool); lookups (a
    device count) += any valid. Ties between scores go to the lower row (torch.topk leaves them unspecified);
    the rows of entries that are not valid may differ from select_units', and nothing reads them.
    A row is chosen when fewer than topk rows beat it: the first kernel counts that for blocks of rows side by
    side (a decoding step's 1,025 rows in 65 programs), a block stopping as soon as topk rows beat each of its
    rows (most blocks after a tile or two); the second lists the chosen rows in order. One program taking
    the best row topk times over took 16.4 us a mistral-7b layer (docs/benchmarks.md)."""
    rows = scores.shape[0]
    units = torch.empty(topk, dtype=torch.long, device=scores.device)
    valid = torch.empty(topk, dtype=torch.bool, device=scores.device)
    chosen = torch.empty(rows, dtype=torch.int8, device=scores.device)
    BI, BJ = 16, 128  # rows ranked per program, rows compared with them at a time (tiles: docs/benchmarks.md)
    _rank_rows_kernel[(-(-rows // BI),)](scores, chosen, rows, K=topk, BI=BI, BJ=BJ, num_warps=2)
    _list_chosen_kernel[(1,)](chosen, real, n, lookups, units, valid, rows, real.shape[0], BR=2048,
                              BT=triton.next_power_of_2(real.shape[0]))
    return units, valid


def ring_write(k, v, cos, sin, at, real, ring_k, ring_kr, ring_v, ring_score, ring_pos):
    """infllm.ContextMemory._attend_piece's writes of a piece into the ring on an eager GPU in one kernel (instead
    of 7): keys k and values v [Hkv, T, D] (any strides) at slot position % ring size, the keys also rotated by
    cos and sin [T, D] (as rotate does), the slots' local scores zeroed, their positions (-1: padding) set."""
    Hkv, T, D = k.shape
    k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v))
    BT = 32  # tokens per program
    _ring_write_kernel[(-(-T // BT), Hkv + 1)](k, v, cos, sin, at, real, ring_k, ring_kr, ring_v, ring_score, ring_pos,
                                              T, D // 2, ring_k.shape[1], ring_score.shape[0], k.stride(0), k.stride(1),
                                              v.stride(0), v.stride(1), BT=BT, BH=triton.next_power_of_2(D // 2),
                                              BQ=triton.next_power_of_2(ring_score.shape[0]))


def window_mask(ring_pos, at, real, n_local):
    """The local part's mask [T, R] in one kernel (instead of 6): query t sees the ring slots that hold one of
    its n_local latest positions, up to its own (padding queries see none)."""
    T, R = at.shape[0], ring_pos.shape[0]
    mask = torch.empty(T, R, dtype=torch.bool, device=at.device)
    BT, BR = 32, 128
    _window_mask_kernel[(-(-T // BT), -(-R // BR))](ring_pos, at, real, mask, T, R, n_local, BT=BT, BR=BR)
    return mask


def memory_part(pool_k, pool_v, units, slots, valid, init_k, init_v, n_init_d, ring_k, ring_v, start_d, at, real, n_local):
    """infllm.ContextMemory._memory's keys, values and mask on an eager GPU in one kernel (instead of some 37):
    the selected units from their device slots, the init tokens, the far remainder from the ring, [Hkv, M, D]
    each in that order, the mask [T, M] of a piece's queries at positions at (real: not padding), and the
    selected units with -1 where not valid."""
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


def retire(ring_k, ring_v, ring_score, init_k, init_v, pos_d, start_d, n_init_d, n_units, reprs, stage_k, stage_v,
           stage_rows, n_local, repr_topk, most_init, most_units):
    """infllm.ContextMemory._retire on an eager GPU in two kernels (instead of some 50): the tokens that left
    the window fill init, then each full block of them becomes a unit (its keys and values staged for the
    write-back, its representative key the mean of its repr_topk best-scored keys per head), then the
    counters move. How many of each only the device knows: the first kernel reads the counters, the second
    (after it) moves them. Units in the model's dtype with averaged representative keys only."""
    Hkv, R, D = ring_k.shape
    Hq, B, n_init = ring_score.shape[0], stage_k.shape[2], init_k.shape[1] - 1
    args = (pos_d, start_d, n_init_d, n_units, stage_rows, n_local, n_init, B, most_units)
    programs = most_units * Hq + (1 if most_init else 0)
    if programs:
        _retire_kernel[(programs,)](ring_k, ring_v, ring_score, init_k, init_v, reprs, stage_k, stage_v, R, D, Hkv, Hq,
                                    *args, RTOP=repr_topk, MOST_INIT=most_init, BB=triton.next_power_of_2(B),
                                    BD=triton.next_power_of_2(D), BI=triton.next_power_of_2(max(most_init, 1)))
    _retire_counters_kernel[(1,)](*args, stage_rows.shape[0], BS=triton.next_power_of_2(stage_rows.shape[0]))


def pinned_empty(shape, dtype):
    """Page-locked host memory of exactly this size. torch's pinned allocator rounds every block up to a
    power of two and keeps freed blocks for reuse, so 1.07 GB of units would hold 2 GB, and the storage
    of an earlier, shorter prompt would stay: at 1M tokens that doubles the host memory. Registering an
    ordinary allocation (cudaHostRegister, mapped for the GPU) costs exactly its size. Locked whole at once;
    the unit storage is locked a slice at a time instead (lockable_empty, MemoryUnits.pin)."""
    t, locked = lockable_empty(shape, dtype)
    lock_rows(t, 0, t.shape[0], locked)
    return t


def lockable_empty(shape, dtype):
    """Host memory that lock_rows page-locks later, a slice of rows at a time (an ordinary allocation, for
    the reason pinned_empty gives), and the list of the addresses it registers (released with the tensor)."""
    t, locked = torch.empty(shape, dtype=dtype), []
    weakref.finalize(t, _unlock, torch.cuda.cudart(), locked)
    return t, locked


def _unlock(cudart, locked):
    for ptr in locked:
        cudart.cudaHostUnregister(ptr)


PAGE = 4096


def lock_span(base, row_bytes, rows, r0, r1):
    """The bytes [start, end) that page-locking rows r0..r1 of a storage of `rows` rows at `base` registers,
    rows before r0 done already. Cut at page boundaries: two registrations must not share a page (the
    second would fail), so a row split by a cut is locked up to the cut with the earlier rows."""
    end = base + rows * row_bytes

    def cut(r):
        return base if r == 0 else min(-(-(base + r * row_bytes) // PAGE) * PAGE, end)
    return cut(r0), cut(r1)


def lock_rows(t, r0, r1, locked, fresh=True):
    """Page-lock rows [r0, r1) of the host tensor t (rows before r0 are locked), mapped for the GPU. fresh:
    the rows were never written, so they are touched first by all cores at once (zero_ runs in parallel):
    registering untouched memory faults each page in on one thread, 3-4x slower (an H200 host, 2026-11-28:
    10 GB in 0.98-2.6 s against 3.4-4.6 s)."""
    start, end = lock_span(t.data_ptr(), t[0].numel() * t.element_size(), t.shape[0], r0, r1)
    if end <= start:
        return
    if fresh:
        t[r0:r1].zero_()
    err = torch.cuda.cudart().cudaHostRegister(start, end - start, 3)  # portable | mapped
    if int(err) != 0:
        raise RuntimeError(f"cannot page-lock {(end - start) / 2**30:.1f} GiB of host memory for the memory units (CUDA error {int(err)})")
    locked.append(start)


def _after_current(stream):
    """Work queued inside this context goes to stream (None: the current stream), after the work queued so
    far on the current stream."""
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream())
    return torch.cuda.stream(stream)


GATHER_SPLIT = 4  # programs per unit in gather_from_host and scatter_to_host from host storage (a pair shares them)
COPY_BLOCK = 4096  # elements a program copies at a time
_OUTSIDE_COMPILE = []


def outside_compile(fn):
    """torch.compiler.disable, applied when compiled() is first asked for rather than at import: the
    decorator imports dynamo, about 2 s at the start of every process, and a process that never
    compiles does not need it. Until then the call goes straight to fn."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        return (call.disabled or fn)(*args, **kwargs)
    call.disabled = None
    _OUTSIDE_COMPILE.append((call, fn))
    return call


@outside_compile  # a host address is no tensor: torch.compile calls this as it is
def gather_from_host(src, rows, dst, dst_rows, stream=None):
    """dst[dst_rows[i]] = src[rows[i]] for every i with dst_rows[i] >= 0, where src lives in pinned host
    memory (or GPU memory: unit_storage=device) and the indices on the GPU. A Triton kernel reads the host
    rows over PCIe itself (pinned memory is mapped into the GPU's address space), so the host never has to
    learn which units were selected: no synchronisation. src and dst may be pairs of tensors of one shape
    and dtype (keys and values), copied by the same launch. With a stream, the copy starts there once the
    work queued so far is done, and runs beside whatever comes next until join(stream)."""
    n = rows.numel()
    if n == 0:
        return
    src, dst = _pair(src), _pair(dst)
    with _after_current(stream):
        split = _copy_split(src[0], len(src))
        _gather_kernel[(n, split, len(src))](src[0].data_ptr(), src[-1].data_ptr(), rows, dst[0], dst[-1], dst_rows,
                                             src[0][0].numel(), BLOCK=COPY_BLOCK, SPLIT=split)


def _copy_split(storage, tensors):
    """Programs per unit and tensor of a copy to or from storage. Host storage: a few, each looping over
    its share of the row (a pair of tensors shares them): a copy that waits on PCIe holds few of the GPU's
    cores, so the attention running beside it keeps the rest. GPU storage: one a block of the row, so the
    copy runs at the speed of GPU memory (a 7B model's unit: 32 programs a tensor, not 2)."""
    if storage.is_cuda:
        return -(-storage[0].numel() // COPY_BLOCK)
    return max(1, GATHER_SPLIT // tensors)


def _pair(x):
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


@outside_compile
def join(stream):
    """Work queued after this waits for everything queued on stream so far."""
    torch.cuda.current_stream().wait_stream(stream)


@outside_compile
def scatter_to_host(src, dst, rows, stream=None):
    """dst[rows[i]] = src[i] for every i with rows[i] >= 0, where dst lives in pinned host memory (or GPU
    memory) and src and rows on the GPU: the write-back twin of gather_from_host (pairs too). New units go
    to their storage at rows only the device knows. With a stream, as in gather_from_host: src and rows must
    stay untouched until join(stream)."""
    src, dst = tuple(x.contiguous() for x in _pair(src)), _pair(dst)
    n = src[0].shape[0]
    if n == 0:
        return
    with _after_current(stream):
        split = _copy_split(dst[0], len(src))
        _scatter_kernel[(n, split, len(src))](src[0], src[-1], rows, dst[0].data_ptr(), dst[-1].data_ptr(),
                                              dst[0][0].numel(), BLOCK=COPY_BLOCK, SPLIT=split)


def compiled(fn):
    """torch.compile for the piece step, called with two shapes (a piece, a decoding step): each gets its
    own specialised graph (dynamic=False: a graph generalised over the number of queries would serve the
    steady 512-query pieces too, with slower kernels). The one size that grows with the prompt, the unit
    storage, is marked dynamic where it is allocated (MemoryUnits.reserve)."""
    for call, f in _OUTSIDE_COMPILE:
        call.disabled = call.disabled or torch.compiler.disable(f)
    return torch.compile(fn, dynamic=False)


def in_one_go(chunk_attention_fn):
    """A chunk attention as the (local part, memory part) pair that ContextMemory calls: a kernel that
    treats both parts at once does all its work in the second call."""
    return (lambda *local: local), (lambda local, *memory: chunk_attention_fn(*local, *memory))


# Each entry: (local part, memory part). "triton": one Triton flash-attention kernel over both parts on a GPU
# (the eager GPU path; the blocked kernel elsewhere). "fused": one call of PyTorch's memory-efficient attention
# on a GPU (the eager path before it, 1.4-1.7x slower). "compiled": the blocked kernel in one block, which
# ContextMemory compiles together with the rest of its chunk step (inductor fuses the masking, softmax and
# column-sum passes over the probabilities). "flex": FlexAttention, compiled with the chunk step on a GPU (fused
# kernels); on a CPU it runs unfused.
CHUNK_ATTENTION = {"plain": in_one_go(chunk_attention), "blocked": in_one_go(chunk_attention_blocked),
                   "fused": in_one_go(chunk_attention_fused), "triton": in_one_go(chunk_attention_triton),
                   "compiled": in_one_go(functools.partial(chunk_attention_blocked, block=None)),
                   "flex": (flex_local_part, flex_memory_part)}


# ----------------------------------------------------------------------------- Triton kernels (GPU only)

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU build of torch: nothing above calls these without a GPU
    triton = None

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

    @triton.jit(do_not_specialize=["T"])
    def _rope_angles_kernel(pos, inv_freq, cos, sin, T, HALF, BT: tl.constexpr, BH: tl.constexpr):
        t = tl.program_id(0) * BT + tl.arange(0, BT)
        _angles(tl.load(pos + t, mask=t < T, other=0), t, inv_freq, cos, sin, T, HALF, BH)

    @triton.jit(do_not_specialize=["T"])
    def _piece_angles_kernel(pos_d, n, at, real, inv_freq, cos, sin, T, HALF, BT: tl.constexpr, BH: tl.constexpr):
        t = tl.program_id(0) * BT + tl.arange(0, BT)
        p = tl.load(pos_d) + t
        tl.store(at + t, p, mask=t < T)
        tl.store(real + t, t < tl.load(n), mask=t < T)
        _angles(p, t, inv_freq, cos, sin, T, HALF, BH)

    @triton.jit
    def _angles(pos, t, inv_freq, cos, sin, T, HALF, BH: tl.constexpr):
        """cos and sin of positions pos [BT] (rows t of the outputs), as rope_angles says."""
        i = tl.arange(0, BH)
        ok = (t[:, None] < T) & (i[None, :] < HALF)
        p = pos.to(tl.float64)
        f = tl.load(inv_freq + i, mask=i < HALF, other=0.0).to(tl.float64) / 6.283185307179586
        turns = p[:, None] * f[None, :]
        # In [-pi, pi): the range where the GPU's fast float32 cosine and sine are most accurate.
        a = ((turns - tl.floor(turns + 0.5)) * 6.283185307179586).to(tl.float32)
        at = t[:, None] * (2 * HALF) + i[None, :]
        c, s = tl.cos(a).to(cos.dtype.element_ty), tl.sin(a).to(sin.dtype.element_ty)
        tl.store(cos + at, c, mask=ok)
        tl.store(cos + at + HALF, c, mask=ok)
        tl.store(sin + at, s, mask=ok)
        tl.store(sin + at + HALF, s, mask=ok)

    @triton.jit(do_not_specialize=["T"])
    def _rotate_kernel(x, cos, sin, out, T, HALF, SXH, SXT, ROW, BT: tl.constexpr, BH: tl.constexpr):
        h, t = tl.program_id(0), tl.program_id(1) * BT + tl.arange(0, BT)
        i = tl.arange(0, BH)
        ok = (t[:, None] < T) & (i[None, :] < HALF)
        src = x + h * SXH + t[:, None] * SXT + i[None, :]
        x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=ok, other=0.0).to(tl.float32)
        a = t[:, None] * ROW + i[None, :]
        c = tl.load(cos + a, mask=ok, other=0.0).to(tl.float32)
        s = tl.load(sin + a, mask=ok, other=0.0).to(tl.float32)
        dst = out + h * T * 2 * HALF + t[:, None] * 2 * HALF + i[None, :]
        tl.store(dst, (x1 * c - x2 * s).to(out.dtype.element_ty), mask=ok)
        tl.store(dst + HALF, (x2 * c + x1 * s).to(out.dtype.element_ty), mask=ok)

    @triton.jit
    def _rms_norm_kernel(x, h, total, weight, out, D, SX, SH, eps, ADD: tl.constexpr, BD: tl.constexpr):
        r, d = tl.program_id(0), tl.arange(0, BD)
        xf = tl.load(x + r * SX + d, mask=d < D, other=0.0)
        if ADD:  # the residual sum first, rounded to x's dtype as x + h is, and kept
            xf = (xf.to(tl.float32) + tl.load(h + r * SH + d, mask=d < D, other=0.0).to(tl.float32)).to(x.dtype.element_ty)
            tl.store(total + r * D + d, xf, mask=d < D)
        xf = xf.to(tl.float32)
        normed = (xf * tl.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)).to(x.dtype.element_ty)
        w = tl.load(weight + d, mask=d < D, other=0.0)
        tl.store(out + r * D + d, (normed.to(tl.float32) * w.to(tl.float32)).to(out.dtype.element_ty), mask=d < D)

    @triton.jit
    def _silu_mul_kernel(gate_up, out, F, BLOCK: tl.constexpr):
        r, j = tl.program_id(0).to(tl.int64), tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        g = tl.load(gate_up + r * 2 * F + j, mask=j < F, other=0.0).to(tl.float32)
        silu = (g / (1.0 + tl.exp(-g))).to(out.dtype.element_ty)
        u = tl.load(gate_up + r * 2 * F + F + j, mask=j < F, other=0.0).to(tl.float32)
        tl.store(out + r * F + j, (silu.to(tl.float32) * u).to(out.dtype.element_ty), mask=j < F)

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

    @triton.jit
    def _gather_kernel(src_addr_k, src_addr_v, rows, dst_k, dst_v, dst_rows, row_numel, BLOCK: tl.constexpr,
                       SPLIT: tl.constexpr):
        i, j, kv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        d = tl.load(dst_rows + i)
        if d >= 0:  # hits copy nothing
            r = tl.load(rows + i)
            if kv == 0:
                _copy_row(src_addr_k.to(tl.int64).to(tl.pointer_type(dst_k.dtype.element_ty)), r, dst_k, d, j,
                          row_numel, BLOCK, SPLIT)
            else:
                _copy_row(src_addr_v.to(tl.int64).to(tl.pointer_type(dst_v.dtype.element_ty)), r, dst_v, d, j,
                          row_numel, BLOCK, SPLIT)

    @triton.jit
    def _scatter_kernel(src_k, src_v, rows, dst_addr_k, dst_addr_v, row_numel, BLOCK: tl.constexpr, SPLIT: tl.constexpr):
        i, j, kv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        r = tl.load(rows + i)
        if r >= 0:  # -1: a block that makes no unit
            if kv == 0:
                _copy_row(src_k, i, dst_addr_k.to(tl.int64).to(tl.pointer_type(src_k.dtype.element_ty)), r, j,
                          row_numel, BLOCK, SPLIT)
            else:
                _copy_row(src_v, i, dst_addr_v.to(tl.int64).to(tl.pointer_type(src_v.dtype.element_ty)), r, j,
                          row_numel, BLOCK, SPLIT)

    @triton.jit
    def _copy_row(src, r, dst, d, j, row_numel, BLOCK: tl.constexpr, SPLIT: tl.constexpr):
        """Program j's share of dst row d = src row r; one side is a host address, mapped for the GPU (Triton
        passes a small one as int32: the caller widens it first)."""
        for start in range(j * BLOCK, row_numel, SPLIT * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(src + r * row_numel + offs, mask=offs < row_numel)
            tl.store(dst + d * row_numel + offs, x, mask=offs < row_numel)
