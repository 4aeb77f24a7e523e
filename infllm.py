"""InfLLM (Xiao et al. 2024, arXiv 2402.04617): a training-free context memory, and its two baselines.

A model trained on a few thousand tokens cannot attend over 100K: positions it never saw, and too much
distant noise. InfLLM keeps every query's attention small and in-distribution. Each query attends to
  - the initial tokens (n_init, attention sinks), kept forever;
  - the local window, the n_local most recent tokens, at their true distances;
  - a few memory units: blocks of block_size older tokens, the topk most relevant to the current chunk,
    found by comparing the chunk's mean query with each unit's representative key.
Initial tokens, units and the far remainder (tokens out of the window, not yet cut into a unit) all sit
at one fixed distance, n_local - 1: keys unrotated, queries rotated there. One softmax covers everything.

This file is the reference: plain PyTorch, host integers, chunk by chunk in the paper's order
(../shared/INFLLM.md states the exact behaviour). Each layer gets a cache, attend(q, k, v) -> output
with q and k unrotated (the cache decides the positions):
  FullCache      every past token at its true position: the model as trained (quadratic).
  StreamCache    init tokens and the local window (StreamingLLM / LM-Infinite).
  ContextMemory  InfLLM.
engine/ computes the same in fixed shapes on a GPU; tests/test_engine.py proves the two equal.
"""
from collections import OrderedDict
from dataclasses import dataclass, fields

import torch

import kernels


@dataclass
class InfLLMConfig:
    """Defaults of the authors' Mistral-7B / Llama-3-8B configurations; the rope base comes from the model."""
    n_init: int = 128           # initial tokens kept forever (attention sinks)
    n_local: int = 4096         # local window
    block_size: int = 128       # tokens per memory unit
    repr_topk: int = 4          # representative tokens per unit, by local attention score
    topk: int = 16              # units attended per chunk
    max_cached_block: int = 32  # units per layer in the device pool (LRU): speed and memory, never the output
    exc_block_size: int = 512   # queries per lookup (one when decoding)
    chunk_size: int = 8192      # prompt tokens fed through the model at a time
    # Not in the paper; the engine's alone (engine/), never a change of the algorithm:
    unit_dtype: str = "model"   # "fp8": units stored in float8 e4m3, a scale per unit and head
    unit_storage: str = "auto"  # where units are stored on a GPU: "host" (the paper's), "device", "auto"

    CHOICES = {"unit_dtype": ("model", "fp8"), "unit_storage": ("auto", "host", "device")}

    def check(self) -> "InfLLMConfig":
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in self.CHOICES:
                if v not in self.CHOICES[f.name]:
                    raise ValueError(f"InfLLM setting {f.name}={v!r} must be one of {', '.join(self.CHOICES[f.name])}")
            elif not isinstance(v, int) or v < (0 if f.name == "n_init" else 1):
                kind = "non-negative" if f.name == "n_init" else "positive"
                raise ValueError(f"InfLLM setting {f.name}={v!r} must be a {kind} integer")
        if self.exc_block_size > self.n_local:  # a chunk's queries must all see each other through the window
            raise ValueError(f"exc_block_size ({self.exc_block_size}) must not exceed n_local ({self.n_local})")
        if self.topk > self.max_cached_block:
            raise ValueError(f"topk ({self.topk}) must not exceed max_cached_block ({self.max_cached_block}): "
                             "selected units must fit in the device cache")
        if self.repr_topk > self.block_size:
            raise ValueError(f"repr_topk ({self.repr_topk}) must not exceed block_size ({self.block_size})")
        return self

    @classmethod
    def parse(cls, text: str) -> "InfLLMConfig":
        """'n_local=2048,topk=8' -> config (the --infllm flag)."""
        cfg, names = cls(), {f.name for f in fields(cls)}
        for item in filter(None, (s.strip() for s in text.split(","))):
            key, sep, val = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in names:
                raise ValueError(f"unknown InfLLM setting {item!r} (known: {', '.join(sorted(names))})")
            try:
                setattr(cfg, key, val.strip() if key in cls.CHOICES else int(val))
            except ValueError:
                raise ValueError(f"InfLLM setting {key} needs an integer, got {val.strip()!r}") from None
        return cfg.check()


