"""Read a long prompt with InfLLM's context memory (or a baseline) and answer it.

    python generate.py --ckpt DIR --prompt-file long.txt [--chat] [--attention infllm|stream|full]
    python generate.py --ckpt DIR --prompt-file doc.txt --save-memory doc.mem --max-new-tokens 0
    python generate.py --ckpt DIR --load-memory doc.mem --prompt-file question.txt
    python generate.py --ckpt DIR --prompt-file doc.txt --interactive    (questions from stdin)

Text streams to stdout; figures (prompt tokens, prefill and decode speed, peak memory) go to stderr,
or everything as one JSON object with --json. In Python, Reader does the same (see its docstring).
"""
import time

STARTED = time.time()  # the process's start, near enough: before torch is imported

import argparse
import dataclasses
import functools
import gc
import json
import os
import resource
import sys
from pathlib import Path

import torch

from infllm import (ContextMemory, InfLLMConfig, SnapshotError, load_memory, make_caches, memory_plan, memory_stats,
                    place_units, read_snapshot_header, save_memory)
from model import DTYPES, CheckpointError, checkpoint_fingerprint, load_model
from tokenizer import TokenizerError, chat_prompt, load_tokenizer


class UsageError(ValueError):
    """Bad input from the command line; the message is one sentence."""


def load(ckpt, device="cpu", dtype=torch.float32, rank=0, world=1):
    """Model (process rank's share of it, split over world processes) and tokenizer from a Hugging Face
    style checkpoint folder."""
    return load_model(ckpt, device=device, dtype=dtype, rank=rank, world=world), load_tokenizer(ckpt)


