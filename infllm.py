"""InfLLM's context memory (Xiao et al. 2024, arXiv 2402.04617) and its two baselines.

A cache object per layer stands behind one interface, attend(q, k, v) -> output, with q, k unrotated:
  - FullCache: every past token at its true position (the model as trained; quadratic).
  - StreamCache: the first n_init tokens and a local window of n_local (StreamingLLM / LM-Infinite).
  - ContextMemory: InfLLM. Every query attends to
      the local window  - the last n_local tokens, rotated at their positions inside the window;
      the memory        - the n_init initial tokens, the topk memory units (blocks of block_size older
                          tokens) most relevant to the current chunk, and far tokens not yet cut into a
                          unit, all with unrotated keys and queries rotated at position n_local - 1, so
                          every distant token sits at one distance the model saw in training;
    both parts normalised by one softmax. Units live in host memory; at most max_cached_block of them
    per layer sit in a device pool kept by least-recent use.
The semantics follow ../shared/INFLLM.md; where the authors' code differs it is said below.
"""
from dataclasses import dataclass, fields

import torch

import kernels


@dataclass
class InfLLMConfig:
    """Defaults of the authors' Mistral / Llama-3 configurations. The rope base comes from the model."""
    n_init: int = 128
    n_local: int = 4096
    block_size: int = 128
    repr_topk: int = 4
    topk: int = 16
    max_cached_block: int = 32
    exc_block_size: int = 512
    chunk_size: int = 8192

    def check(self) -> "InfLLMConfig":
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or v < (0 if f.name == "n_init" else 1):
                raise ValueError(f"InfLLM setting {f.name}={v!r} must be a {'non-negative' if f.name == 'n_init' else 'positive'} integer")
        if self.exc_block_size > self.n_local:
            # A chunk's queries must all see each other through the window.
            raise ValueError(f"exc_block_size ({self.exc_block_size}) must not exceed n_local ({self.n_local})")
        if self.topk > self.max_cached_block:
            raise ValueError(f"topk ({self.topk}) must not exceed max_cached_block ({self.max_cached_block}): selected units must fit in the device cache")
        if self.repr_topk > self.block_size:
            raise ValueError(f"repr_topk ({self.repr_topk}) must not exceed block_size ({self.block_size})")
        return self

    @classmethod
    def parse(cls, text: str) -> "InfLLMConfig":
        """'n_local=2048,topk=8' -> config (for the --infllm flag)."""
        cfg, names = cls(), {f.name for f in fields(cls)}
        for item in filter(None, (s.strip() for s in text.split(","))):
            key, sep, val = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in names:
                raise ValueError(f"unknown InfLLM setting {item!r} (known: {', '.join(sorted(names))})")
            try:
                setattr(cfg, key, int(val))
            except ValueError:
                raise ValueError(f"InfLLM setting {key} needs an integer, got {val.strip()!r}") from None
        return cfg.check()


class FullCache:
    """Every token at its true position: the model as it was trained (and quadratic in length)."""

    def __init__(self, rope, n_kv_heads, head_dim):
        self.rope, self.length = rope, 0
        self.k = self.v = None  # [B, Hkv, capacity, D], rotated; allocated like the first keys
        self.shape = (n_kv_heads, head_dim)

    def attend(self, q, k, v):
        B, T = q.shape[0], q.shape[2]
        pos = torch.arange(self.length, self.length + T, device=q.device)
        q, k = self.rope(q, pos), self.rope(k, pos)  # stored rotated: positions never change
        self._grow(B, self.length + T, k)
        self.k[:, :, self.length:self.length + T] = k
        self.v[:, :, self.length:self.length + T] = v
        self.length += T
        return kernels.causal_attention(q, self.k[:, :, :self.length], self.v[:, :, :self.length])

    def _grow(self, B, need, like):
        cap = 0 if self.k is None else self.k.shape[2]
        if need <= cap:
            return
        new_cap = max(need, 2 * cap, 256)  # doubling: amortised O(1) appends
        k = like.new_zeros(B, *self.shape[:1], new_cap, self.shape[1])
        v = torch.zeros_like(k)
        if cap:
            k[:, :, :cap], v[:, :, :cap] = self.k, self.v
        self.k, self.v = k, v