class ContextMemory:
    """InfLLM's context memory for one layer and one sequence.

    State, with host integers for every count:
      init_k, init_v      [Hkv, <= n_init, D]  the initial tokens
      recent_k, recent_v  [Hkv, R, D]          tokens not yet in init or a unit, oldest first: the local
                                               window and the far remainder; recent_score [Hq, R] is the
                                               attention each received from local queries so far
      unit_k, unit_v      [capacity, Hkv, block_size, D]  the memory units, in host memory
      reprs               [capacity, Hq * D]   each unit's representative key, on the device
      pool_k, pool_v      [max_cached_block, Hkv, block_size, D]  device slots the attention reads, kept by LRU
    Keys are stored unrotated: each part of the attention rotates them where it places them."""

    def __init__(self, rope, cfg: InfLLMConfig, n_heads, n_kv_heads, head_dim, device=None, dtype=None,
                 parallel=False):
        self.rope, self.cfg = rope, cfg.check()
        self.device, self.dtype = torch.device(device or "cpu"), dtype or torch.float32
        if cfg.unit_dtype != "model":
            raise ValueError(f"unit_dtype={cfg.unit_dtype} is not in the reference: run with --engine fast")
        if cfg.unit_storage == "device" and self.device.type == "cuda":
            raise ValueError("unit_storage=device is not in the reference (it keeps units in host memory, as the "
                             "paper does): run with --engine fast")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.parallel = parallel  # tensor parallel: this process holds a share of the heads (see lookup)
        block = (n_kv_heads, cfg.block_size, head_dim)
        self.unit_k = self.unit_v = torch.empty(0, *block, dtype=self.dtype)  # grown by reserve
        self.reprs = self._zeros(0, n_heads * head_dim)
        self.pool_k = self._zeros(cfg.max_cached_block, *block)
        self.pool_v = self._zeros(cfg.max_cached_block, *block)
        self.trace = None  # set to a list to record every lookup's selected units (tests, inspection)
        self.reset()

    def _zeros(self, *shape, dtype=None):
        return torch.zeros(*shape, device=self.device, dtype=dtype or self.dtype)

    def reset(self):
        """Start a new sequence (the unit storage stays allocated)."""
        self.pos = 0  # tokens seen
        self.init_k = self.init_v = self._zeros(self.n_kv_heads, 0, self.head_dim)
        self.recent_k = self.recent_v = self._zeros(self.n_kv_heads, 0, self.head_dim)
        self.recent_score = self._zeros(self.n_heads, 0, dtype=torch.float32)
        self.n_units = 0
        self.slot_of = OrderedDict()  # unit -> its slot in the device pool
        self.last_used = {}  # unit in the pool -> the lookup that last selected it
        self.clock = self.lookups = self.hits = self.misses = 0

    # ------------------------------------------------------------------ a chunk of queries

    def attend(self, q, k, v, n_valid=None):
        """q, k, v [1, H, T, D] (q, k unrotated) -> the attention output [1, Hq, T, D]. The prompt's
        chunks are cut into pieces of exc_block_size queries, each with a lookup of its own."""
        if n_valid is not None:
            raise ValueError("the reference takes no padded input: padded pieces are the engine's (engine/)")
        if q.shape[0] != 1:
            raise ValueError(f"InfLLM context memory holds one sequence; got batch size {q.shape[0]}")
        P = self.cfg.exc_block_size
        outs = [self.step(q[0, :, s:s + P], k[0, :, s:s + P], v[0, :, s:s + P]) for s in range(0, q.shape[2], P)]
        return torch.cat(outs, dim=1)[None]

    def step(self, q, k, v):
        """One piece: queries [Hq, T, D], keys and values [Hkv, T, D]. Look units up, attend to the
        local window and the memory under one softmax, then update the local scores and retire."""
        cfg, T, dev = self.cfg, q.shape[1], self.device
        first = self.pos  # the position of the piece's first query
        self.pos += T
        self.recent_k = torch.cat([self.recent_k, k], dim=1)
        self.recent_v = torch.cat([self.recent_v, v], dim=1)
        self.recent_score = torch.cat([self.recent_score, self._zeros(self.n_heads, T, dtype=torch.float32)], dim=1)
        start = self.pos - self.recent_k.shape[1]  # the position of the oldest recent token

        # Memory part: every key at distance n_local - 1 from its query (keys unrotated, queries there).
        q_mem = self.rope(q, torch.tensor([cfg.n_local - 1], device=dev))
        k_mem, v_mem, mask_mem = self.memory(self.lookup(q_mem), first, start)

        # Local part: the recent tokens less than n_local before a query, at positions 0..L-1 of the window.
        lo = max(0, first - cfg.n_local + 1 - start)  # the oldest recent token any query of the piece sees
        L = self.recent_k.shape[1] - lo
        k_pos, q_pos = torch.arange(L, device=dev), torch.arange(L - T, L, device=dev)
        dist = q_pos[:, None] - k_pos[None, :]
        mask_local = (dist >= 0) & (dist < cfg.n_local)
        q_local, k_local = self.rope(q, q_pos), self.rope(self.recent_k[:, lo:], k_pos)

        # One softmax over both parts (kernels.chunk_attention, blocked over queries for a CPU's caches).
        out, col_sums = kernels.chunk_attention_blocked(q_local, k_local, self.recent_v[:, lo:], mask_local,
                                                        q_mem, k_mem, v_mem, mask_mem)
        self.recent_score[:, lo:] += col_sums  # each window token's attention from these queries
        self.retire()
        return out

    def memory(self, slots, first, start):
        """The memory part's keys, values and mask [T, keys]: the selected units (from their pool slots),
        the init tokens, and the far remainder, the recent tokens n_local or more before some query."""
        Hkv, D, dev = self.n_kv_heads, self.head_dim, self.device
        k_units = self.pool_k[slots].transpose(0, 1).reshape(Hkv, -1, D)
        v_units = self.pool_v[slots].transpose(0, 1).reshape(Hkv, -1, D)
        n_far = max(0, self.pos - self.cfg.n_local - start)
        q_at = torch.arange(first, self.pos, device=dev)[:, None]
        far = (q_at - (start + torch.arange(n_far, device=dev))[None, :]) >= self.cfg.n_local
        seen = torch.ones(self.pos - first, k_units.shape[1] + self.init_k.shape[1], dtype=torch.bool, device=dev)
        return (torch.cat([k_units, self.init_k, self.recent_k[:, :n_far]], dim=1),
                torch.cat([v_units, self.init_v, self.recent_v[:, :n_far]], dim=1), torch.cat([seen, far], dim=1))

    # ------------------------------------------------------------------ lookup and the LRU pool

    def lookup(self, q_mem):
        """The topk units whose representative keys best match the piece's mean query (every unit while
        there are no more than topk), brought into the device pool. Returns their slots, in unit order."""
        n = self.n_units
        if n == 0:
            return []
        if n <= self.cfg.topk:
            units = list(range(n))
        else:
            acc = torch.promote_types(q_mem.dtype, torch.float32)
            query = q_mem.to(acc).mean(dim=1).reshape(-1)  # [Hq * D]: the mean query, heads side by side
            scores = self.reprs[:n].to(acc) @ query
            if self.parallel:  # a score sums over all heads: add the other processes' heads
                torch.distributed.all_reduce(scores)
            units = sorted(scores.topk(self.cfg.topk).indices.tolist())
        self.lookups += 1
        if self.trace is not None:
            self.trace.append(units)
        return self.fetch(units)

    def fetch(self, units):
        """Load the selected units into device slots. A unit not in the pool takes a free slot, else
        the slot of the least recently used unit not selected now (of units last used together, the
        lower one goes first). Returns the slots."""
        self.clock += 1
        for u in units:
            if u in self.slot_of:
                self.hits += 1
                continue
            self.misses += 1
            free = sorted(set(range(self.cfg.max_cached_block)) - set(self.slot_of.values()))
            if free:
                slot = free[0]
            else:
                victim = min((w for w in self.slot_of if w not in units), key=lambda w: (self.last_used[w], w))
                slot = self.slot_of.pop(victim)
                del self.last_used[victim]
            self.pool_k[slot].copy_(self.unit_k[u], non_blocking=True)  # host -> device
            self.pool_v[slot].copy_(self.unit_v[u], non_blocking=True)
            self.slot_of[u] = slot
        for u in units:
            self.last_used[u] = self.clock
        return [self.slot_of[u] for u in units]

    # ------------------------------------------------------------------ retirement

    def retire(self):
        """Tokens that left the window fill init first; after that every full block_size run of them
        becomes a memory unit, its representative key chosen by the tokens' local scores."""
        cfg, B = self.cfg, self.cfg.block_size
        extra = self.recent_k.shape[1] - cfg.n_local  # recent tokens beyond the window
        take = max(0, min(cfg.n_init - self.init_k.shape[1], extra))
        if take:
            self.init_k = torch.cat([self.init_k, self.recent_k[:, :take]], dim=1)
            self.init_v = torch.cat([self.init_v, self.recent_v[:, :take]], dim=1)
            self._drop(take)
        n = max(0, extra - take) // B
        if n:
            k, v = (x[:, :n * B].reshape(self.n_kv_heads, n, B, -1).transpose(0, 1) for x in (self.recent_k, self.recent_v))
            score = self.recent_score[:, :n * B].reshape(self.n_heads, n, B).transpose(0, 1)
            self.store_units(k, v, score)
            self._drop(n * B)

    def store_units(self, k, v, score):
        """New units [n, Hkv, B, D] to host memory, their representative keys (kernels.representative_keys:
        per query head, the mean key of its repr_topk best-scored tokens) to the device."""
        n, first = k.shape[0], self.n_units
        if first + n > self.unit_k.shape[0]:
            self._grow(max(first + n, 2 * self.unit_k.shape[0]))
        self.unit_k[first:first + n] = k.to("cpu")
        self.unit_v[first:first + n] = v.to("cpu")
        self.reprs[first:first + n] = kernels.representative_keys(k, score, self.cfg.repr_topk)
        self.n_units += n

    def reserve(self, n_tokens):
        """Room for the units of a sequence of n_tokens, allocated at once."""
        need = n_tokens // self.cfg.block_size + 1
        if need > self.unit_k.shape[0]:
            self._grow(need)

    def _grow(self, capacity):
        n, block = self.n_units, self.unit_k.shape[1:]
        pin = self.device.type == "cuda"  # page-locked: the copies into the pool need no staging
        unit_k, unit_v = (torch.empty(capacity, *block, dtype=self.dtype, pin_memory=pin) for _ in range(2))
        unit_k[:n], unit_v[:n] = self.unit_k[:n], self.unit_v[:n]
        reprs = self._zeros(capacity, self.reprs.shape[1])
        reprs[:n] = self.reprs[:n]
        self.unit_k, self.unit_v, self.reprs = unit_k, unit_v, reprs

    def _drop(self, n):
        self.recent_k, self.recent_v, self.recent_score = (x[:, n:] for x in (self.recent_k, self.recent_v, self.recent_score))

    # ------------------------------------------------------------------ statistics and snapshots

    def stats(self) -> dict:
        return {"units": self.n_units, "lookups": self.lookups, "hits": self.hits, "misses": self.misses}

    STATE = ("init_k", "init_v", "recent_k", "recent_v", "recent_score")
    COUNTS = ("pos", "n_units", "lookups", "hits", "misses")

    def snapshot(self, storage=True):
        """Everything that decides what this cache does next, as tensors. storage=False leaves out the
        units themselves: a unit never changes once stored and later ones go after it, so a rewind in
        this process needs only the count."""
        s = {name: getattr(self, name).clone() for name in self.STATE}
        s |= {name: torch.tensor(getattr(self, name)) for name in self.COUNTS}
        if storage:
            n = self.n_units
            s |= {"unit_k": self.unit_k[:n], "unit_v": self.unit_v[:n], "reprs": self.reprs[:n]}
        return s

    def restore(self, s):
        """Back to a snapshot. The device pool starts empty: which units sit there changes speed only."""
        for name in self.STATE + self.COUNTS:
            if name not in s:
                raise ValueError(f"the snapshot lacks {name!r}")
        heads = {"init_k": self.n_kv_heads, "init_v": self.n_kv_heads, "recent_k": self.n_kv_heads,
                 "recent_v": self.n_kv_heads, "recent_score": self.n_heads}
        for name in self.STATE:
            if s[name].shape[0] != heads[name] or (s[name].dim() == 3 and s[name].shape[2] != self.head_dim):
                raise ValueError(f"saved {name!r} does not fit this model")
        n = int(s["n_units"])
        if "unit_k" in s:
            if s["unit_k"].shape[1:] != self.unit_k.shape[1:] or s["reprs"].shape != (n, self.reprs.shape[1]):
                raise ValueError("saved units do not fit this model and these settings")
            if n > self.unit_k.shape[0]:
                self._grow(n)
            self.unit_k[:n], self.unit_v[:n], self.reprs[:n] = s["unit_k"], s["unit_v"], s["reprs"]
        elif n > self.unit_k.shape[0]:
            raise ValueError("a rewind cannot bring back units this storage never held")
        self.reset()
        for name in self.STATE:
            setattr(self, name, s[name].to(self.device, getattr(self, name).dtype).clone())
        for name in self.COUNTS:
            setattr(self, name, int(s[name]))