def join_processes(device_name=None) -> tuple[int, int, torch.device | None]:
    """Under torchrun (WORLD_SIZE > 1), join the other processes for tensor parallel: NCCL between GPUs
    (one per process), gloo on CPUs. Returns (rank, world size, this process's device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, None
    import torch.distributed as dist
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if device.type == "cuda":
        gpus = torch.cuda.device_count()
        if int(os.environ.get("LOCAL_WORLD_SIZE", world)) > gpus:
            raise UsageError(f"{world} processes need a GPU each, and this machine has {gpus}: "
                             f"use --nproc-per-node {gpus} or fewer")
        if not dist.is_nccl_available():
            raise UsageError("tensor parallel on GPUs needs NCCL, and this PyTorch build has none")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def leave_processes():
    """The end of a tensor-parallel run. The CUDA graphs that captured an all-reduce must be freed before
    the process group: NCCL waits for them when it destroys its communicator, and the process would hang
    (pytorch/pytorch#115388). The caller drops its references; collect() frees what only cycles hold."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gc.collect()
        torch.distributed.destroy_process_group()


class FixedShapes:
    """model(tokens, caches) as forwards of two lengths only: a piece of exc_block_size tokens (the last
    one of a prompt padded) and one token (the prompt's last token, decoding). With InfLLM's caches
    nothing else a forward does depends on the prompt, so with graphs (on a GPU) each kind runs as usual
    the first time it comes (torch.compile's warm-up, if any) and is captured in a CUDA graph right after;
    from then on it is replayed: one launch for the whole model (a wavefront's: one a layer), no Python
    inside a layer, the lookup and the cache update included. A few captures serve every prompt of any
    length; only a prompt longer than the unit storage was reserved for moves the storage and re-captures.

    A prefill chunk thus runs piece by piece through all layers, where the reference runs each layer over
    the whole chunk before the next: the same arithmetic in another order (a layer's piece depends only
    on the layer below for the same and earlier pieces, and on its own cache of earlier pieces), so the
    outputs are the same; only the linear layers see 512 rows at a time instead of 8192.

    That dependency allows more: a long prompt runs as a wavefront. Step s runs layer l on piece s - l, for
    every layer holding a piece, each on a CUDA stream of its own and from a graph of its own, so a small
    model's few hundred small kernels per layer and piece run side by side instead of one after another.
    There is no barrier between steps: a layer starts its next piece once the layer below has handed it
    over and the layer above has taken the last one (two input buffers, by the step's parity), so a layer
    that finishes early does not wait for the slowest. The first and last n_layers - 1 steps run only the
    layers that hold a piece."""

    def __init__(self, model, caches, graphs=True, wavefront=None):
        if not all(isinstance(c, ContextMemory) for c in caches):
            raise UsageError("CUDA graphs need the InfLLM or stream caches (full attention grows its cache)")
        self.model, self.caches, self.use_graphs = model, caches, graphs
        self.piece = caches[0].cfg.exc_block_size
        # From how many pieces a call runs as a wavefront. Not under tensor parallel: every process must run
        # its all-reduces in one order, and the streams' is free.
        self.wavefront = wavefront if wavefront is not None else (len(caches) if model.args.tp_size == 1 else 0)
        self.graphs, self.version, self.captures = {}, None, 0
        # Seconds in forwards of a kind run for the first time, with their captures (torch.compile's tracing
        # and compiling, lazy set-up, the piece's own work): what a later prompt replays instead.
        self.warm, self.warmup_s = set(), 0.0
        self.pool = torch.cuda.graph_pool_handle() if graphs else None
        self.inputs = {}  # each kind's static input: the tokens and how many are real
        self.wave = None  # the wavefront's buffers, streams and events (_wave_buffers)

    def __call__(self, tokens, last_only=False, progress=None, n_real=None):
        """tokens [1, T] through the model; returns the logits [1, T or 1, vocab]. n_real (one token only): a
        device count, 1 if the token is real, 0 if it is padding after all (decode_ahead's stop token); the host
        counts it as fed either way (take_back)."""
        T, P = tokens.shape[1], self.piece
        for c in self.caches:  # the storage for the whole call at once: it must not move mid-wave
            c.reserve(c.pos + T)
        version = tuple(c.units.version for c in self.caches if c.use_units)
        if version != self.version:  # storage moved: the graphs point at the old buffers
            self.graphs, self.version, self.warm = {}, version, set()
            self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None  # dies with its last graph
        if self.wavefront and T > P and -(-T // P) >= self.wavefront:
            return self._wavefront(tokens, last_only, progress)
        s, outs = 0, []
        while s < T:
            L = 1 if T - s == 1 else P
            n = min(L, T - s)
            for c in self.caches:  # the unit storage this piece may touch, locked before it is queued
                c.pin(c.pos + L)
            tok, real = self._input((L, last_only), L, tokens[:, s:s + n], n_real)
            out = self._run((L, last_only), functools.partial(self.model, tok, self.caches, last_only, real))
            outs.append(out if last_only else out[:, :n].clone())  # a replay overwrites its output
            self._advance(n, progress)
            s += n
        return outs[-1] if last_only else torch.cat(outs, dim=1)

    def _input(self, key, L, tokens, n_real=None):
        """key's static input, holding tokens (padded to L) and their count (n_real, a device count, if given)."""
        if key not in self.inputs:
            self.inputs[key] = (tokens.new_zeros(1, L), torch.zeros((), dtype=torch.long, device=tokens.device))
        tok, real = self.inputs[key]
        tok[:, :tokens.shape[1]].copy_(tokens)  # the padding keeps what it held: no real query sees it
        if n_real is None:
            real.fill_(tokens.shape[1])
        else:
            real.copy_(n_real)
        return tok, real

    def take_back(self, n):
        """The last n tokens fed were padding after all: the host's count drops them (their pieces left nothing)."""
        for c in self.caches:
            c.pos -= n

    def _advance(self, n, progress):
        for c in self.caches:
            c.pos += n
        if progress is not None:
            progress.update(n)

    def _run(self, key, forward, stream=None):
        """forward() as it is the first time key comes (and captured on stream), replayed from its CUDA graph
        after that. Returns its output (a replay's: the same tensor each time)."""
        if key in self.graphs:
            graph, out = self.graphs[key]
            graph.replay()
            return out
        first = key not in self.warm
        dev = self.model.embed_tokens.weight.device
        start = synced_clock(dev) if first else None
        out = forward()
        if self.use_graphs:  # recording runs no kernel: the device state stays that of the run above
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                self.graphs[key] = (graph, forward())
            self.captures += 1
        if first:
            self.warm.add(key)
            self.warmup_s += synced_clock(dev) - start
        return out

    def _wave_buffers(self):
        """x[p, l]: the piece at layer l's input at a step of parity p, held[p, l]: its real tokens (layer 0
        reads the step's tokens instead). Layer l at step s reads x[s % 2, l] and writes x[1 - s % 2, l + 1], so it
        may run while the layer above still reads its own input. On a GPU: a stream for each layer, and an event
        for each layer and parity, recorded when the layer's step is done."""
        m, n_layers, P = self.model, len(self.caches), self.piece
        x = m.embed_tokens.weight.new_zeros(2, n_layers, P, m.args.dim)
        held = torch.zeros(2, n_layers, dtype=torch.long, device=x.device)
        streams = events = None
        if x.device.type == "cuda":
            # Default priority (the unit loaders take high priority: infllm.MemoryUnits). The pool holds 32
            # streams per priority, so beyond 32 layers two layers share one and run one after the other.
            streams = [torch.cuda.Stream(x.device) for _ in range(n_layers)]
            events = [[torch.cuda.Event() for _ in range(n_layers)] for _ in range(2)]
        return x, held, streams, events

    def _wavefront(self, tokens, last_only, progress):
        T, P, n_layers = tokens.shape[1], self.piece, len(self.caches)
        K = -(-T // P)
        if self.wave is None:
            self.wave = self._wave_buffers()
        streams, done = self.wave[2:]
        main = torch.cuda.current_stream() if streams else None
        for st in streams or ():
            st.wait_stream(main)
        logits = None if last_only else torch.empty(1, T, self.model.args.vocab_size, device=tokens.device)
        try:
            for s in range(K + n_layers - 1):  # piece s enters at the bottom; piece s - n_layers + 1 leaves at the top
                p = s % 2
                for c in self.caches:  # the unit storage this step may touch, locked before it is queued
                    c.pin(c.pos + (s + 1) * P)
                for i in range(max(0, s - K + 1), min(s, n_layers - 1) + 1):  # the layers holding a piece: s - i
                    if streams:
                        for j in (i - 1, i + 1):  # below: its output is our input; above: done reading what we write
                            if 0 <= j < n_layers:
                                streams[i].wait_event(done[1 - p][j])
                        torch.cuda.set_stream(streams[i])
                    if i == 0:
                        self._input(("wave", p), P, tokens[:, s * P:(s + 1) * P])
                    step = functools.partial(self._layer_step, i, p, last_only)
                    out = self._run(("wave", i, p, last_only), step, streams[i] if streams else None)
                    if i == n_layers - 1 and not last_only:
                        d = s - n_layers + 1  # the piece that left the top
                        logits[:, d * P:(d + 1) * P].copy_(out[:, :min(P, T - d * P)])
                    if streams:
                        done[p][i].record(streams[i])
                        torch.cuda.set_stream(main)
                if s < K and progress is not None:
                    progress.update(min(P, T - s * P))
        finally:  # also when cut short (Ctrl-C): what runs next on the main stream waits for every layer
            if streams:
                torch.cuda.set_stream(main)
                for st in streams:
                    main.wait_stream(st)
        self._advance(T, None)
        return out if last_only else logits

    def _layer_step(self, i, p, last_only):
        """Layer i's part of a wave step of parity p: the piece at its input through the layer, into the input
        of the layer above for the next step. The bottom layer embeds the step's tokens first; the top one
        returns the logits (of the piece's last real token with last_only)."""
        m, (x, held, _, _) = self.model, self.wave
        if i == 0:
            tok, n = self.inputs[("wave", p)]
            inp = m.embed_tokens(tok)
        else:
            inp, n = x[p, i][None], held[p, i]
        y = m.layers[i](inp, self.caches[i], n)
        if i == len(self.caches) - 1:
            return m.logits(y.index_select(1, (n - 1).clamp(min=0).view(1)) if last_only else y)
        x[1 - p, i + 1].copy_(y[0])
        held[1 - p, i + 1].copy_(n)
        return None


def synced_clock(device) -> float:
    """time.perf_counter() once the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# Not by default: on an H200 (docs/benchmarks.md, 2026-11-28 and 29) a fresh eager process answers SmolLM2
# prompts of 128K and 983K tokens in 7 and 14 s, a compiled one with a warm compile cache in 29 and 50 s (tracing
# and loading its programs), and the eager wavefront reads faster than the compiled one (166K tokens/s against
# 83K). The steady prefill of a larger model, the one place --compile paid, is now faster eager too (mistral-7b:
# 22.2-22.5K tokens/s eager, 19.3K compiled before the wavefront lost its barrier); decoding is faster eager
# (131-146 tokens/s against 68, the compiled figure from before decode_ahead and the units in GPU memory).
COMPILE_ON_GPU = False


def gpu_matmuls(dtype):
    """On a GPU, fp32 matrix products of a bf16 / fp16 model (the attention's logits and weighted sums)
    on TF32 tensor cores: TF32 holds those inputs' mantissas, so the logits stay exact (the blocked kernel's
    replays ran 1.6x faster on an H200). An fp32 model keeps full fp32 products."""
    torch.backends.cuda.matmul.allow_tf32 = dtype in (torch.bfloat16, torch.float16)


def use_compile_cache(folder=None) -> Path:
    """Keep torch.compile's artifacts (inductor's graphs and kernels, Triton's binaries) in one folder that
    outlives the process, so a second run on the machine loads them instead of compiling: --compile-cache,
    else $INFLLM_COMPILE_CACHE, else ~/.cache/infllm/compile."""
    folder = Path(folder or os.environ.get("INFLLM_COMPILE_CACHE") or Path.home() / ".cache" / "infllm" / "compile")
    folder = folder.expanduser().resolve()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(folder / "triton")
    return folder


def fast_kernel(device, attention="infllm", compile_=True) -> str:
    """The chunk attention to run. Compiled: FlexAttention's fused kernels for InfLLM on a GPU; else the
    compiled blocked kernel (inductor's CPU FlexAttention cannot return the log-sum-exp yet, and with the
    stream cache's memory part, init tokens alone, inductor 2.11 fails to generate the fused kernel).
    Eager: one Triton flash-attention kernel over both parts on a GPU (1.4x the prefill of PyTorch's
    memory-efficient attention for SmolLM2, 1.7x for mistral-7b: docs/benchmarks.md), the blocked kernel on a CPU."""
    gpu = torch.device(device).type == "cuda"
    if not compile_:
        return "triton" if gpu else "blocked"
    return "flex" if gpu and attention == "infllm" else "compiled"


def forward_fn(model, caches, graphs=False, wavefront=None):
    """The model's forward over caches: plain, or in fixed shapes replayed from CUDA graphs (wavefront:
    see FixedShapes)."""
    if graphs:
        return FixedShapes(model, caches, wavefront=wavefront)
    return lambda tokens, last_only=False: model(tokens, caches, last_only=last_only)


@torch.no_grad()
def prefill(model, caches, ids: list[int], chunk_size: int, progress=None, forward=None, room=0):
    """Feed the prompt chunk_size tokens at a time through all layers, all but its last token; the last
    one goes alone, as a decoding step does, so that it makes a memory lookup with its own query (the
    authors' generation loop does the same). room: tokens still to come (decoding), for which the unit
    storage is reserved now, so that it never moves mid-run. Returns the logits after the last token [vocab]."""
    forward = forward or forward_fn(model, caches)
    dev = model.embed_tokens.weight.device
    tokens = torch.tensor(ids, device=dev)[None]
    for c in caches:
        if hasattr(c, "reserve"):
            c.reserve(c.pos + len(ids) + room)
    if isinstance(forward, FixedShapes):  # pieces, not chunks: all of them in one call (one wavefront)
        if len(ids) > 1:
            forward(tokens[:, :-1], last_only=True, progress=progress)
    else:
        for s in range(0, len(ids) - 1, chunk_size):
            e = min(s + chunk_size, len(ids) - 1)
            forward(tokens[:, s:e], last_only=True)
            if progress is not None:
                progress.update(e - s)
    logits = forward(tokens[:, -1:])[0, -1]
    if progress is not None:
        progress.update(1)
    return logits


def sample(logits, temperature: float = 0.0, top_k: int | None = None, generator=None) -> int:
    """Greedy at temperature 0; else sampling from the top_k (or all) tokens."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def decode(model, caches, logits, max_new_tokens, stop_ids=(), temperature=0.0, top_k=None, seed=None,
           on_token=None, forward=None) -> list[int]:
    """Generate up to max_new_tokens from the logits that follow the prompt, one token at a time (greedy tokens
    through FixedShapes: decode_ahead, the same tokens without the device waiting for the host)."""
    forward = forward or forward_fn(model, caches)
    if temperature <= 0 and isinstance(forward, FixedShapes):
        return decode_ahead(forward, logits, max_new_tokens, stop_ids, on_token)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    dev = model.embed_tokens.weight.device
    out = []
    for _ in range(max_new_tokens):
        tok = sample(logits, temperature, top_k, gen)
        if tok in stop_ids:
            break
        out.append(tok)
        if on_token is not None:
            on_token(out)
        if len(out) == max_new_tokens:
            break
        logits = forward(torch.tensor([[tok]], device=dev))[0, -1]
    return out


@torch.no_grad()
def decode_ahead(forward: FixedShapes, logits, max_new_tokens, stop_ids=(), on_token=None) -> list[int]:
    """decode's greedy tokens, without the device ever waiting for the host. Each token is chosen on the device
    and fed from there: the step that reads it is queued before the host has seen it, and the host reads it
    while that step runs. (Waiting for each token and then queuing its step left the GPU idle for the host's
    part of every token: 0.6 ms of 8.6 for one process's share of mistral-7b; docs/benchmarks.md.) The host
    learns of a stop token after its step was queued, so that step feeds it as padding (no real token, which
    changes nothing a later piece reads) and the host's count takes it back: the caches end as decode's do."""
    dev = logits.device
    stops = torch.tensor(sorted(stop_ids) or [-1], device=dev)
    seen = torch.empty(max_new_tokens, dtype=torch.long, pin_memory=dev.type == "cuda")  # the tokens, as they arrive
    tok = logits.argmax().view(1, 1)
    out = []
    for i in range(max_new_tokens):
        seen[i].copy_(tok[0, 0], non_blocking=True)
        arrived = torch.cuda.Event() if dev.type == "cuda" else None
        if arrived is not None:
            arrived.record()
        fed = i + 1 < max_new_tokens  # the last token is only returned
        if fed:
            logits = forward(tok, n_real=(tok != stops).all())
            tok = logits[0, -1].argmax().view(1, 1)
        if arrived is not None:
            arrived.synchronize()
        t = int(seen[i])
        if t in stop_ids:
            if fed:
                forward.take_back(1)
            break
        out.append(t)
        if on_token is not None:
            on_token(out)
    return out


GiB = 2**30
ROOM = 4096  # tokens reserved after a document for the questions and answers that follow it


def size(n_bytes) -> str:
    return f"{n_bytes / GiB:.1f} GiB" if n_bytes >= GiB / 10 else f"{n_bytes / 2**20:.1f} MiB"


def free_host_memory() -> int:
    """Bytes of host memory the OS can give without swapping (Linux: MemAvailable)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_gpu_memory(device) -> int:
    """Bytes free on the GPU, counting what torch's allocator holds but does not use."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def chat_turn(ckpt, tok) -> tuple[str, str]:
    """The text before and after a user's message in the checkpoint's chat format: a document opens the
    turn, each question closes it."""
    marker = "\x00"
    before, after = chat_prompt(ckpt, tok, marker).split(marker)
    return before, after


class Reader:
    """A checkpoint loaded once, a document read into the context memory once, questions asked about it.

        from generate import Reader
        r = Reader("checkpoints/smollm2-135m-instruct")  # device, dtype, attention, infllm settings, chat
        r.read(open("logbook.txt").read())               # the prefill, once
        r.ask("\nWhat was the code?", on_text=print)     # from the memory as it was after the document
        r.ask("\nWho signed?")                           # (the first question and answer are forgotten)
        r.save("logbook.mem")                            # later, in another process: r.load("logbook.mem")

    A question is the document's continuation: its tokens follow the document's (no BOS), fed in the
    same pieces as in one process that read both, so the answer is the same. The memory after the
    document is kept as a mark (a snapshot without the units, which never change once made) and every
    question starts by rewinding to it. generate.py is this class behind a command line."""

    def __init__(self, ckpt, device=None, dtype=None, attention="infllm", infllm="", chat=False, compile=None,
                 compile_cache=None, progress=False, host_memory=None, gpu_memory=None, rank=0, world=1):
        self.device = device if isinstance(device, torch.device) else pick_device(device)
        cuda = self.device.type == "cuda"
        self.dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype or (torch.bfloat16 if cuda else torch.float32)
        self.cfg = infllm if isinstance(infllm, InfLLMConfig) else InfLLMConfig.parse(infllm)
        if not Path(ckpt).is_dir():
            raise UsageError(f"checkpoint folder {ckpt} does not exist")
        self.ckpt, self.attention, self.progress = Path(ckpt), attention, progress
        self.compiled = compile if compile is not None else cuda and COMPILE_ON_GPU
        if self.compiled or cuda:  # the eager GPU path has Triton kernels of its own to keep
            use_compile_cache(compile_cache)
        if cuda:
            gpu_matmuls(self.dtype)
        self.model, self.tok = load(ckpt, self.device, self.dtype, rank, world)
        if self.compiled:
            self.model.compile_blocks()
        self.chat = chat_turn(ckpt, self.tok) if chat else ("", "")
        self.caches = make_caches(self.model, attention, self.cfg, kernel=fast_kernel(self.device, attention, self.compiled))
        # On a GPU the forwards are replayed from CUDA graphs, compiled or not (not for full attention:
        # its cache grows).
        self.forward = forward_fn(self.model, self.caches, graphs=cuda and attention != "full")
        self.budget = {"host": host_memory, "GPU": gpu_memory}  # bytes the caches may take; None: what is free
        self.reserved = 0  # tokens the caches have room for
        self.mark = None  # the memory after the document
        self.figures = {}  # of the last read or question: tokens, seconds

    @property
    def units_on_gpu(self) -> bool:
        """Whether the memory units are stored in GPU memory (unit_storage; auto decides as the caches grow)."""
        units = getattr(self.caches[0], "units", None)
        return units is not None and units.storage_k.is_cuda

    @property
    def tokens(self) -> int:
        """Tokens in the memory now."""
        return self.caches[0].pos

    def read(self, document: str, whole_turn=False, room=ROOM) -> torch.Tensor:
        """Read a document from the start (BOS first) and mark the memory after it. With chat, the
        document opens a user turn that each question closes (whole_turn: the prompt is the whole turn).
        Returns the logits after its last token."""
        for c in self.caches:
            c.reset()
        self.mark = None
        head, tail = self.chat
        logits = self.feed(self.tok.encode(head + document + (tail if whole_turn else ""), bos=True), room)
        self.mark = [c.snapshot(storage=False) for c in self.caches]
        return logits

    def ask(self, question: str, max_new_tokens=128, on_text=None, **sampling) -> str:
        """Answer a question from the memory after the document; on_text(new_text) streams the answer."""
        t0 = time.perf_counter()
        self.rewind()
        logits = self.feed(self.tok.encode(question + self.chat[1]), room=max_new_tokens)
        text = self.answer(logits, max_new_tokens, on_text, **sampling)
        self.figures["answer_s"] = time.perf_counter() - t0  # rewind, question and answer
        return text

    def rewind(self):
        """Back to the memory right after the document: what came since is forgotten."""
        if self.mark is None:
            raise UsageError("there is no document to ask about: read one or load a memory snapshot first")
        for c, m in zip(self.caches, self.mark):
            c.restore(m)

    def feed(self, ids: list[int], room=0) -> torch.Tensor:
        """Append ids to the memory (chunked prefill, the last token alone); the logits after the last."""
        self.check_memory(self.tokens + len(ids) + room)
        progress = None
        if self.progress and len(ids) > self.cfg.chunk_size:
            from tqdm import tqdm
            progress = tqdm(total=len(ids), desc="prefill", unit="tok", file=sys.stderr, leave=False)
        t0 = synced_clock(self.device)
        for c in self.caches:  # the unit storage (pinned host memory or GPU memory), before the first piece
            if hasattr(c, "reserve"):
                c.reserve(self.tokens + len(ids) + room)
        reserve_s = synced_clock(self.device) - t0
        warm = getattr(self.forward, "warmup_s", None)
        logits = prefill(self.model, self.caches, ids, self.cfg.chunk_size, progress, self.forward, room)
        self.figures = {"prompt_tokens": len(ids), "prefill_s": synced_clock(self.device) - t0,
                        "first_token_s": time.time() - STARTED, "reserve_s": reserve_s,
                        "warmup_s": self.forward.warmup_s - warm if warm is not None else None}
        if progress is not None:
            progress.close()
        return logits

    def answer(self, logits, max_new_tokens=128, on_text=None, temperature=0.0, top_k=None, seed=None) -> str:
        """Generate from logits (of feed, read or ask); on_text(new_text) gets the text as it grows."""
        shown = [""]

        def stream(out_ids):  # pass on what the new tokens add to the decoded text
            now = self.tok.decode(out_ids)
            if on_text is not None and not now.endswith("\ufffd"):  # wait for a whole UTF-8 character
                on_text(now[len(shown[0]):])
                shown[0] = now

        t0 = time.perf_counter()
        new = decode(self.model, self.caches, logits, max_new_tokens, set(self.tok.eos_ids), temperature, top_k,
                     seed, on_token=stream, forward=self.forward)
        synced_clock(self.device)
        text = self.tok.decode(new)
        if on_text is not None and len(text) > len(shown[0]):
            on_text(text[len(shown[0]):])
        # The first new token comes from the prefill's logits; each later one costs a decoding step.
        secs = time.perf_counter() - t0
        self.figures |= {"new_tokens": len(new), "decode_tok_s": (len(new) - 1) / secs if len(new) > 1 else None}
        return text

    def header(self) -> dict:
        """What a snapshot must share with this reader to be loaded (see infllm.load_memory)."""
        # The pool and where the units are stored change speed only.
        cfg = {k: v for k, v in vars(self.cfg).items() if k not in ("max_cached_block", "unit_storage")}
        return {"checkpoint": checkpoint_fingerprint(self.ckpt), "dtype": str(self.dtype).removeprefix("torch."),
                "attention": self.attention, "settings": json.dumps(cfg if self.attention != "full" else {}),
                "chat": bool(self.chat[0] or self.chat[1])}

    def save(self, path) -> int:
        """Write the memory after the document to path (safetensors); returns its size in bytes."""
        if self.mark is not None:
            self.rewind()
        synced_clock(self.device)
        return save_memory(path, self.caches, self.header() | {"tokens": self.tokens})

    def load(self, path):
        """Read a snapshot written by save (by this or another process) as the document."""
        meta = read_snapshot_header(path)
        expect, default = self.header(), vars(InfLLMConfig())
        try:
            saved = json.loads(meta.get("settings", "{}"))
        except json.JSONDecodeError:
            saved = {}  # not ours to read: load_memory refuses its settings with its own sentence
        # A snapshot made before a setting existed lacks its key, and was made with that setting's default.
        expect["settings"] = json.dumps({k: v for k, v in json.loads(expect["settings"]).items()
                                         if k in saved or v != default[k]})
        n = int(meta.get("tokens", 0))
        self.check_memory(n + ROOM)
        for c in self.caches:
            c.reset()
            c.reserve(n + ROOM)  # at once, exactly: growing by a question later would copy it all
        load_memory(path, self.caches, expect)
        self.mark = [c.snapshot(storage=False) for c in self.caches]

    def check_memory(self, n_tokens):
        """Refuse, before any work, a sequence whose caches do not fit in the memory that is free."""
        if n_tokens <= self.reserved:
            return
        if self.device.type == "cuda" and self.attention == "infllm":
            # unit_storage=auto decides where the units go at every growth: a longer document that no longer
            # leaves room in GPU memory moves them to host memory
            free = self.budget["GPU"] if self.budget["GPU"] is not None else free_gpu_memory(self.device)
            place_units(self.caches, self.model.args, self.cfg, n_tokens, free, self.reserved)
        cfg = dataclasses.replace(self.cfg, unit_storage="device" if self.units_on_gpu else "host")
        plan = functools.partial(memory_plan, self.model.args, self.attention, cfg, dtype=self.dtype,
                                 device=self.device)
        need, held = plan(n_tokens=n_tokens), plan(n_tokens=self.reserved)
        for where, key in (("host", "host"), ("GPU", "device")):
            more = need[key] - held[key]
            if more <= 0:
                continue
            free = self.budget[where]
            if free is None:
                free = free_host_memory() if where == "host" else free_gpu_memory(self.device)
            if more > free:
                parts = [f"{k} {size(v)}" for k, v in need["parts"].items()
                         if need["where"][k] == key and v >= 0.05 * need[key]]
                hint = ("set --infllm unit_dtype=fp8 (half the units' bytes) or " if self.attention == "infllm"
                        and self.cfg.unit_dtype != "fp8" and "memory units" in need["parts"] and where == "host"
                        else "set --infllm unit_storage=host (units in host memory) or "
                        if where == "GPU" and self.attention == "infllm" and self.units_on_gpu
                        else "lower --infllm max_cached_block or " if where == "GPU" and self.attention == "infllm" else "")
                raise UsageError(f"a memory of {n_tokens:,} tokens needs {size(need[key])} of {where} memory "
                                 f"({', '.join(parts)}), {size(more)} more than it holds now, but "
                                 f"{size(free)} is free: {hint}use a shorter prompt")
        self.reserved = n_tokens


def read_prompt(args) -> str | None:
    if args.prompt is None and args.prompt_file is None:
        return None
    if args.prompt is not None:
        text = args.prompt
    else:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise UsageError(f"prompt file {path} does not exist")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"prompt file {path} is not UTF-8 text (bad byte at offset {e.start})") from None
    if not text.strip():
        raise UsageError("the prompt is empty")
    return text


def pick_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but this machine has no CUDA GPU (use --device cpu)")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise UsageError(f"unknown device {name!r} (use cpu or cuda)")
    return torch.device(name)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="Hugging Face style checkpoint folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (with --load-memory: the question)")
    src.add_argument("--prompt-file", help="file holding the prompt (UTF-8)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--attention", choices=["infllm", "stream", "full"], default="infllm")
    p.add_argument("--infllm", default="", metavar="KEY=VALUE,...",
                   help="InfLLM settings, e.g. n_local=4096,topk=16,unit_dtype=fp8 (defaults: the authors' Mistral config)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the layers and the piece step (default: no; worth it for prompts of several hundred K tokens once the compile cache is warm)")
    p.add_argument("--compile-cache", metavar="DIR", default=None,
                   help="where compiled programs are kept between runs (default: $INFLLM_COMPILE_CACHE or ~/.cache/infllm/compile)")
    p.add_argument("--save-memory", metavar="FILE", help="the prompt is a document: save the memory after it to FILE "
                   "(with --chat its user turn stays open for the questions); --max-new-tokens 0 only reads")
    p.add_argument("--load-memory", metavar="FILE", help="start from a saved document; the prompt is a question that follows it")
    p.add_argument("--interactive", action="store_true", help="after the document (the prompt or --load-memory), "
                   "answer questions from stdin, one per line, each from the memory after the document")
    p.add_argument("--host-memory", type=float, metavar="GIB", help="host memory the caches may take (default: what is free)")
    p.add_argument("--gpu-memory", type=float, metavar="GIB", help="GPU memory the caches may take (default: what is free)")
    p.add_argument("--json", action="store_true", help="print one JSON object (per question) instead of streaming text")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def check_args(args, text, world=1):
    if world > 1 and (args.save_memory or args.load_memory or args.interactive):
        raise UsageError("--save-memory, --load-memory and --interactive do not run tensor parallel yet: use one process")
    if args.max_new_tokens < 0 or (args.max_new_tokens == 0 and not args.save_memory):
        raise UsageError("--max-new-tokens must be at least 1 (0 only with --save-memory: read and save)")
    if args.save_memory and args.load_memory:
        raise UsageError("--save-memory and --load-memory go to separate runs: save a document, then load it to ask")
    if args.save_memory and args.interactive:
        raise UsageError("--save-memory and --interactive go to separate runs: save a document, then load it with --interactive")
    if text is None and not (args.load_memory and args.interactive):
        raise UsageError("give a prompt (--prompt or --prompt-file); only --load-memory with --interactive needs none")
    if text is not None and args.load_memory and args.interactive:
        raise UsageError("with --load-memory and --interactive the questions come from stdin: drop the prompt")


def figures(r: Reader, text: str) -> dict:
    f = r.figures
    stats = memory_stats(r.caches)
    cuda = r.device.type == "cuda"
    return {
        "text": text,
        "prompt_tokens": f["prompt_tokens"],
        "memory_tokens": r.tokens,
        "new_tokens": f.get("new_tokens", 0),
        "compiled": r.compiled,
        # From the process's start, compilation and loading included: what a user waits for.
        "first_token_s": round(f["first_token_s"], 3),
        "wall_s": round(time.time() - STARTED, 3),
        "prefill_s": round(f["prefill_s"], 4),
        "prefill_tok_s": round(f["prompt_tokens"] / f["prefill_s"], 2),
        # Parts of prefill_s that a later prompt of the same size does not pay (or pays less of): reserving the
        # unit storage, and the forwards run for the first time and captured (compilation included; None
        # without CUDA graphs).
        "reserve_s": round(f["reserve_s"], 4),
        "warmup_s": round(f["warmup_s"], 4) if f["warmup_s"] is not None else None,
        "decode_tok_s": round(f["decode_tok_s"], 2) if f.get("decode_tok_s") else None,
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / GiB, 3) if cuda else None,
        "peak_rss_gib": round(peak_rss_gib(), 3),
        "unit_cache_hit_rate": stats["hit_rate"],
        "units_on_gpu": r.units_on_gpu if r.attention == "infllm" and cuda else None,  # where unit_storage put them
    } | ({"answer_s": round(f["answer_s"], 3)} if "answer_s" in f else {})