class MemoryUnits:
    """The memory units of one layer: each unit's K/V block in host storage (pinned when there is a GPU),
    its representative key on the device, and a pool of max_cached_block device slots kept by LRU.
    A unit is an index into this storage, never a Python object. The bookkeeping is tensor arithmetic
    on the device: a lookup never waits for the host."""

    AGE = 1 << 24  # slot age key = last use * AGE + unit: ties between units used together go to the lower

    def __init__(self, cfg: InfLLMConfig, n_heads, n_kv_heads, head_dim, device, dtype):
        self.cfg, self.device, self.dtype = cfg, torch.device(device or "cpu"), dtype
        self.block = (n_kv_heads, cfg.block_size, head_dim)
        self.count = 0
        self.host_k = self.host_v = self._host(0)
        self.reprs = torch.empty(0, n_heads * head_dim, device=device, dtype=dtype)
        self.unit_slot = torch.full((1,), -1, dtype=torch.long, device=device)  # unit -> slot; last entry: scratch
        S = cfg.max_cached_block
        self.pool_k = torch.zeros(S + 1, *self.block, device=device, dtype=dtype)  # slot S: scratch
        self.pool_v = torch.zeros_like(self.pool_k)
        self.slot_unit = torch.full((S,), -1, dtype=torch.long, device=device)
        self.slot_used = torch.full((S,), -1, dtype=torch.long, device=device)  # clock of last use; -1: free
        self.clock = self.lookups = 0
        self.hits = torch.zeros((), dtype=torch.long, device=device)
        self.misses = torch.zeros((), dtype=torch.long, device=device)

    def _host(self, n):
        return torch.empty(n, *self.block, dtype=self.dtype, pin_memory=self.device.type == "cuda")

    def add(self, k_blocks, v_blocks, reprs):
        """Store new units [n, Hkv, B, D] with their representative keys [n, Hq * D]."""
        n = k_blocks.shape[0]
        if self.count + n > self.host_k.shape[0]:
            self.reserve(max(self.count + n, 2 * self.host_k.shape[0], 16))
        sl = slice(self.count, self.count + n)
        self.host_k[sl].copy_(k_blocks, non_blocking=True)  # device -> pinned host, asynchronous
        self.host_v[sl].copy_(v_blocks, non_blocking=True)
        self.reprs[sl] = reprs
        self.count += n

    def reserve(self, cap):
        """Room for cap units. Growing pinned storage is slow (allocation and a copy), so a prefill
        reserves what the prompt needs once."""
        if cap > self.host_k.shape[0]:
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()  # pending copies into the old storage
            for name in ("host_k", "host_v"):
                new = self._host(cap)
                new[:self.count] = getattr(self, name)[:self.count]
                setattr(self, name, new)
            self.reprs = torch.cat([self.reprs, self.reprs.new_empty(cap - self.reprs.shape[0], self.reprs.shape[1])])
            old = self.unit_slot.shape[0] - 1  # entries past count are -1 already
            self.unit_slot = torch.cat([self.unit_slot[:-1], self.unit_slot.new_full((cap + 1 - old,), -1)])

    def lookup(self, q_mem):
        """The units this chunk attends to: topk by representative score (every unit while there are
        no more than topk), loaded into device slots. Returns (units, slots)."""
        scores = kernels.score_units(q_mem, self.reprs[:self.count])
        units = kernels.select_units(scores, self.cfg.topk)
        return units, self.fetch(units)

    def fetch(self, units):
        """Bring the selected units into device slots. Each missing unit evicts the least recently used
        unit that is not selected now (free slots first; among units last used together, the lower one)."""
        self.clock += 1
        self.lookups += 1
        slots = self.unit_slot[units]
        hit = slots >= 0
        self.hits += hit.sum()
        self.misses += (~hit).sum()
        # Eviction order over slots: free ones first, then by age; slots of selected units never.
        age = self.slot_used * self.AGE + self.slot_unit
        protect = torch.where(hit, torch.iinfo(torch.long).max, torch.iinfo(torch.long).min)
        age.scatter_reduce_(0, slots.clamp(min=0), protect, reduce="amax")
        order = age.argsort()
        victim = torch.where(hit, slots, order[((~hit).cumsum(0) - 1).clamp(min=0)])
        old = self.slot_unit[victim]
        scratch = self.unit_slot.shape[0] - 1
        self.unit_slot[torch.where(~hit & (old >= 0), old, scratch)] = -1
        self._load(units, torch.where(hit, -1, victim))
        self.slot_unit[victim] = units
        self.unit_slot[units] = victim
        self.slot_used[victim] = self.clock
        return victim

    def _load(self, units, dst):
        """pool[dst[i]] = storage[units[i]] where dst[i] >= 0 (the misses)."""
        if self.host_k.device == self.pool_k.device:  # CPU: host and pool are both plain buffers
            d = torch.where(dst >= 0, dst, self.pool_k.shape[0] - 1)  # hits write the scratch slot
            self.pool_k[d] = self.host_k[units]
            self.pool_v[d] = self.host_v[units]
        else:  # GPU: a kernel reads the pinned host rows directly (no host sync, no staging copy)
            kernels.gather_from_host(self.host_k, units, self.pool_k, dst)
            kernels.gather_from_host(self.host_v, units, self.pool_v, dst)

    def cached_units(self):
        """Units in the pool, least recently used first (for tests and inspection)."""
        order = (self.slot_used * self.AGE + self.slot_unit).argsort()
        order = order[self.slot_unit[order] >= 0]
        return self.slot_unit[order].tolist()