class StreamCache(ContextMemory):
    """StreamingLLM / LM-Infinite: init tokens and the local window, at the positions InfLLM gives them;
    tokens that leave the window once init is full are forgotten."""

    def reserve(self, n_tokens):
        pass

    def lookup(self, q_mem):
        return []

    def memory(self, slots, first, start):  # the init tokens alone
        seen = torch.ones(self.pos - first, self.init_k.shape[1], dtype=torch.bool, device=self.device)
        return self.init_k, self.init_v, seen

    def store_units(self, k, v, score):
        pass

    def stats(self):
        return None


class FullCache:
    """Every token at its true position: the model as it was trained (and quadratic in length)."""

    def __init__(self, rope, n_kv_heads, head_dim, device=None, dtype=None):
        self.rope, self.length = rope, 0
        self.k = self.v = None  # [B, Hkv, capacity, D], rotated; allocated like the first keys
        self.shape = (n_kv_heads, head_dim)
        self.like = torch.empty(0, device=device, dtype=dtype)

    @property
    def pos(self):
        return self.length

    def reserve(self, n_tokens):
        """Room for a sequence of n_tokens, allocated once (growth a chunk at a time doubles)."""
        self._grow(1, n_tokens, self.like, exact=True)

    def attend(self, q, k, v, n_valid=None):
        if n_valid is not None:
            raise ValueError("full attention takes no padded input (it is never replayed from CUDA graphs)")
        B, T = q.shape[0], q.shape[2]
        pos = torch.arange(self.length, self.length + T, device=q.device)
        q, k = self.rope(q, pos), self.rope(k, pos)  # stored rotated: positions never change
        self._grow(B, self.length + T, k)
        self.k[:, :, self.length:self.length + T] = k
        self.v[:, :, self.length:self.length + T] = v
        self.length += T
        return kernels.causal_attention(q, self.k[:, :, :self.length], self.v[:, :, :self.length])

    def reset(self):
        self.length = 0

    def snapshot(self, storage=True):
        """The keys and values so far."""
        s = {"length": torch.tensor(self.length)}
        if storage and self.length:
            s |= {"k": self.k[:, :, :self.length], "v": self.v[:, :, :self.length]}
        return s

    def restore(self, s):
        n = int(s["length"])
        if "k" in s and n:
            k = s["k"].to(self.rope.inv_freq.device)
            expect = (*self.shape[:1], n, self.shape[1])
            if tuple(k.shape[1:]) != expect:
                raise ValueError(f"saved keys have shape {tuple(k.shape[1:])}, this model's are {expect}")
            self._grow(k.shape[0], n, k if self.k is None else self.k)
            self.k[:, :, :n], self.v[:, :, :n] = k, s["v"]
        self.length = n

    def _grow(self, B, need, like, exact=False):
        cap = 0 if self.k is None else self.k.shape[2]
        if need <= cap:
            return
        new_cap = need if exact else max(need, 2 * cap, 256)  # doubling: amortised O(1) appends
        k = like.new_zeros(B, *self.shape[:1], new_cap, self.shape[1])
        v = torch.zeros_like(k)
        if cap:
            k[:, :, :cap], v[:, :, :cap] = self.k, self.v
        self.k, self.v = k, v


