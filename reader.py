"""Read a document once, ask it many questions: the Reader behind generate.py, and what the scripts share with
it (loading, prefill, decoding, sampling, the memory check, memory snapshots).

Two engines run the same algorithm. "reference": infllm.py's caches and the model's plain forward, chunk by
chunk, the code to read. "fast": engine/, the same results faster (fixed shapes, CUDA graphs, Triton kernels;
tests/test_engine.py holds it to the reference). The default is fast on a GPU, the reference on a CPU.
"""
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

import engine
import engine.graphs
import engine.storage
import infllm
from engine.graphs import FixedShapes, decode_ahead, synced_clock
from infllm import InfLLMConfig
from model import DTYPES, load_model, safetensors_files
from tokenizer import chat_prompt, load_tokenizer

ENGINES = ("reference", "fast")
GiB = 2**30
ROOM = 4096  # tokens reserved after a document for the questions and answers that follow it
# --compile is not the default on a GPU: a fresh eager process answers sooner, and the eager wavefront and
# decoding are faster than the compiled ones (docs/benchmarks.md, the summary at its top).
COMPILE_ON_GPU = False


class UsageError(ValueError):
    """Bad input from the command line; the message is one sentence."""


class WriteInterrupted(KeyboardInterrupt):
    """Ctrl-C while a file was being written (write_file): still a KeyboardInterrupt, with a sentence saying
    what became of the file."""


# ----------------------------------------------------------------------------- output files

def check_output_path(path, what):
    """Refuse, before any work, a file that could not be written at the end of it: its folder must exist and
    be writable, and the path must not be a folder. what names the file in the sentence (an option, say)."""
    path = Path(path)
    folder = path.parent  # Path("x.mem").parent is Path("."): the current folder
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder: give the name of a file in it")
    if not folder.exists():
        raise UsageError(f"{what} {path} cannot be written: the folder {folder} does not exist")
    if not folder.is_dir():
        raise UsageError(f"{what} {path} cannot be written: {folder} is a file, not a folder")
    # write_file makes a new file in the folder and renames it: the folder must let us add entries
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path} cannot be written: the folder {folder} is not writable")


