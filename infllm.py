"""InfLLM's context memory (Xiao et al. 2024, arXiv 2402.04617) and its two baselines.

A cache object per layer stands behind one interface, attend(q, k, v) -> output, with q, k unrotated:
  - FullCache: every past token at its true position (the model as trained; quadratic).
  - StreamCache: the first n_init tokens and a local window of n_local (StreamingLLM / LM-Infinite).
  - ContextMemory: InfLLM. Every query attends to
      the local window  - the last n_local tokens, at their true distances from the query;
      the memory        - the n_init initial tokens, the topk memory units (blocks of block_size older
                          tokens) most relevant to the current chunk, and far tokens not yet cut into a
                          unit, all with unrotated keys and queries rotated at position n_local - 1, so
                          every distant token sits at one distance the model saw in training;
    both parts normalised by one softmax. Units live in host memory (on a GPU with room for them, in
    GPU memory: unit_storage); at most max_cached_block of them per layer sit in a device pool kept by
    least-recent use, which the attention reads.
The semantics follow ../shared/INFLLM.md; where the authors' code differs it is said below.
"""
import dataclasses
import functools
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

import kernels


UNIT_DTYPES = ("model", "fp8")
UNIT_STORAGE = ("auto", "host", "device")
MEMORY_POSITIONS = ("fixed", "ordered")
REPR_SCORING = ("mean", "best")
LOOKUP_QUERIES = ("mean", "each")


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
    # Not in the paper: "fp8" stores units (host storage and device pool) in float8 e4m3, one scale per
    # unit and head: half the host memory and half the bytes over PCIe per lookup. "model": the model's dtype.
    unit_dtype: str = "model"
    # Not in the paper: where the units are stored on a GPU. "host" (the reference): in CPU memory, so a
    # miss of the device pool copies its unit over PCIe (some 170 us a layer for a 7B model's decoding
    # step whose 16 units all miss). "device": in GPU memory (128K tokens of a 7B model take 16 GiB), so a
    # miss is a copy inside the GPU. "auto": "device" where the whole prompt's memory fits in the GPU
    # with room to spare, else "host" (place_units decides before the caches grow). The pool, its LRU and
    # every output stay the same. On a CPU all three are the same.
    unit_storage: str = "auto"
    # Not in the paper: where the memory part's keys sit. "fixed" (the reference): every memory key at one
    # distance, n_local - 1, so the order of the tokens inside a unit is lost. "ordered": the memory laid
    # out as one stretch of text just before the window, in document order (init tokens, the selected
    # units in ascending order, the far remainder), each key one position after the previous slot: the
    # nearest slot at the reference's distance, the farthest n_init + topk * block_size + exc_block_size +
    # block_size - 1 further (under 3K with the defaults, inside what the model saw in pre-training).
    memory_positions: str = "fixed"
    # Not in the paper: how a unit's representative tokens score it. "mean" (the reference): their keys
    # averaged per head, one key per head, dotted with the lookup's query. "best": the unit keeps the
    # repr_topk keys per head as they are, and each head takes the best of them (the unit scores by its
    # one token that best matches, not by an average that may match none); repr_topk times the device
    # memory of the representative keys.
    repr_scoring: str = "mean"
    # Not in the paper: which queries look units up. "mean" (the reference): the piece's queries averaged,
    # one lookup vector. "each": every query of the piece scores every unit and a unit keeps its best
    # query's score (a unit that one query needs is not outvoted by the rest of the piece); exc_block_size
    # times the lookup's arithmetic in the prefill, the same as "mean" when decoding (one query).
    lookup_queries: str = "mean"

    CHOICES = {"unit_dtype": UNIT_DTYPES, "unit_storage": UNIT_STORAGE, "memory_positions": MEMORY_POSITIONS,
               "repr_scoring": REPR_SCORING, "lookup_queries": LOOKUP_QUERIES}

    def check(self) -> "InfLLMConfig":
        for name, allowed in self.CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"InfLLM setting {name}={getattr(self, name)!r} must be one of {', '.join(allowed)}")
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in self.CHOICES:
                continue
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
                setattr(cfg, key, val.strip() if key in cls.CHOICES else int(val))
            except ValueError:
                raise ValueError(f"InfLLM setting {key} needs an integer, got {val.strip()!r}") from None
        return cfg.check()


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
        """The keys and values so far (see ContextMemory.snapshot)."""
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


