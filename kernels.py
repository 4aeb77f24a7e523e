"""The attention arithmetic of InfLLM, in plain PyTorch: what infllm.py calls, and the specification
every faster path (engine/) is tested against. It runs on any device and in float64.

Shapes are per sequence (batch 1): queries [Hq, T, D], keys and values [Hkv, L, D] with Hq a multiple of
Hkv (grouped-query attention: query head h reads key head h // (Hq / Hkv)), masks [T, L] with True where
a query may see a key. In order:
  - chunk_attention: the two parts of InfLLM's attention (local window, memory), each a softmax, merged
    by their log-sum-exps into one softmax over both; and the local column sums, the attention each window
    key received, from which a unit's representative keys are chosen. causal_attention: the full baseline.
  - the lookup: representative_keys of a new unit, score_units (the mean query against each unit's key),
    select_units (the topk best, ascending).
  - faster paths with the same results: chunk_attention_blocked (a CPU's: blocked over queries, one softmax
    in place), and chunk_attention_flex (FlexAttention with block masks, fused under torch.compile on a GPU).
"""
import math

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


def representative_keys(k_blocks, scores, repr_topk: int):
    """Representative keys per query head for each new memory unit: the mean of the (unrotated) keys of
    the repr_topk tokens with the highest local score for that head. k_blocks [n, Hkv, B, D], scores
    [n, Hq, B] -> [n, Hq * D], heads concatenated: the layout the lookup dots with."""
    n, Hq, B = scores.shape
    k = expand_kv(k_blocks.transpose(0, 1), Hq).transpose(0, 1)  # [n, Hq, B, D]
    # (a sort, not topk: on rows this short torch.topk takes 4x longer on a GPU)
    top = scores.argsort(dim=-1, descending=True, stable=True)[..., :repr_topk]  # [n, Hq, r]
    picked = torch.gather(k, 2, top[..., None].expand(-1, -1, -1, k.shape[-1]))
    return picked.to(_acc(picked)).mean(dim=2).to(k_blocks.dtype).reshape(n, -1)


def score_units(q_mem, reprs, real, over_heads=None):
    """Relevance of every unit to a piece -> [n]: the piece's real queries averaged (q_mem [Hq, T, D] at the
    memory position; real [T]: False for padding), heads side by side, dotted with each unit's representative
    key (reprs [n, Hq * D]). over_heads: applied to the scores summed over these heads (tensor parallel: adds
    the other processes' heads, so that every process selects the units one process would)."""
    acc = _acc(q_mem)
    mean = (q_mem.to(acc) * real[:, None]).sum(dim=1) / real.sum().clamp(min=1)  # [Hq, D]
    scores = reprs.to(acc) @ mean.reshape(-1)
    return scores if over_heads is None else over_heads(scores)


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


def flex_memory_part(local, q_mem, k_mem, v_mem, mask_mem, column_sums=None):
    """The second half: the memory part, the merge and the local column sums (by column_sums, which takes
    local_column_sums' arguments; the engine passes its Triton kernel)."""
    q_local, k_local, mask_local, o_l, lse_l = local
    if k_mem.shape[1]:
        o_m, lse_m = _flex(q_mem, k_mem, v_mem, mask_mem)
        out, lse = merge_parts(o_l.float(), lse_l, o_m.float(), lse_m)
    else:
        out, lse = o_l, lse_l
    return out.to(q_local.dtype), (column_sums or local_column_sums)(q_local, k_local, lse.float(), mask_local)


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
    q [Hq, T, D], k [Hkv, L, D], lse [Hq, T] fp32, mask [T, L] -> [Hq, L] fp32 (engine/attention.py has
    a Triton kernel that never writes the [T, L] probabilities)."""
    return torch.exp(_logits(q, k, mask) - lse[..., None]).nan_to_num(0.0).sum(dim=1).float()