def make_caches(model, attention: str = "full", cfg: InfLLMConfig | None = None):
    """One reference cache per layer, on the model's device and dtype."""
    a, p = model.args, model.embed_tokens.weight
    if attention == "full":
        return [FullCache(model.rope, a.n_kv_heads, a.head_dim, p.device, p.dtype) for _ in range(a.n_layers)]
    kind = {"infllm": ContextMemory, "stream": StreamCache}.get(attention)
    if kind is None:
        raise ValueError(f"unknown attention {attention!r} (choose full, stream or infllm)")
    # Split over processes (tensor parallel), a.n_heads and a.n_kv_heads are this process's share.
    return [kind(model.rope, cfg or InfLLMConfig(), a.n_heads, a.n_kv_heads, a.head_dim, p.device, p.dtype,
                 a.tp_size > 1) for _ in range(a.n_layers)]


def memory_stats(caches) -> dict:
    """Units stored, lookups, and the device pool's hits and misses, summed over layers (either engine)."""
    stats = [s for s in (getattr(c, "stats", lambda: None)() for c in caches) if s is not None]
    total = {k: sum(s[k] for s in stats) for k in ("units", "lookups", "hits", "misses")}
    seen = total["hits"] + total["misses"]
    return total | {"hit_rate": total["hits"] / seen if seen else None}