class MemoryUnits:
    """The memory units of one layer: each unit's K/V block in storage (host memory, pinned when there is a
    GPU, or GPU memory: unit_storage), its representative key on the device, and a pool of max_cached_block
    device slots kept by LRU.
    A unit is an index into this storage, never a Python object. Every buffer has a fixed size and
    every counter lives on the device, so a lookup never waits for the host and the same kernels (one
    CUDA graph) serve every piece. Storage has one row more than its capacity: masked writes go there."""

    AGE = 1 << 24  # slot age key = last use * AGE + unit: ties between units used together go to the lower

    def __init__(self, cfg: InfLLMConfig, n_heads, n_kv_heads, head_dim, device, dtype, parallel=False, compiled=False,
                 fused=False):
        self.cfg, self.device, self.dtype = cfg, torch.device(device or "cpu"), dtype
        self.parallel = parallel  # tensor parallel: these are one process's share of the heads
        self.compiled = compiled  # read by the compiled piece step: growing storage is marked dynamic
        self.block = (n_kv_heads, cfg.block_size, head_dim)
        # fp8 units: their bytes as uint8 in storage and pool, a scale per unit, head and K/V on the device.
        self.fp8 = cfg.unit_dtype == "fp8"
        self.store = torch.uint8 if self.fp8 else dtype
        self.scales = torch.empty(0, 2, n_kv_heads, device=device) if self.fp8 else None
        counter = functools.partial(torch.zeros, (), dtype=torch.long, device=device)
        self.n, self.lookups, self.hits, self.misses, self.clock = (counter() for _ in range(5))
        self.storage_k = self.storage_v = torch.empty(0, *self.block, dtype=self.store)
        # On a GPU the storage is page-locked host memory, unless the units are stored on the device
        # (unit_storage=auto starts in host memory, and place may move them).
        self.host_pinned = self.device.type == "cuda" and cfg.unit_storage != "device"
        self.locked = [[], []]  # host_pinned: the addresses of the storage's page-locked slices
        self.pinned = 0  # host_pinned: rows [0, pinned) of both are page-locked (see pin)
        # The representative keys, per unit [Hq, r, D] flattened: r = 1 (their mean), or repr_topk (best).
        self.reprs = torch.empty(0, n_heads * repr_keys(cfg) * head_dim, device=device, dtype=dtype)
        self.last = None  # set to a dict to keep the last lookup's queries and scores (scripts/needle_units.py)
        self.unit_slot = torch.empty(0, dtype=torch.long, device=device)  # unit -> slot, -1: not cached
        S = cfg.max_cached_block
        self.pool_k = torch.zeros(S + 1, *self.block, device=device, dtype=self.store)  # slot S: scratch
        self.pool_v = torch.zeros_like(self.pool_k)
        self.slot_unit = torch.full((S + 1,), -1, dtype=torch.long, device=device)
        self.slot_used = torch.full((S + 1,), -1, dtype=torch.long, device=device)  # clock of last use; -1: free
        self.version = 0  # bumped when storage is reallocated (captured CUDA graphs hold its addresses)
        # On a GPU, units load on a stream of their own, beside the local part's attention; the indices
        # that copy reads sit in buffers of ours, so no later kernel reuses their memory meanwhile.
        # New units are written back to host memory on that stream too, from staging buffers of ours.
        # High priority, for two reasons. PyTorch hands out streams round-robin from a pool of 32 per
        # priority: at the default priority the loaders of 30 layers and the wavefront's streams (one per
        # layer, generate.FixedShapes) would share CUDA streams, and a layer's loads would wait behind
        # another layer's piece (SmolLM2's wavefront step took 12.3 ms instead of 5.6 on an H200). And a
        # load mostly waits on PCIe, holding few cores: scheduled first, it delays the rest little.
        self.loader = torch.cuda.Stream(self.device, priority=-1) if self.device.type == "cuda" else None
        self.load_units = torch.zeros(cfg.topk, dtype=torch.long, device=device)
        self.load_slots = torch.full((cfg.topk,), -1, dtype=torch.long, device=device)
        self.stage_k = self.stage_v = self.stage_rows = None
        # fused (an eager GPU, see ContextMemory): fetch's bookkeeping in one kernel, kernels.lru_fetch, which
        # ranks the slots by comparing every pair in one program: up to 128 slots.
        self.fused_fetch = fused and S <= 128
        # And the reference's unit scores in two kernels (kernels.unit_scores), tensor parallel's partial ones too
        # (-inf past the units stored on every process sums to -inf); the options take score_units.
        self.fused_scores = fused and cfg.repr_scoring == "mean" and cfg.lookup_queries == "mean"
        # The top-k that follows them, whatever scored them, in two kernels (kernels.select_top).
        self.fused_select = fused
        if self.loader is not None:
            most = new_units_most(cfg, cfg.exc_block_size)
            self.stage_k = torch.zeros(most, *self.block, device=device, dtype=self.store)
            self.stage_v = torch.zeros_like(self.stage_k)
            self.stage_rows = torch.zeros(most, dtype=torch.long, device=device)
        self.reserve(cfg.topk)

    def _new_storage(self, n):
        """Storage for n rows, and in pinned host memory the list of its page-locked slices (locked by pin)."""
        if self.host_pinned:
            return kernels.lockable_empty((n, *self.block), self.store)
        return torch.zeros(n, *self.block, dtype=self.store, device=self.device), None

    @property
    def capacity(self):
        return self.reprs.shape[0] - 1

    @property
    def count(self):
        """Units stored (a host sync: for statistics and tests)."""
        return int(self.n)

    def reset(self):
        """Forget every unit, keeping the buffers (and so any CUDA graph that reads them)."""
        for t, v in ((self.n, 0), (self.lookups, 0), (self.clock, 0), (self.hits, 0), (self.misses, 0),
                     (self.unit_slot, -1), (self.slot_unit, -1), (self.slot_used, -1)):
            t.fill_(v)

    def add(self, k_blocks, v_blocks, reprs, n_new=None):
        """Store the first n_new (a device count; default all) of the blocks [most, Hkv, B, D] as new
        units after the last one, with their representative keys [most, Hq * r * D]. The others go nowhere:
        a piece makes at most `most` units, and how many only the device knows."""
        most = k_blocks.shape[0]
        n_new = most if n_new is None else n_new
        j = torch.arange(most, device=self.n.device)
        rows = torch.where(j < n_new, self.n + j, self.capacity)  # row `capacity`: scratch
        if self.fp8:
            (k_blocks, k_scale), (v_blocks, v_scale) = kernels.to_fp8(k_blocks), kernels.to_fp8(v_blocks)
            self.scales.index_copy_(0, rows, torch.stack([k_scale, v_scale], dim=1))
        if self.storage_k.device == k_blocks.device:
            self.storage_k.index_copy_(0, rows, k_blocks)
            self.storage_v.index_copy_(0, rows, v_blocks)
        else:  # device -> pinned host, written by a kernel (the rows are known on the device only) on
            # the side stream; the staging buffers are next overwritten after the next join_copies().
            # A piece shorter than exc_block_size (decoding, an eager prompt's last piece) makes fewer.
            self.stage_k[:most].copy_(k_blocks)
            self.stage_v[:most].copy_(v_blocks)
            self.stage_rows.fill_(-1)  # -1: nothing crosses PCIe
            self.stage_rows[:most].copy_(torch.where(j < n_new, rows, -1))
            self._start_write_back()
        self.reprs.index_copy_(0, rows, reprs)
        self.n += n_new

    def reserve(self, cap):
        """Room for cap units. Growing pinned storage is slow (allocation and a copy), so a prefill
        reserves what the prompt needs once, exactly (a million tokens of a 7B model fill most of a
        host's memory); growth beyond that, a token at a time, comes in steps of an eighth. The unit
        dimension is marked dynamic for torch.compile: a longer prompt reallocates, and must not compile anew."""
        if cap <= self.capacity:
            return
        self._reallocate(grown_units(self.capacity, cap))

    def place(self, on_device: bool):
        """Store the units in GPU memory (on_device) or in pinned host memory from now on, moving those
        already stored (unit_storage=auto: see place_units)."""
        if self.device.type == "cuda" and on_device == self.host_pinned:
            self.host_pinned = not on_device
            self._reallocate(self.capacity)

    def _reallocate(self, cap):
        """New storage for cap units where host_pinned says, the units stored so far copied into it."""
        if self.device.type == "cuda":  # pending writes into the old storage, on both streams
            torch.cuda.current_stream(self.device).synchronize()
            self.loader.synchronize()
        n = max(self.capacity, 0)
        to_gpu = self.storage_k.device.type == "cpu" and self.device.type == "cuda" and not self.host_pinned
        for i, name in enumerate(("storage_k", "storage_v")):  # one at a time: the old one goes before the next
            new, self.locked[i] = self._new_storage(cap + 1)
            if to_gpu:  # from pinned host memory: CUDA refuses one copy across slices locked apart, so the
                # GPU reads the stored units as it loads them, before the old storage is unlocked
                rows = torch.arange(self.count, device=self.device)
                kernels.gather_from_host(getattr(self, name), rows, new, rows)
                torch.cuda.current_stream(self.device).synchronize()
            else:
                new[:n] = getattr(self, name)[:n]
            setattr(self, name, new)
            if self.host_pinned and n:  # the rows kept: the GPU may read them at once
                kernels.lock_rows(new, 0, n, self.locked[i], fresh=False)
        self.pinned = n if self.host_pinned else 0
        self.reprs = torch.cat([self.reprs[:n], self.reprs.new_zeros(cap + 1 - n, self.reprs.shape[1])])
        self.unit_slot = torch.cat([self.unit_slot[:n], self.unit_slot.new_full((cap + 1 - n,), -1)])
        if self.fp8:
            self.scales = torch.cat([self.scales[:n], self.scales.new_zeros(cap + 1 - n, *self.scales.shape[1:])])
        for t in (self.storage_k, self.storage_v, self.reprs, self.unit_slot) + ((self.scales,) if self.fp8 else ()):
            if self.compiled:
                torch._dynamo.mark_dynamic(t, 0)
        self.version += 1

    SLICE = 32 << 20  # bytes of each host tensor page-locked at a time, at least

    def pin(self, rows):
        """On a GPU, make rows [0, rows) of the host storage readable and writable by the GPU (page-locked
        and mapped) before any work that may touch them is queued. Locking the storage of a long prompt all
        at once held its first piece up by seconds (22 GB: 6.3 s on an H200 host); locked a slice at a time
        just ahead of the pieces, it costs the GPU nothing: cudaHostRegister does not wait for the GPU, and
        the host queues pieces ahead of it (docs/benchmarks.md)."""
        if not self.host_pinned or rows <= self.pinned:
            return
        row_bytes = self.storage_k[0].numel() * self.storage_k.element_size()
        rows = min(max(rows, self.pinned + -(-self.SLICE // row_bytes)), self.storage_k.shape[0])
        for t, locked in zip((self.storage_k, self.storage_v), self.locked):
            kernels.lock_rows(t, self.pinned, rows, locked)  # rows never written: touched first
        self.pinned = rows

    def lookup(self, q_mem, real):
        """The units this piece attends to: topk by representative score over its real queries (every
        unit while there are no more than topk), loaded into device slots. Returns (units, valid, slots),
        topk each: with fewer than topk units stored (or no real query), the entries past them are not valid."""
        # Tensor parallel: this process holds the units of its own key-value heads, and scores them with
        # its query heads' share of the representative keys and of the queries. A unit's score (for each
        # query, with lookup_queries=each) is a sum over all query heads, so the processes add their
        # partial sums, before any max over queries and before the top-k: every process then selects the
        # same units, as one process would. (repr_scoring=best takes its max per head: still a sum over heads.)
        if self.fused_scores and self.last is None:  # the same, in two kernels (kernels.unit_scores)
            scores = kernels.unit_scores(q_mem, real, self.reprs, self.n)
            if self.parallel:
                scores = sum_scores_over_processes(scores)
        else:
            scores = kernels.score_units(q_mem, self.reprs, real, best_token=self.cfg.repr_scoring == "best",
                                         each_query=self.cfg.lookup_queries == "each",
                                         over_heads=sum_scores_over_processes if self.parallel else None)
            if self.last is not None:
                self.last.update(queries=q_mem, scores=scores)  # [Hq, T, D], [n]
            stored = torch.arange(self.reprs.shape[0], device=scores.device) < self.n
            scores = scores.masked_fill(~stored, float("-inf"))
        rows = scores.shape[0]
        if self.fused_select and self.cfg.topk < rows <= kernels.SELECT_MOST:  # fused: never float64, so float32 scores
            # What the lines below do, in two kernels (kernels.select_top).
            units, valid = kernels.select_top(scores, self.cfg.topk, self.n, real, self.lookups)
            return units, valid, self.fetch(units, valid)
        units = kernels.select_units(scores, self.cfg.topk)
        valid = (units < self.n) & real.any()  # ascending: the stored units come first
        self.lookups += valid.any()
        return units, valid, self.fetch(units, valid)

    def fetch(self, units, valid=None):
        """Bring the selected units into device slots. Each missing unit evicts the least recently used
        unit that is not selected now (free slots first; among units last used together, the lower one).
        Entries that are not valid take the scratch slot and change nothing."""
        S = self.cfg.max_cached_block
        if valid is None:
            valid = torch.ones_like(units, dtype=torch.bool)
        if self.fused_fetch:  # the same bookkeeping in one kernel: the lines below launch some 50, each tiny
            victim = kernels.lru_fetch(units, valid, self.unit_slot, self.slot_unit, self.slot_used, self.clock,
                                       self.hits, self.misses, self.load_units, self.load_slots, self.AGE)
            self._start_loads()
            return victim
        self.clock += 1
        slots = torch.where(valid, self.unit_slot[units], -1)
        hit = slots >= 0  # a unit that is not stored never has a slot
        miss = valid & ~hit
        self.hits += hit.sum()
        self.misses += miss.sum()
        # Eviction order over slots: free ones first, then by age; slots of selected units never.
        age = self.slot_used[:S] * self.AGE + self.slot_unit[:S]
        protect = torch.where(hit, torch.iinfo(torch.long).max, torch.iinfo(torch.long).min)
        age.scatter_reduce_(0, slots.clamp(min=0), protect, reduce="amax")
        order = age.argsort()
        victim = torch.where(hit, slots, torch.where(miss, order[(miss.cumsum(0) - 1).clamp(min=0)], S))
        old = self.slot_unit[victim]
        scratch = self.unit_slot.shape[0] - 1
        self.unit_slot.index_fill_(0, torch.where(miss & (old >= 0), old, scratch), -1)
        self._load(units, torch.where(miss, victim, -1))
        self.slot_unit[victim] = torch.where(valid, units, -1)
        self.unit_slot[torch.where(valid, units, scratch)] = torch.where(valid, victim, -1)
        self.slot_used[victim] = torch.where(valid, self.clock, -1)
        return victim

    def snapshot(self, storage=True):
        """The units' counters and (storage=True) the stored units themselves: views, not copies, to be
        written out at once. A unit never changes once stored and later ones go after it, so a rewind
        in this process needs the counters only."""
        s = {name: getattr(self, name).clone() for name in ("n", "lookups", "hits", "misses")}
        if storage:
            n = self.count
            if self.loader is not None:  # write-backs of the last units still on their way
                torch.cuda.synchronize(self.device)
            s |= {saved: getattr(self, name)[:n] for saved, name in self.saved_names().items()}
        return s

    def saved_names(self):
        """A snapshot's name for each stored tensor. The storage keeps the names host_k and host_v in
        snapshot files (it was always host memory when they were named), so files saved before still load."""
        names = {"host_k": "storage_k", "host_v": "storage_v", "reprs": "reprs"}
        return names | ({"scales": "scales"} if self.fp8 else {})

    def restore(self, s):
        """Back to a snapshot. The device pool starts empty: the slots may hold units made after the
        snapshot, and which units sit there changes speed, never outputs."""
        if self.loader is not None:
            torch.cuda.synchronize(self.device)
        n = int(s["n"])
        if "host_k" in s:
            names = self.saved_names()
            for saved, name in names.items():
                if saved not in s or s[saved].shape[1:] != getattr(self, name).shape[1:] or len(s[saved]) != n:
                    raise ValueError(f"saved units {saved!r} do not fit this model and these settings")
            self.reserve(n)
            self.pin(n)  # before the rows are written: pin clears the rows it locks
            for saved, name in names.items():
                getattr(self, name)[:n] = s[saved]
        elif n > self.capacity:
            raise ValueError("a rewind cannot bring back units this storage never held")
        for name in ("n", "lookups", "hits", "misses"):
            getattr(self, name).copy_(s[name])
        for t, v in ((self.clock, 0), (self.unit_slot, -1), (self.slot_unit, -1), (self.slot_used, -1)):
            t.fill_(v)

    def read(self, units, slots):
        """K and V of the selected units from their device slots, [topk, Hkv, B, D] in the model's dtype."""
        k, v = self.pool_k[slots], self.pool_v[slots]
        if self.fp8:
            scale = self.scales[units]
            k, v = kernels.from_fp8(k, scale[:, 0], self.dtype), kernels.from_fp8(v, scale[:, 1], self.dtype)
        return k, v

    def _load(self, units, dst):
        """pool[dst[i]] = storage[units[i]] where dst[i] >= 0 (the misses)."""
        if self.device.type != "cuda":  # CPU: storage and pool are both plain buffers (not `loader is None`:
            # a CUDA stream object traced through the compiled step crashes dynamo, see below)
            d = torch.where(dst >= 0, dst, self.pool_k.shape[0] - 1)  # hits write the scratch slot
            self.pool_k[d] = self.storage_k[units]
            self.pool_v[d] = self.storage_v[units]
        else:  # GPU: a kernel reads the storage rows directly, pinned host memory over PCIe or GPU memory
            # (no host sync, no staging copy)
            self.load_units.copy_(units)
            self.load_slots.copy_(dst)
            self._start_loads()

    # The side stream is used only in the three methods below, which torch.compile leaves as they are: a
    # CUDA stream object traced through the compiled chunk step crashed PyTorch 2.11's dynamo.

    @kernels.outside_compile
    def _start_loads(self):
        kernels.gather_from_host((self.storage_k, self.storage_v), self.load_units, (self.pool_k, self.pool_v), self.load_slots,
                                 self.loader)

    @kernels.outside_compile
    def _start_write_back(self):
        kernels.scatter_to_host((self.stage_k, self.stage_v), (self.storage_k, self.storage_v), self.stage_rows,
                                self.loader)

    @kernels.outside_compile
    def join_copies(self):
        """Work queued after this waits for the unit copies queued so far on the side stream: before the
        pool is read (the selected units are in their slots), and at the end of a layer's forward."""
        if self.loader is not None:
            kernels.join(self.loader)

    def cached_units(self):
        """Units in the pool, least recently used first (for tests and inspection)."""
        S = self.cfg.max_cached_block
        order = (self.slot_used[:S] * self.AGE + self.slot_unit[:S]).argsort()
        order = order[self.slot_unit[order] >= 0]
        return self.slot_unit[order].tolist()


def grown_units(capacity: int, need: int) -> int:
    """The capacity MemoryUnits.reserve grows to for need units (and memory_plan counts)."""
    return max(need, capacity + capacity // 8)


def repr_keys(cfg: InfLLMConfig) -> int:
    """Representative keys a unit keeps per query head: their mean, or each of them (repr_scoring=best)."""
    return cfg.repr_topk if cfg.repr_scoring == "best" else 1


def new_units_most(cfg: InfLLMConfig, P: int) -> int:
    """The most units a piece of P queries can make: before it at most n_local + block_size - 1 recent
    tokens wait (fewer than a block beyond the window), so at most P + block_size - 1 leave the window."""
    return (P + cfg.block_size - 1) // cfg.block_size


class ContextMemory:
    """InfLLM's context memory for one layer (batch size 1).

    Tokens not yet in init or a unit ("recent": the local window plus the far remainder, fewer than
    block_size tokens waiting to fill a unit) sit in a ring buffer at slot position % ring size, keys
    unrotated. The prompt arrives in pieces of exc_block_size queries (one when decoding), the last
    one padded; how many of a piece's queries are real is a device count, and so is everything a piece
    decides (tokens moved to init, new units: a fixed most of each, the rest masked). So the work of
    a piece has one shape whatever the prompt: two compiled programs (a piece, a decoding step) and two
    CUDA graphs serve every prompt. The host keeps one counter, the tokens fed, to size the storage."""

    use_units = True

    def __init__(self, rope, cfg: InfLLMConfig, n_heads, n_kv_heads, head_dim, device=None, dtype=None,
                 kernel="blocked", parallel=False):
        self.rope, self.cfg = rope, cfg.check()
        # "plain" is the specification; each kernel comes as the local part and the memory part.
        self.attend_local, self.attend_memory = kernels.CHUNK_ATTENTION[kernel]
        # "compiled": the whole piece step goes through torch.compile, which fuses its few hundred small
        # kernels (ring writes, rotations, masks, lookup, LRU, retirement, attention) into a few dozen.
        # "flex" is compiled on a GPU only: inductor's CPU FlexAttention has no log-sum-exp output yet, so
        # there it runs unfused (same results, for the tests).
        # The compiled step is one function for every layer, called with the layer: a compiled bound method
        # kept on self would tie self to itself, and its pinned storage would wait for the cycle collector.
        compiled = kernel == "compiled" or (kernel == "flex" and torch.device(device or "cpu").type == "cuda")
        self.step = _compiled_step() if compiled else type(self)._attend_piece
        self.pad = compiled  # a compiled step pads the last piece (one shape); eager, padding is wasted work
        self.n_heads = n_heads
        # A piece arrives while up to n_local + block_size - 1 recent tokens wait: room for both.
        self.ring = cfg.n_local + cfg.block_size + cfg.exc_block_size
        self.ring_k = torch.zeros(n_kv_heads, self.ring, head_dim, device=device, dtype=dtype)
        self.ring_v = torch.zeros_like(self.ring_k)
        # The same keys rotated once, at their absolute positions, for the local part: its queries are
        # rotated at theirs, and attention sees only the distance between the two, the same as at the
        # window positions of the reference. So the window is neither gathered nor re-rotated per piece.
        self.ring_kr = torch.zeros_like(self.ring_k)
        self.ring_score = torch.zeros(n_heads, self.ring, device=device)  # local score per query head, fp32
        # The position each slot holds (-1: none, or padding), kept rather than derived from pos by a
        # remainder, which the compiled mask would recompute for every (query, slot) pair.
        self.ring_pos = torch.full((self.ring,), -1, dtype=torch.long, device=device)
        # Init tokens, and one scratch column for the masked moves of a piece.
        self.init_k = torch.zeros(n_kv_heads, cfg.n_init + 1, head_dim, device=device, dtype=dtype)
        self.init_v = torch.zeros_like(self.init_k)
        # pos: tokens seen; start: position of the oldest recent token; n_init: init tokens held.
        self.pos_d, self.start_d, self.n_init_d = (torch.zeros((), dtype=torch.long, device=device) for _ in range(3))
        self.pos = 0  # tokens seen, on the host: it sizes the unit storage
        # The memory part's queries always sit at n_local - 1: their rotation is computed once, here.
        self.memory_angles = rope.angles(torch.tensor([cfg.n_local - 1], device=device), self.ring_k.dtype)
        if cfg.memory_positions == "ordered":  # the memory part's queries one stretch further, each key at its slot's
            query = torch.tensor([cfg.n_local - 1 + self.ordered_span() - 1], device=device)
            self.ordered_angles = (rope.angles(query, self.ring_k.dtype), rope.angles(self.slot_positions(), self.ring_k.dtype))
        # An eager GPU writes the ring, builds the masks and the memory part, looks units up and retires tokens
        # in Triton kernels of kernels.py (a few instead of some 150 tiny PyTorch ones); the PyTorch lines beside
        # each call say what it does, and stay the specification ("plain" runs them on a GPU too). Compiled,
        # inductor fuses those lines itself; float64 (the tests' oracle) stays in PyTorch, as in model.py. Units
        # must be in the model's dtype, and retire averages the representative keys (the reference's).
        self.fused = (torch.device(device or "cpu").type == "cuda" and not compiled and kernel != "plain"
                      and self.ring_k.dtype != torch.float64 and kernels.triton is not None)
        self.units = (MemoryUnits(cfg, n_heads, n_kv_heads, head_dim, device, dtype, parallel, compiled=compiled,
                                  fused=self.fused) if self.use_units else None)
        self.fused_retire = self.fused and self.use_units and not self.units.fp8 and cfg.repr_scoring == "mean"
        self.fused_memory = self.fused and self.use_units and not self.units.fp8  # kernels.memory_part
        self.trace = None  # set to a list to record every piece's selected units (tests, inspection)

    def reserve(self, n_tokens):
        """Prepare the unit storage for a sequence of n_tokens."""
        if self.use_units:
            self.units.reserve(n_tokens // self.cfg.block_size + 1)

    def pin(self, n_tokens):
        """Make the unit storage that a sequence of n_tokens can touch ready for the GPU: called before a
        forward up to n_tokens is queued (the units of n tokens are fewer than n // block_size + 1)."""
        if self.use_units:
            self.units.pin(n_tokens // self.cfg.block_size + 1)

    def reset(self):
        """Start a new sequence in the same buffers."""
        self.pos = 0
        for t in (self.pos_d, self.start_d, self.n_init_d):
            t.zero_()
        self.ring_pos.fill_(-1)
        if self.use_units:
            self.units.reset()

    STATE = ("ring_k", "ring_kr", "ring_v", "ring_score", "ring_pos", "init_k", "init_v", "pos_d", "start_d", "n_init_d")

    def snapshot(self, storage=True):
        """Everything that decides what this cache does next, as tensors: the window (ring), init tokens,
        counters, and the memory units. storage=False leaves out the units' K/V and representative keys,
        which a rewind in the same process keeps (see MemoryUnits.snapshot)."""
        s = {name: getattr(self, name).clone() for name in self.STATE}
        if self.use_units:
            s |= {"units." + k: v for k, v in self.units.snapshot(storage).items()}
        return s

    def restore(self, s):
        """Back to a snapshot, in the same buffers (captured CUDA graphs stay valid)."""
        for name in self.STATE:
            t = getattr(self, name)
            if name not in s or s[name].shape != t.shape:
                raise ValueError(f"saved {name!r} does not fit this model and these settings")
            t.copy_(s[name])
        self.pos = int(self.pos_d)
        if self.use_units:
            self.units.restore({k.removeprefix("units."): v for k, v in s.items() if k.startswith("units.")})

    def attend(self, q, k, v, n_valid=None):
        """q, k, v [1, H, T, D] (q, k unrotated) -> the attention output [1, Hq, T, D]. With n_valid (a
        device count) only the first n_valid tokens are real and the rest padding, and the caller keeps
        the host's count (CUDA graph replay); without it all T are real."""
        if q.shape[0] != 1:
            raise ValueError(f"InfLLM context memory holds one sequence; got batch size {q.shape[0]}")
        T = q.shape[2]
        if n_valid is None:
            self.reserve(self.pos + T)
            self.pin(self.pos + T)
            self.pos += T
            n_valid = torch.full((), T, dtype=torch.long, device=q.device)
        P = 1 if T == 1 else self.cfg.exc_block_size  # a decoding step, or pieces of the prompt
        outs = []
        for s in range(0, T, P):
            piece = [x[0, :, s:s + P] for x in (q, k, v)]
            if self.pad and piece[0].shape[1] < P:  # the last piece, padded: every piece has one shape
                piece = [F.pad(x, (0, 0, 0, P - x.shape[1])) for x in piece]
            n = n_valid if T <= P else (n_valid - s).clamp(0, P)  # one piece: 0 <= n_valid <= T <= P already
            out, chosen = self.step(self, *piece, n)
            if self.trace is not None and self.use_units and (chosen >= 0).any():
                self.trace.append(chosen[chosen >= 0].tolist())
            outs.append(out)
        if self.use_units:
            self.units.join_copies()  # the last write-back: a CUDA graph must end with its streams joined
        return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1))[None, :, :T]

    def _attend_piece(self, q, k, v, n):
        """One piece of P queries [Hq, P, D], the first n (a device count) real: attend, then update the
        memory. Device work only, of one shape for every piece: it reads no host counter. Returns the
        output and the selected units (-1 where none, and all -1 without units). A piece with no real
        token (n = 0) changes nothing a later piece reads: it writes only ring slots it marks empty,
        selects and loads no unit, and retires nothing (only the LRU clock ticks)."""
        P, N, R, dev = q.shape[1], self.cfg.n_local, self.ring, q.device
        if self.fused:  # the four lines below in one kernel (kernels.piece_angles)
            at, real, at_angles = kernels.piece_angles(self.pos_d, n, P, self.rope.inv_freq, k.dtype)
        else:
            t = torch.arange(P, device=dev)
            real = t < n
            at = self.pos_d + t  # the piece's positions
            at_angles = self.rope.angles(at, k.dtype)  # the piece's keys and its queries in the window
        if self.fused:  # the same writes in one kernel (kernels.ring_write)
            kernels.ring_write(k, v, *at_angles, at, real, self.ring_k, self.ring_kr, self.ring_v, self.ring_score,
                               self.ring_pos)
        else:
            new = at % R  # padding lands in slots of tokens that already left the ring, marked empty
            self.ring_k.index_copy_(1, new, k)
            self.ring_kr.index_copy_(1, new, self.rope(k, angles=at_angles))
            self.ring_v.index_copy_(1, new, v)
            self.ring_score.index_fill_(1, new, 0.0)
            self.ring_pos.index_copy_(0, new, torch.where(real, at, -1))

        # Memory part: all its keys at position 0 and the queries at n_local - 1. The lookup comes
        # first, so that the selected units load from host memory while the local part is computed.
        # It scores units with these queries whatever memory_positions is: the lookup stays the reference's.
        q_mem = self.rope(q, angles=self.memory_angles)
        selected = self._select(q_mem, real)

        # Local part: each query sees the n_local tokens up to itself. The ring is read in place, in
        # slot order (attention does not depend on the order of its keys), its slots' positions p
        # telling which keys a query sees. Padding queries see nothing and add to no local score.
        p = self.ring_pos
        if self.fused:
            mask_local = kernels.window_mask(p, at, real, N)  # the same in one kernel
        else:
            mask_local = (p[None, :] <= at[:, None]) & (p[None, :] > at[:, None] - N) & (p >= 0)[None, :] & real[:, None]
        local = self.attend_local(self.rope(q, angles=at_angles), self.ring_kr, self.ring_v, mask_local)

        k_mem, v_mem, mask_mem, chosen = self._memory(at, real, selected)
        if self.cfg.memory_positions == "ordered":  # a shorter piece has fewer far slots: a prefix of the angles
            query, slots = self.ordered_angles
            k_mem = self.rope(k_mem, angles=tuple(a[:k_mem.shape[1]] for a in slots))
            q_mem = self.rope(q, angles=query)
        out, col_sums = self.attend_memory(local, q_mem, k_mem, v_mem, mask_mem)
        self.ring_score += col_sums
        self.pos_d += n
        self._retire(P)
        return out, chosen

    def _select(self, q_mem, real):
        """The lookup: (units, valid, slots) of the topk units for this piece, their loads started."""
        return self.units.lookup(q_mem, real)

    def _memory(self, at, real, selected):
        """Keys, values and mask of the memory part: selected units, init tokens, and the far remainder.
        A remainder token is seen by a query more than n_local - 1 tokens after it, so every token is
        seen in exactly one part. (The authors' code lets each chunk see its whole far remainder,
        some of it also through the window; the difference is a few tokens per query.)"""
        cfg, dev = self.cfg, self.ring_k.device
        if self.fused_memory:  # the same in one kernel: the lines below launch some 35, each tiny
            units, valid, slots = selected
            self.units.join_copies()
            return kernels.memory_part(self.units.pool_k, self.units.pool_v, units, slots, valid, self.init_k, self.init_v,
                                       self.n_init_d, self.ring_k, self.ring_v, self.start_d, at, real, cfg.n_local)
        k_init, v_init, mask_init = self._init_part(real)
        # The oldest recent tokens: at most P + block_size - 1 of them are out of some query's window.
        far = self.start_d + torch.arange(at.shape[0] + cfg.block_size - 1, device=dev)
        mask_far = (at[:, None] - far[None, :] >= cfg.n_local) & real[:, None]
        units, valid, slots = selected
        self.units.join_copies()
        Hkv, B, D = self.units.block
        k_units, v_units = (x.transpose(0, 1).reshape(Hkv, -1, D) for x in self.units.read(units, slots))
        mask_units = valid.repeat_interleave(B)[None, :] & real[:, None]
        return (torch.cat([k_units, k_init, self.ring_k[:, far % self.ring]], dim=1),
                torch.cat([v_units, v_init, self.ring_v[:, far % self.ring]], dim=1),
                torch.cat([mask_units, mask_init, mask_far], dim=1), torch.where(valid, units, -1))

    def ordered_span(self):
        """memory_positions=ordered: the slots of a whole piece's memory part (init, topk units, far
        remainder), one position each; a shorter piece's keys take the first of them, never other positions."""
        c = self.cfg
        return c.n_init + 1 + c.topk * c.block_size + c.exc_block_size + c.block_size - 1

    def slot_positions(self):
        """memory_positions=ordered: the position of each slot of _memory's keys [units, init, far] in
        document order: init tokens first, then the selected units (ascending) token by token, then the
        far remainder. A slot keeps its position when masked."""
        n_init, n_units = self.cfg.n_init + 1, self.cfg.topk * self.cfg.block_size
        at = torch.arange(self.ordered_span(), device=self.ring_k.device)
        return torch.cat([at[n_init:n_init + n_units], at[:n_init], at[n_init + n_units:]])

    def _init_part(self, real):
        held = torch.arange(self.cfg.n_init + 1, device=self.init_k.device) < self.n_init_d
        return self.init_k, self.init_v, held[None, :] & real[:, None]

    def _retire(self, P):
        """Tokens that left the window fill init first; after that every full block_size run of them
        becomes a memory unit, its representative key chosen by the tokens' local scores. How many of
        each is known on the device only: a piece moves a fixed most of each, masked."""
        cfg, dev, R = self.cfg, self.ring_k.device, self.ring
        if self.fused_retire:  # the same in two kernels: the lines below launch some 50, each tiny
            u = self.units
            kernels.retire(self.ring_k, self.ring_v, self.ring_score, self.init_k, self.init_v, self.pos_d, self.start_d,
                           self.n_init_d, u.n, u.reprs, u.stage_k, u.stage_v, u.stage_rows, cfg.n_local, cfg.repr_topk,
                           min(cfg.n_init, P), new_units_most(cfg, P))
            u._start_write_back()
            return
        extra = self.pos_d - self.start_d - cfg.n_local  # tokens beyond the window
        take = torch.minimum(cfg.n_init - self.n_init_d, extra).clamp(min=0)
        most = min(cfg.n_init, P)  # while init fills, at most P tokens leave the window per piece
        if most:
            i = torch.arange(most, device=dev)
            src = (self.start_d + i) % R
            dst = torch.where(i < take, self.n_init_d + i, cfg.n_init)  # column n_init: scratch
            self.init_k.index_copy_(1, dst, self.ring_k[:, src])
            self.init_v.index_copy_(1, dst, self.ring_v[:, src])
            self.n_init_d += take
            self.start_d += take
        B = cfg.block_size
        n_new = ((extra - take) // B).clamp(min=0)
        if self.use_units:
            most = new_units_most(cfg, P)
            src = (self.start_d + torch.arange(most * B, device=dev)) % R
            Hkv, _, D = self.ring_k.shape
            k = self.ring_k[:, src].reshape(Hkv, most, B, D).transpose(0, 1)
            v = self.ring_v[:, src].reshape(Hkv, most, B, D).transpose(0, 1)
            score = self.ring_score[:, src].reshape(self.n_heads, most, B).transpose(0, 1)
            reprs = kernels.representative_keys(k, score, cfg.repr_topk, keep_each=cfg.repr_scoring == "best")
            self.units.add(k, v, reprs, n_new)
        self.start_d += n_new * B


class StreamCache(ContextMemory):
    """StreamingLLM / LM-Infinite: init tokens and the local window, positions as in InfLLM; tokens that
    leave the window after init is full are forgotten."""

    use_units = False

    def _select(self, q_mem, real):
        return None

    def _memory(self, at, real, selected):
        return self._init_part(real) + (torch.full((1,), -1, device=at.device),)

    def ordered_span(self):
        return self.cfg.n_init + 1

    def slot_positions(self):
        return torch.arange(self.cfg.n_init + 1, device=self.ring_k.device)


@kernels.outside_compile  # a collective, called as it is from the compiled piece step
def sum_scores_over_processes(scores):
    torch.distributed.all_reduce(scores)
    return scores


@functools.cache
def _compiled_step():
    return kernels.compiled(ContextMemory._attend_piece)


def make_caches(model, attention: str = "full", cfg: InfLLMConfig | None = None, kernel: str = "blocked"):
    """One cache per layer, on the model's device and dtype. kernel picks the chunk attention of
    kernels.py: "plain" (the specification) or a faster path with the same results."""
    a = model.args
    p = model.embed_tokens.weight
    if attention == "full":
        return [FullCache(model.rope, a.n_kv_heads, a.head_dim, p.device, p.dtype) for _ in range(a.n_layers)]
    kind = {"infllm": ContextMemory, "stream": StreamCache}.get(attention)
    if kind is None:
        raise ValueError(f"unknown attention {attention!r} (choose full, stream or infllm)")
    cfg = cfg or InfLLMConfig()
    # Split over processes (tensor parallel), a.n_heads and a.n_kv_heads are this process's share.
    return [kind(model.rope, cfg, a.n_heads, a.n_kv_heads, a.head_dim, p.device, p.dtype, kernel, a.tp_size > 1)
            for _ in range(a.n_layers)]


def memory_plan(args, attention: str, cfg: InfLLMConfig, n_tokens: int, dtype, device) -> dict:
    """The bytes the caches of all layers take for a sequence of n_tokens, from the shapes alone, before
    anything is allocated: {"host": ..., "device": ..., "parts": {name: bytes}}. On a GPU the memory units
    live in host memory (unless unit_storage=device) and the rest on the device; on a CPU everything is
    host memory."""
    L, Hq, Hkv, D = args.n_layers, args.n_heads, args.n_kv_heads, args.head_dim
    e = torch.empty(0, dtype=dtype).element_size()
    on_gpu = torch.device(device).type == "cuda"
    parts, host = {}, set()
    if attention == "full":
        parts["keys and values"] = L * 2 * Hkv * D * e * n_tokens
    else:
        ring = cfg.n_local + cfg.block_size + cfg.exc_block_size
        parts["window"] = L * (ring * (3 * Hkv * D * e + 4 * Hq + 8) + 2 * Hkv * (cfg.n_init + 1) * D * e)
    if attention == "infllm":
        unit = Hkv * cfg.block_size * D * (1 if cfg.unit_dtype == "fp8" else e)
        rows = grown_units(cfg.topk, n_tokens // cfg.block_size + 1) + 1  # MemoryUnits.reserve, scratch row
        parts["memory units"] = L * 2 * rows * unit
        parts["representative keys"] = L * rows * (Hq * repr_keys(cfg) * D * e + 8 + (8 * Hkv if cfg.unit_dtype == "fp8" else 0))
        staging = new_units_most(cfg, cfg.exc_block_size) if on_gpu else 0  # write-back buffers
        parts["unit pool"] = L * 2 * (cfg.max_cached_block + 1 + staging) * unit
        if cfg.unit_storage != "device":  # auto is planned as it starts; place_units plans both
            host.add("memory units")
    where = {k: "host" if k in host or not on_gpu else "device" for k in parts}
    return {"host": sum(v for k, v in parts.items() if where[k] == "host"),
            "device": sum(v for k, v in parts.items() if where[k] == "device"), "parts": parts, "where": where}


GPU_HEADROOM = 4 << 30  # bytes unit_storage=auto leaves free on the GPU (at least; and a tenth of the GPU)


def place_units(caches, args, cfg: InfLLMConfig, n_tokens: int, free: int, held_tokens: int = 0) -> bool:
    """unit_storage=auto on a GPU, before the caches grow from room for held_tokens to n_tokens: the units
    go to (or stay in) GPU memory if the caches of n_tokens, units included, leave a tenth of the GPU and
    GPU_HEADROOM at least for the activations and CUDA graphs; else to (or back to) pinned host memory,
    the reference (a million tokens of a 7B model). free: bytes of GPU memory free now, beside what the
    caches of held_tokens hold already. Returns whether the units are on the GPU."""
    units = [c.units for c in caches if isinstance(c, ContextMemory) and c.use_units]
    on_gpu = bool(units) and units[0].device.type == "cuda"
    if not on_gpu or cfg.unit_storage != "auto":
        return on_gpu and cfg.unit_storage == "device"
    device, dtype = units[0].device, units[0].dtype

    def plan(storage, n):
        return memory_plan(args, "infllm", dataclasses.replace(cfg, unit_storage=storage), n, dtype, device)["device"]
    need = plan("device", n_tokens) - plan("device" if units[0].storage_k.is_cuda else "host", held_tokens)
    spare = max(GPU_HEADROOM, torch.cuda.get_device_properties(device).total_memory // 10)
    on_device = need + spare <= free
    for u in units:
        u.place(on_device)
    return on_device


def memory_stats(caches) -> dict:
    """Lookups, unit-cache hits and misses summed over layers."""
    units = [c.units for c in caches if isinstance(c, ContextMemory) and c.use_units]
    hits, misses = sum(int(u.hits) for u in units), sum(int(u.misses) for u in units)
    return {"units": sum(u.count for u in units), "lookups": sum(int(u.lookups) for u in units),
            "hits": hits, "misses": misses, "hit_rate": hits / (hits + misses) if hits + misses else None}


# ----------------------------------------------------------------------------- snapshots of the memory

SNAPSHOT_FORMAT = "infllm-memory/1"
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                       torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


class SnapshotError(ValueError):
    """A memory snapshot that cannot be used here; the message is one sentence."""


def save_memory(path, caches, header: dict):
    """Write every layer's cache (ContextMemory.snapshot) to path as safetensors, with header (strings)
    as its metadata. The file is written tensor by tensor, never whole in memory (a million tokens of a
    7B model make 64 GiB of units), to a temporary name that replaces path once complete."""
    path = Path(path)
    tensors = {f"layer.{i}.{name}": t for i, c in enumerate(caches) for name, t in c.snapshot().items()}
    meta = {"format": SNAPSHOT_FORMAT, **{k: str(v) for k, v in header.items()}}
    index, offset = {"__metadata__": meta}, 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        index[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(index).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for t in tensors.values():  # the bytes of each tensor, through a view: no copy on the host
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    os.replace(tmp, path)
    return offset + 8 + len(head)


def read_snapshot_header(path) -> dict:
    """The metadata of a snapshot file; SnapshotError if it is none of ours (or truncated)."""
    from safetensors import SafetensorError, safe_open
    path = Path(path)
    if not path.is_file():
        raise SnapshotError(f"memory snapshot {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise SnapshotError(f"{path} is not a readable memory snapshot ({str(e).rstrip('.')})") from None
    if meta.get("format") != SNAPSHOT_FORMAT:
        raise SnapshotError(f"{path} is not a memory snapshot of this program (no '{SNAPSHOT_FORMAT}' header)")
    return meta


def load_memory(path, caches, expect: dict) -> dict:
    """Restore every layer's cache from a snapshot written by save_memory, after checking that each
    entry of expect matches the file's header: a snapshot of another checkpoint, dtype, attention or
    settings would be read as nonsense. Returns the header. The file is only read."""
    from safetensors import safe_open
    meta = read_snapshot_header(path)
    for key, want in expect.items():
        if meta.get(key) != str(want):
            raise SnapshotError(f"memory snapshot {path} was made with {key} {meta.get(key)!r}, "
                                f"this run has {str(want)!r}")
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        for i, c in enumerate(caches):
            prefix = f"layer.{i}."
            state = {n.removeprefix(prefix): f.get_tensor(n) for n in names if n.startswith(prefix)}
            try:
                c.restore(state)
            except (ValueError, KeyError, RuntimeError) as e:
                raise SnapshotError(f"memory snapshot {path} does not fit layer {i} ({e})") from None
    return meta