class ContextMemory:
    """InfLLM's context memory for one layer (batch size 1)."""

    use_units = True

    def __init__(self, rope, cfg: InfLLMConfig, n_heads, n_kv_heads, head_dim, device=None, dtype=None,
                 kernel="blocked"):
        self.rope, self.cfg = rope, cfg.check()
        self.chunk_attention = kernels.CHUNK_ATTENTION[kernel]  # "plain" is the specification
        self.n_heads = n_heads
        empty = torch.empty(n_kv_heads, 0, head_dim, device=device, dtype=dtype)
        self.init_k = self.init_v = empty  # the first n_init tokens to leave the window, kept forever
        # `recent`: tokens not yet in init or a unit, oldest first: the local window plus the far
        # remainder (fewer than block_size tokens) waiting to fill a unit. Keys unrotated.
        self.recent_k = self.recent_v = empty
        self.recent_score = torch.empty(n_heads, 0, device=device)  # local score per query head, fp32
        self.units = MemoryUnits(cfg, n_heads, n_kv_heads, head_dim, device, dtype)
        self.trace = None  # set to a list to record every chunk's selected units (tests, inspection)

    def reserve(self, n_tokens):
        """Prepare the unit storage for a sequence of n_tokens."""
        if self.use_units:
            self.units.reserve(n_tokens // self.cfg.block_size + 1)

    def attend(self, q, k, v):
        if q.shape[0] != 1:
            raise ValueError(f"InfLLM context memory holds one sequence; got batch size {q.shape[0]}")
        exc = self.cfg.exc_block_size
        outs = [self._attend_chunk(q[0, :, s:s + exc], k[0, :, s:s + exc], v[0, :, s:s + exc])
                for s in range(0, q.shape[2], exc)]
        return torch.cat(outs, dim=1)[None]

    def _attend_chunk(self, q, k, v):
        """One chunk of at most exc_block_size queries [Hq, T, D]: attend, then update the memory."""
        n_local, T = self.cfg.n_local, q.shape[1]
        before = self.recent_k.shape[1]
        self.recent_k = torch.cat([self.recent_k, k], dim=1)
        self.recent_v = torch.cat([self.recent_v, v], dim=1)
        self.recent_score = torch.cat([self.recent_score, self.recent_score.new_zeros(self.n_heads, T)], dim=1)

        # Local part: the window keys at positions 0..L-1, the chunk's queries at the last T of them.
        L = min(before, n_local) + T
        dev = q.device
        pos = torch.arange(L, device=dev)
        q_local = self.rope(q, pos[L - T:])
        k_local = self.rope(self.recent_k[:, -L:], pos)
        dist = (L - T + torch.arange(T, device=dev))[:, None] - pos[None, :]
        mask_local = (dist >= 0) & (dist < n_local)

        # Memory part: all its keys at position 0 and the queries at n_local - 1.
        q_mem = self.rope(q, torch.full((T,), n_local - 1, device=dev))
        k_mem, v_mem, mask_mem = self._memory(q_mem, before)

        out, col_sums = self.chunk_attention(q_local, k_local, self.recent_v[:, -L:], mask_local,
                                             q_mem, k_mem, v_mem, mask_mem)
        self.recent_score[:, -L:] += col_sums
        self._retire()
        return out

    def _memory(self, q_mem, before):
        """Keys, values and mask of the memory part: selected units, init tokens, and the far remainder.
        A remainder token is seen by a query more than n_local - 1 tokens after it, so every token is
        seen in exactly one part. (The authors' code lets each chunk see its whole far remainder,
        some of it also through the window; the difference is a few tokens per query.)"""
        n_local, T = self.cfg.n_local, q_mem.shape[1]
        n_far = max(before + T - n_local, 0)  # recent tokens out of reach of the chunk's last query
        dev = q_mem.device
        dist = (before + torch.arange(T, device=dev))[:, None] - torch.arange(n_far, device=dev)[None, :]
        keys, values = [self.init_k, self.recent_k[:, :n_far]], [self.init_v, self.recent_v[:, :n_far]]
        if self.use_units and self.units.count:
            units, slots = self.units.lookup(q_mem)
            if self.trace is not None:
                self.trace.append(units.tolist())
            Hkv, B, D = self.units.block
            keys.insert(0, self.units.pool_k[slots].transpose(0, 1).reshape(Hkv, -1, D))
            values.insert(0, self.units.pool_v[slots].transpose(0, 1).reshape(Hkv, -1, D))
        n_always = sum(x.shape[1] for x in keys[:-1])
        mask = torch.cat([torch.ones(T, n_always, dtype=torch.bool, device=dev), dist >= n_local], dim=1)
        return torch.cat(keys, dim=1), torch.cat(values, dim=1), mask

    def _retire(self):
        """Tokens that left the window fill init first; after that every full block_size run of them
        becomes a memory unit, its representative key chosen by the tokens' local scores."""
        extra = self.recent_k.shape[1] - self.cfg.n_local
        take = min(self.cfg.n_init - self.init_k.shape[1], max(extra, 0))
        if take > 0:
            self.init_k = torch.cat([self.init_k, self.recent_k[:, :take]], dim=1)
            self.init_v = torch.cat([self.init_v, self.recent_v[:, :take]], dim=1)
            self._drop(take)
            extra -= take
        n = max(extra, 0) // self.cfg.block_size
        if n:
            self._to_units(n)

    def _to_units(self, n):
        B = self.cfg.block_size
        Hkv, _, D = self.recent_k.shape
        k = self.recent_k[:, :n * B].reshape(Hkv, n, B, D).transpose(0, 1)
        v = self.recent_v[:, :n * B].reshape(Hkv, n, B, D).transpose(0, 1)
        score = self.recent_score[:, :n * B].reshape(self.n_heads, n, B).transpose(0, 1)
        self.units.add(k, v, kernels.representative_keys(k, score, self.cfg.repr_topk))
        self._drop(n * B)

    def _drop(self, n):
        self.recent_k, self.recent_v = self.recent_k[:, n:], self.recent_v[:, n:]
        self.recent_score = self.recent_score[:, n:]


class StreamCache(ContextMemory):
    """StreamingLLM / LM-Infinite: init tokens and the local window, positions as in InfLLM; tokens that
    leave the window after init is full are forgotten."""

    use_units = False

    def _memory(self, q_mem, before):
        T = q_mem.shape[1]
        mask = torch.ones(T, self.init_k.shape[1], dtype=torch.bool, device=q_mem.device)
        return self.init_k, self.init_v, mask

    def _to_units(self, n):
        self._drop(n * self.cfg.block_size)


def make_caches(model, attention: str = "full", cfg: InfLLMConfig | None = None, kernel: str = "blocked"):
    """One cache per layer, on the model's device and dtype. kernel picks the chunk attention of
    kernels.py: "plain" (the specification) or a faster path with the same results."""
    a = model.args
    p = model.embed_tokens.weight
    if attention == "full":
        return [FullCache(model.rope, a.n_kv_heads, a.head_dim) for _ in range(a.n_layers)]
    kind = {"infllm": ContextMemory, "stream": StreamCache}.get(attention)
    if kind is None:
        raise ValueError(f"unknown attention {attention!r} (choose full, stream or infllm)")
    cfg = cfg or InfLLMConfig()
    return [kind(model.rope, cfg, a.n_heads, a.n_kv_heads, a.head_dim, p.device, p.dtype, kernel)
            for _ in range(a.n_layers)]


def memory_stats(caches) -> dict:
    """Lookups, unit-cache hits and misses summed over layers."""
    units = [c.units for c in caches if isinstance(c, ContextMemory) and c.use_units]
    hits, misses = sum(int(u.hits) for u in units), sum(int(u.misses) for u in units)
    return {"units": sum(u.count for u in units), "lookups": sum(u.lookups for u in units),
            "hits": hits, "misses": misses, "hit_rate": hits / (hits + misses) if hits + misses else None}