def report(args, result):
    if args.json:
        print(json.dumps(result), flush=True)
        return
    r = result
    print(f"[{r['prompt_tokens']} prompt tokens ({r['memory_tokens']} in memory), first token after "
          f"{r['first_token_s']:.1f} s, whole run {r['wall_s']:.1f} s{' (compiled)' if r['compiled'] else ''}; "
          f"prefill {r['prefill_s']:.2f} s ({r['prefill_tok_s']:.0f} tok/s"
          + (f"; storage {r['reserve_s']:.2f} s, first runs and captures {r['warmup_s']:.2f} s"
             if r["warmup_s"] else "")
          + f"), {r['new_tokens']} new tokens at {r['decode_tok_s'] or 0:.1f} tok/s, peak RSS {r['peak_rss_gib']:.2f} GiB"
          + (f", peak GPU {r['peak_gpu_gib']:.2f} GiB" if r["peak_gpu_gib"] is not None else "")
          + (f", unit cache hit rate {r['unit_cache_hit_rate']:.1%}" if r["unit_cache_hit_rate"] is not None else "")
          + (f", units in {'GPU' if r['units_on_gpu'] else 'host'} memory" if r["units_on_gpu"] is not None else "")
          + (f", snapshot {r['snapshot_gib']:.2f} GiB in {r['save_s']:.1f} s" if "snapshot_gib" in r else "")
          + (f", snapshot loaded in {r['load_s']:.1f} s" if "load_s" in r else "")
          + (f", answered in {r['answer_s']:.2f} s" if "answer_s" in r else "")
          + "]", file=sys.stderr, flush=True)