def write_file(path, what, write, error=UsageError):
    """Write a file whole or not at all: write(f) fills path + ".partial" (a binary file), which replaces path
    only once complete, so an earlier file at path is never damaged. A write that fails part-way (a full disk,
    Ctrl-C, any exception) removes the partial file; a failure of the disk or the file system becomes one
    sentence (error), Ctrl-C a WriteInterrupted. Returns what write returns."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "wb") as f:
            result = write(f)
        os.replace(tmp, path)
    except BaseException as e:  # BaseException: Ctrl-C and SystemExit must not leave the partial file either
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        undone = f"the partial file is removed and {path} is as it was"
        if isinstance(e, OSError):
            raise error(f"writing {what} {path} failed part-way ({e.strerror or e}): {undone}") from None
        if isinstance(e, KeyboardInterrupt):
            raise WriteInterrupted(f"writing {what} {path} was interrupted: {undone}") from None
        raise
    return result


def default_engine(device) -> str:
    """The engine a run gets unless it names one: fast on a GPU, the reference on a CPU."""
    return "fast" if torch.device(device).type == "cuda" else "reference"


def check_engine(name, compile_=False):
    """Refuse an unknown engine, or a feature the reference does not have, before anything loads."""
    if name not in ENGINES:
        raise UsageError(f"unknown engine {name!r} (use {' or '.join(ENGINES)})")
    if name == "reference" and compile_:
        raise UsageError("--compile runs in the engine only: use --engine fast (or drop --compile)")


def load(ckpt, device="cpu", dtype=torch.float32, rank=0, world=1):
    """Model (process rank's share of it, split over world processes) and tokenizer from a Hugging Face
    style checkpoint folder."""
    return load_model(ckpt, device=device, dtype=dtype, rank=rank, world=world), load_tokenizer(ckpt)


def prepare(model, which="reference", compiled=False):
    """Once per model: the engine swaps in its forwards (a no-op on a CPU) and compiles the layers' dense
    work with compiled; the reference runs the model as it is."""
    if which == "fast":
        engine.accelerate(model)
        if compiled:
            engine.compile_blocks(model)


def plain_forward(model, caches):
    """model(tokens, caches): the reference's forward, one chunk at a time."""
    return lambda tokens, last_only=False: model(tokens, caches, last_only=last_only)


def caches_and_forward(model, attention, cfg, which="reference", compiled=False, graphs=None):
    """One cache per layer, and the forward that runs the model over them. The reference: infllm.py's caches,
    the plain forward. The engine: its fixed-shape caches with the device's fastest attention kernel, replayed
    from CUDA graphs on a GPU (graphs=None; not for full attention, whose cache grows)."""
    if which == "reference":
        caches = infllm.make_caches(model, attention, cfg)
        return caches, plain_forward(model, caches)
    device = model.embed_tokens.weight.device
    caches = engine.make_caches(model, attention, cfg, kernel=engine.pick_kernel(device, attention, compiled))
    if graphs is None:
        graphs = device.type == "cuda" and attention != "full"
    return caches, engine.graphs.forward_fn(model, caches, graphs=graphs)


@torch.no_grad()
def prefill(model, caches, ids: list[int], chunk_size: int, progress=None, forward=None, room=0):
    """Feed the prompt chunk_size tokens at a time through all layers, all but its last token; the last
    one goes alone, as a decoding step does, so that it makes a memory lookup with its own query (the
    authors' generation loop does the same). room: tokens still to come (decoding), for which the unit
    storage is reserved now, so that it never moves mid-run. Returns the logits after the last token [vocab]."""
    forward = forward or plain_forward(model, caches)
    tokens = torch.tensor(ids, device=model.embed_tokens.weight.device)[None]
    for c in caches:
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


def check_sampling(temperature=0.0, top_k=None, names=("temperature", "top_k")):
    """Refuse sampling settings that mean nothing, before any work: a negative temperature (or NaN), fewer
    than one token to sample from. names: what the sentence calls the two (the command line's options)."""
    if not temperature >= 0:  # `not >=`: NaN fails every comparison, and must fail this one
        raise UsageError(f"{names[0]} must be 0 (greedy) or more, not {temperature}")
    if top_k is not None and top_k < 1:
        raise UsageError(f"{names[1]} must be at least 1 (the number of likeliest tokens sampled from), not {top_k}")


def sample(logits, temperature: float = 0.0, top_k: int | None = None, generator=None) -> int:
    """Greedy at temperature 0; else sampling from the top_k (or all) tokens."""
    check_sampling(temperature, top_k)
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
    through the engine's FixedShapes: decode_ahead, the same tokens without the device waiting for the host)."""
    forward = forward or plain_forward(model, caches)
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


# ----------------------------------------------------------------------------- the machine

def pick_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but this machine has no CUDA GPU (use --device cpu)")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise UsageError(f"unknown device {name!r} (use cpu or cuda)")
    return torch.device(name)


def gpu_matmuls(dtype):
    """On a GPU, fp32 matrix products of a bf16 / fp16 model (the attention's logits and weighted sums)
    on TF32 tensor cores: TF32 holds those inputs' mantissas, so the logits stay exact, and the products run
    faster (docs/benchmarks.md). An fp32 model keeps full fp32 products."""
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


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


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


# ----------------------------------------------------------------------------- the reader

def checkpoint_fingerprint(ckpt) -> str:
    """A content hash of a checkpoint: config.json, each weights file's index (its safetensors header: every
    tensor's name, dtype, shape and offsets) and 16 samples of 64 KiB spread over its data, which tell two
    fine-tunes of one shape apart. Milliseconds, where hashing every weight would take minutes."""
    ckpt = Path(ckpt)
    h = hashlib.sha256((ckpt / "config.json").read_bytes())
    for f in safetensors_files(ckpt):
        size = f.stat().st_size
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(f.name.encode() + fh.read(n))
            for i in range(16):
                fh.seek(8 + n + (size - 8 - n) * i // 16)
                h.update(fh.read(1 << 16))
    return h.hexdigest()[:32]


class Reader:
    """A checkpoint loaded once, a document read into the context memory once, questions asked about it.

        from reader import Reader
        r = Reader("checkpoints/smollm2-135m-instruct")  # device, dtype, attention, infllm settings, chat, engine
        r.read(open("logbook.txt").read())               # the prefill, once
        r.ask("\\nWhat was the code?", on_text=print)     # from the memory as it was after the document
        r.ask("\\nWho signed?")                           # (the first question and answer are forgotten)
        r.save("logbook.mem")                            # later, in another process: r.load("logbook.mem")

    A question is the document's continuation: its tokens follow the document's (no BOS), fed in the
    same pieces as in one process that read both, so the answer is the same. The memory after the
    document is kept as a mark (a snapshot without the units, which never change once made) and every
    question starts by rewinding to it. An empty question continues the document: its answer comes from the
    logits after the document, kept with the mark (and in a snapshot). progress: a bar on stderr while a
    document is read or a snapshot loaded. generate.py is this class behind a command line."""

    def __init__(self, ckpt, device=None, dtype=None, attention="infllm", infllm="", chat=False, compile=None,
                 compile_cache=None, progress=True, host_memory=None, gpu_memory=None, rank=0, world=1,
                 engine=None):
        self.device = device if isinstance(device, torch.device) else pick_device(device)
        cuda = self.device.type == "cuda"
        self.engine = engine or default_engine(self.device)
        check_engine(self.engine, compile)
        self.dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype or (torch.bfloat16 if cuda else torch.float32)
        self.cfg = infllm if isinstance(infllm, InfLLMConfig) else InfLLMConfig.parse(infllm)
        if not Path(ckpt).is_dir():
            raise UsageError(f"checkpoint folder {ckpt} does not exist")
        self.ckpt, self.attention, self.progress = Path(ckpt), attention, progress
        fast = self.engine == "fast"
        self.compiled = compile if compile is not None else cuda and fast and COMPILE_ON_GPU
        if self.compiled or (cuda and fast):  # the engine's eager GPU path has Triton kernels of its own to keep
            use_compile_cache(compile_cache)
        if cuda:
            gpu_matmuls(self.dtype)
        self.model, self.tok = load(ckpt, self.device, self.dtype, rank, world)
        prepare(self.model, self.engine, self.compiled)
        self.chat = chat_turn(ckpt, self.tok) if chat else ("", "")
        self.caches, self.forward = caches_and_forward(self.model, attention, self.cfg, self.engine, self.compiled)
        self.budget = {"host": host_memory, "GPU": gpu_memory}  # bytes the caches may take; None: what is free
        self.reserved = 0  # tokens the caches have room for
        self.mark = None  # the memory after the document
        self.last_logits = None  # the logits after the document: the answer to an empty question starts there
        self.figures = {}  # of the last read or question: tokens, seconds

    @property
    def units_on_gpu(self) -> bool:
        """Whether the memory units are stored in GPU memory (the engine's unit_storage; auto decides as the
        caches grow). The reference keeps them in host memory, as the paper does."""
        if self.engine != "fast":
            return False
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
        self.mark = self.last_logits = None
        head, tail = self.chat
        logits = self.feed(self.tok.encode(head + document + (tail if whole_turn else ""), bos=True), room)
        self.mark = [c.snapshot(storage=False) for c in self.caches]
        # A copy: the engine's CUDA graphs write every step's logits into the same tensor.
        self.last_logits = logits.clone()
        return logits

    def ask(self, question: str, max_new_tokens=128, on_text=None, **sampling) -> str:
        """Answer a question from the memory after the document; on_text(new_text) streams the answer.
        An empty question continues the document (with chat, the end of the turn is still fed: the model
        answers the document itself)."""
        check_sampling(sampling.get("temperature", 0.0), sampling.get("top_k"))  # before any work
        t0 = time.perf_counter()
        self.rewind()
        ids = self.tok.encode(question + self.chat[1])
        logits = self.feed(ids, room=max_new_tokens) if ids else self.after_document(room=max_new_tokens)
        text = self.answer(logits, max_new_tokens, on_text, **sampling)
        self.figures["answer_s"] = time.perf_counter() - t0  # rewind, question and answer
        return text

    def after_document(self, room=0) -> torch.Tensor:
        """The logits after the document, with room for room more tokens: what an empty question is answered
        from. (They cannot be made again: the document's last token cannot be fed twice, nor taken back.)"""
        if self.last_logits is None:
            raise SnapshotError("this memory snapshot does not hold the logits after its document (it was saved "
                                "before they were kept): ask a question, or save the document again")
        t0 = synced_clock(self.device)
        self.check_memory(self.tokens + room)
        for c in self.caches:
            c.reserve(self.tokens + room)
        # no prompt was fed: no prefill, and the first token's logits are there now
        self.figures = {"prompt_tokens": 0, "prefill_s": 0.0, "first_token_at": time.time(),
                        "reserve_s": synced_clock(self.device) - t0, "warmup_s": None}
        return self.last_logits

    def rewind(self):
        """Back to the memory right after the document: what came since is forgotten."""
        if self.mark is None:
            raise UsageError("there is no document to ask about: read one or load a memory snapshot first")
        for c, m in zip(self.caches, self.mark):
            c.restore(m)

    def feed(self, ids: list[int], room=0) -> torch.Tensor:
        """Append ids to the memory (chunked prefill, the last token alone); the logits after the last."""
        self.check_memory(self.tokens + len(ids) + room)
        progress = self.bar(len(ids), "prefill", "tok") if len(ids) > self.cfg.chunk_size else None
        t0 = synced_clock(self.device)
        for c in self.caches:  # the unit storage (the engine's: pinned host memory or GPU memory), before the first piece
            c.reserve(self.tokens + len(ids) + room)
        reserve_s = synced_clock(self.device) - t0
        warm = getattr(self.forward, "warmup_s", None)
        logits = prefill(self.model, self.caches, ids, self.cfg.chunk_size, progress, self.forward, room)
        # first_token_at: the clock when the logits of the first new token are there (generate.py counts it
        # from the process's start)
        self.figures = {"prompt_tokens": len(ids), "prefill_s": synced_clock(self.device) - t0,
                        "first_token_at": time.time(), "reserve_s": reserve_s,
                        "warmup_s": self.forward.warmup_s - warm if warm is not None else None}
        if progress is not None:
            progress.refresh()  # drawn at its end: the last token, fed alone, came too soon to be drawn
            progress.close()
        return logits

    def bar(self, total, desc, unit):
        """A progress bar on stderr (tqdm), gone once closed; None without progress."""
        if not self.progress:
            return None
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False)

    def answer(self, logits, max_new_tokens=128, on_text=None, temperature=0.0, top_k=None, seed=None) -> str:
        """Generate from logits (of feed, read or ask); on_text(new_text) gets the text as it grows."""
        check_sampling(temperature, top_k)
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
        """What a snapshot must share with this reader to be loaded (see load_memory)."""
        # The pool and where the units are stored change speed only.
        cfg = {k: v for k, v in vars(self.cfg).items() if k not in ("max_cached_block", "unit_storage")}
        return {"checkpoint": checkpoint_fingerprint(self.ckpt), "dtype": str(self.dtype).removeprefix("torch."),
                "attention": self.attention, "settings": json.dumps(cfg if self.attention != "full" else {}),
                "chat": bool(self.chat[0] or self.chat[1]), "engine": self.engine}

    def save(self, path) -> int:
        """Write the memory after the document to path (safetensors), and the logits after it (for an empty
        question); returns its size in bytes."""
        check_output_path(path, "memory snapshot")  # before the rewind: a refusal leaves the memory as it is
        if self.mark is not None:
            self.rewind()
        synced_clock(self.device)
        extra = {"last_logits": self.last_logits} if self.last_logits is not None else {}
        return save_memory(path, self.caches, self.header() | {"tokens": self.tokens}, extra)

    def load(self, path):
        """Read a snapshot written by save (by this or another process) as the document."""
        meta = read_snapshot_header(path)
        expect, default = self.header(), vars(InfLLMConfig())
        # Each engine lays its caches out its own way: a snapshot loads into the engine that saved it.
        made_by = meta.get("engine", "fast")  # a snapshot from before the reference existed is the engine's
        if made_by != expect.pop("engine"):
            raise SnapshotError(f"memory snapshot {path} was saved by --engine {made_by}, which this run "
                                f"(--engine {self.engine}) cannot read: load it with --engine {made_by}")
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
        load_memory(path, self.caches, expect, lambda n: self.bar(n, "loading", "layer"))
        self.mark = [c.snapshot(storage=False) for c in self.caches]
        self.last_logits = read_extra(path, "last_logits", self.device)  # None in a snapshot from before them

    def check_memory(self, n_tokens):
        """Refuse, before any work, a sequence whose caches do not fit in the memory that is free. The plan
        counts the engine's buffers; the reference's hold the same tokens, in buffers no larger."""
        if n_tokens <= self.reserved:
            return
        if self.device.type == "cuda" and self.attention == "infllm" and self.engine == "fast":
            # unit_storage=auto decides where the units go at every growth: a longer document that no longer
            # leaves room in GPU memory moves them to host memory
            free = self.budget["GPU"] if self.budget["GPU"] is not None else free_gpu_memory(self.device)
            engine.storage.place_units(self.caches, self.model.args, self.cfg, n_tokens, free, self.reserved)
        cfg = dataclasses.replace(self.cfg, unit_storage="device" if self.units_on_gpu else "host")
        plan = functools.partial(engine.storage.memory_plan, self.model.args, self.attention, cfg, dtype=self.dtype,
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
                raise UsageError(f"a memory of {n_tokens:,} tokens needs {size(need[key])} of {where} memory "
                                 f"({self._parts(need, key)}), {size(more)} more than it holds now, but "
                                 f"{size(free)} is free: {self._hint(where)}use a shorter prompt")
        self.reserved = n_tokens

    @staticmethod
    def _parts(need, key) -> str:
        """The parts of a plan that take at least 5% of its memory in key (host or device)."""
        return ", ".join(f"{k} {size(v)}" for k, v in need["parts"].items()
                         if need["where"][k] == key and v >= 0.05 * need[key])

    def _hint(self, where) -> str:
        """What would make a memory that does not fit smaller."""
        if self.attention != "infllm":
            return ""
        if where == "host" and self.cfg.unit_dtype != "fp8":
            return ("set --infllm unit_dtype=fp8 (half the units' bytes) or " if self.engine == "fast" else
                    "use --engine fast with --infllm unit_dtype=fp8 (half the units' bytes) or ")
        if where == "GPU":
            return ("set --infllm unit_storage=host (units in host memory) or " if self.units_on_gpu
                    else "lower --infllm max_cached_block or ")
        return ""


# ----------------------------------------------------------------------------- snapshots of the memory

# /2: the engine's caches hold their recent tokens in position order, not whole ring buffers (a snapshot grows
# with the document); a /1 file is refused with a sentence that says so.
SNAPSHOT_FORMAT = "infllm-memory/2"
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                       torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


class SnapshotError(ValueError):
    """A memory snapshot that cannot be used here; the message is one sentence."""


def save_memory(path, caches, header: dict, extra=None):
    """Write every layer's cache (its snapshot()) to path as safetensors, with header (strings) as its
    metadata and the tensors of extra under their own names (the Reader's last_logits). The file is written
    tensor by tensor, never whole in memory (a million tokens of a 7B model make 64 GiB of units), by
    write_file: a failure part-way leaves no partial file and any earlier snapshot at path as it was."""
    path = Path(path)
    tensors = {f"layer.{i}.{name}": t for i, c in enumerate(caches) for name, t in c.snapshot().items()}
    tensors |= extra or {}
    meta = {"format": SNAPSHOT_FORMAT, **{k: str(v) for k, v in header.items()}}
    index, offset = {"__metadata__": meta}, 0
    for name, t in tensors.items():
        n_bytes = t.numel() * t.element_size()
        index[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                       "data_offsets": [offset, offset + n_bytes]}
        offset += n_bytes
    head = json.dumps(index).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned

    def write(f):
        f.write(len(head).to_bytes(8, "little") + head)
        for t in tensors.values():  # the bytes of each tensor, through a view: no copy on the host
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)

    write_file(path, "memory snapshot", write, SnapshotError)
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
    made = meta.get("format", "")
    if made.startswith("infllm-memory/") and made != SNAPSHOT_FORMAT:
        raise SnapshotError(f"memory snapshot {path} has format {made!r}, of another version of this program; this "
                            f"one reads {SNAPSHOT_FORMAT!r}: read the document again and save it anew")
    if made != SNAPSHOT_FORMAT:
        raise SnapshotError(f"{path} is not a memory snapshot of this program (no '{SNAPSHOT_FORMAT}' header)")
    return meta


def load_memory(path, caches, expect: dict, progress=None) -> dict:
    """Restore every layer's cache from a snapshot written by save_memory, after checking that each
    entry of expect matches the file's header: a snapshot of another checkpoint, dtype, attention or
    settings would be read as nonsense. Returns the header. The file is only read. progress(n_layers), once
    the header passed: a bar (tqdm) that advances by one per layer, or None."""
    from safetensors import safe_open
    meta = read_snapshot_header(path)
    for key, want in expect.items():
        if meta.get(key) != str(want):
            raise SnapshotError(f"memory snapshot {path} was made with {key} {meta.get(key)!r}, "
                                f"this run has {str(want)!r}")
    bar = progress(len(caches)) if progress is not None else None
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            for i, c in enumerate(caches):
                prefix = f"layer.{i}."
                state = {n.removeprefix(prefix): f.get_tensor(n) for n in names if n.startswith(prefix)}
                try:
                    c.restore(state)
                except (ValueError, KeyError, RuntimeError) as e:
                    raise SnapshotError(f"memory snapshot {path} does not fit layer {i} ({e})") from None
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.refresh()  # drawn at its end, however soon the last layer came
    finally:
        if bar is not None:
            bar.close()
    return meta


def read_extra(path, name, device="cpu"):
    """A tensor save_memory wrote from its extra, on device; None if the snapshot has none of that name."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name).to(device) if name in f.keys() else None
