"""The tests' independent oracle: InfLLM written from the rules of ../shared/INFLLM.md in float64, with the
explicit mask and positions over every token so far (no windows, no buffers, no pools, no lookup cache)."""
import math

import torch


def rotate(x, pos, inv_freq):
    """Rotary embedding written out: pairs (i, i + d/2) turn by pos * inv_freq[i]."""
    ang = pos.double()[:, None] * inv_freq.double()[None, :]
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], dim=-1)


def fp8_round(x):
    """One unit's keys (or values) of one head [B, D] through float8 e4m3, its largest magnitude at 448."""
    scale = x.abs().max().float().clamp(min=torch.finfo(torch.float32).tiny) / 448.0
    return ((x.float() / scale).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


class DenseInfLLM:
    """One layer of InfLLM in float64: each chunk's attention is one softmax over every token so far,
    with a per-(query, key) choice of part. stream: StreamingLLM (tokens past init and window are gone).
    With cfg.unit_dtype == "fp8" a unit's tokens are seen, once it is made, through float8 (the engine's)."""

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
            else:  # the chunk's mean query, heads concatenated, dotted with each representative key
                mean = q_mem.mean(dim=1).reshape(-1)
                rel = torch.tensor([float(mean @ r) for r in self.reprs], dtype=torch.float64)
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
            parts = []  # per query head: the mean key of its repr_topk best-scored tokens
            for h in range(self.score.shape[0]):
                top = idx[self.score[h, idx].topk(c.repr_topk).indices]
                parts.append(self.K[h // G, top].mean(dim=0))
            for i in idx.tolist():
                self.state[i] = len(self.reprs)
            self.reprs.append(torch.cat(parts))
            if self.fp8:  # from now on the unit's tokens are seen only as stored: rounded to float8 e4m3
                for kv in range(self.K.shape[0]):
                    self.K[kv, idx] = fp8_round(self.K[kv, idx])
                    self.V[kv, idx] = fp8_round(self.V[kv, idx])


class LRUModel:
    """The eviction rule in plain Python, a list of units from least to most recently used: evict the least
    recently used unselected unit, ties to the lower unit number, only when the cache is full."""

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