def run(args, rank=0, world=1, device=None) -> dict:
    """The command line's work; prints the answer (or answers) and returns the figures of the last one.
    Tensor parallel (world processes), every process does the same work on its share of the model and
    only process 0 prints."""
    text = read_prompt(args)
    check_args(args, text, world)
    budget = {k: None if v is None else int(v * GiB) for k, v in (("host", args.host_memory), ("gpu", args.gpu_memory))}
    r = Reader(args.ckpt, device or args.device, args.dtype, args.attention, args.infllm, args.chat, args.compile,
               args.compile_cache, progress=not (args.no_progress or args.json or rank), host_memory=budget["host"],
               gpu_memory=budget["gpu"], rank=rank, world=world)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    out = None if args.json or rank else (lambda t: (sys.stdout.write(t), sys.stdout.flush()))
    extra = {}
    if args.load_memory:
        t0 = time.perf_counter()
        r.load(args.load_memory)
        extra["load_s"] = round(time.perf_counter() - t0, 3)
    elif args.attention == "full" and text is not None and rank == 0:
        n = len(r.tok.encode(text, bos=True))
        if n > r.model.args.max_seq_len:
            print(f"warning: the prompt has {n} tokens, more than the {r.model.args.max_seq_len} this model was "
                  "trained on; full attention will likely fail past that (try --attention infllm)", file=sys.stderr)
    if args.interactive:
        if text is not None:
            r.read(text)
        return interact(args, r, sampling, out, extra)
    if args.load_memory:
        answer = r.ask(text, args.max_new_tokens, out, **sampling)
    else:
        logits = r.read(text, whole_turn=not args.save_memory)
        if args.save_memory:
            t0 = time.perf_counter()
            size = r.save(args.save_memory)
            extra |= {"snapshot_gib": round(size / GiB, 3), "save_s": round(time.perf_counter() - t0, 3)}
        answer = r.answer(logits, args.max_new_tokens, out, **sampling) if args.max_new_tokens else ""
    if out is not None and args.max_new_tokens:
        out("\n")
    result = figures(r, answer) | extra | ({"processes": world} if world > 1 else {})
    if rank == 0:
        report(args, result)
    return result


def interact(args, r: Reader, sampling, out, extra) -> dict:
    """Questions from stdin, one per line, until its end (Ctrl-D); each follows the document after a
    newline and is answered from the memory after the document."""
    result = {}
    tty = sys.stdin.isatty()
    while True:
        if tty:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        if not line.strip():
            continue
        answer = r.ask("\n" + line.rstrip("\n"), args.max_new_tokens, out, **sampling)
        if out is not None:
            out("\n")
        result = figures(r, answer) | extra
        extra = {}  # the snapshot's loading goes with the first answer
        report(args, result)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args, *join_processes(args.device))
    except (UsageError, CheckpointError, TokenizerError, SnapshotError, ValueError) as e:
        # Every process says it (in one write: the lines of several processes must not mix), and
        # leaves: none waits on another.
        sys.stderr.write(f"error: {e}\n")
        sys.stderr.flush()
        return 2
    finally:
        leave_processes()
    return 0


if __name__ == "__main__":
    code = main()
    # Everything is written and flushed; what the interpreter would still do (free every module, the CUDA
    # context, gigabytes of page-locked unit storage) costs 0.7 s on an H200 and helps no one.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
