"""The engine's forwards in fixed shapes, replayed from CUDA graphs, and greedy decoding that never waits for the
host. The reference runs model(tokens, caches) chunk by chunk (reader.prefill); FixedShapes runs the same
arithmetic in pieces of exc_block_size tokens, with the same outputs (tests/test_engine.py, tests/test_gpu.py,
tests/test_parallel.py). Timings: docs/benchmarks.md."""
import functools
import time

import torch

from engine.memory import FixedShapeMemory


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
        if not all(isinstance(c, FixedShapeMemory) for c in caches):
            raise ValueError("CUDA graphs need the engine's InfLLM or stream caches (full attention grows its cache)")
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
            # Default priority (the unit loaders take high priority: engine.memory.MemoryUnits). The pool holds 32
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
        logits = None if last_only else torch.empty(1, T, self.model.args.vocab_size, device=tokens.device,
                                              dtype=torch.promote_types(self.model.embed_tokens.weight.dtype, torch.float32))
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


def forward_fn(model, caches, graphs=False, wavefront=None):
    """The model's forward over caches: plain (as the reference runs it), or in fixed shapes, replayed from
    CUDA graphs on a GPU (wavefront: see FixedShapes)."""
    if graphs:
        return FixedShapes(model, caches, wavefront=wavefront)
    return lambda tokens, last_only=False: model(tokens, caches, last_only=last_only)


@torch.no_grad()
def decode_ahead(forward: FixedShapes, logits, max_new_tokens, stop_ids=(), on_token=None) -> list[int]:
    """decode's greedy tokens, without the device ever waiting for the host. Each token is chosen on the device
    and fed from there: the step that reads it is queued before the host has seen it, and the host reads it
    while that step runs. (Waiting for each token and then queuing its step left the GPU idle for the host's
    part of every token: docs/benchmarks.md, "Decoding: the next token chosen on the GPU".) The host
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
