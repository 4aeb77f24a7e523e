"""Read a long prompt with InfLLM's context memory (or a baseline) and answer it.

    python generate.py --ckpt DIR --prompt-file long.txt [--chat] [--attention infllm|stream|full]

Text streams to stdout; figures (prompt tokens, prefill and decode speed, peak memory) go to stderr,
or everything as one JSON object with --json.
"""
import time

STARTED = time.time()  # the process's start, near enough: before torch is imported

import argparse
import json
import os
import resource
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from infllm import ContextMemory, InfLLMConfig, make_caches, memory_stats
from model import DTYPES, CheckpointError, load_model
from tokenizer import TokenizerError, chat_prompt, load_tokenizer


class UsageError(ValueError):
    """Bad input from the command line; the message is one sentence."""


def load(ckpt, device="cpu", dtype=torch.float32):
    """Model and tokenizer from a Hugging Face style checkpoint folder."""
    return load_model(ckpt, device=device, dtype=dtype), load_tokenizer(ckpt)


class FixedShapes:
    """model(tokens, caches) as forwards of two lengths only: a piece of exc_block_size tokens (the last
    one of a prompt padded) and one token (the prompt's last token, decoding). With InfLLM's caches
    nothing else a forward does depends on the prompt, so with graphs (on a GPU) each kind runs as usual
    the first time it comes (torch.compile's warm-up, if any) and is captured in a CUDA graph right after;
    from then on it is replayed: one launch for the whole model, no Python per layer, the lookup and the
    cache update included. Two captures serve every prompt of any length; only a prompt longer than the
    unit storage was reserved for moves the storage and re-captures.

    A prefill chunk thus runs piece by piece through all layers, where the reference runs each layer over
    the whole chunk before the next: the same arithmetic in another order (a layer's piece depends only
    on the layer below for the same and earlier pieces, and on its own cache of earlier pieces), so the
    outputs are the same; only the linear layers see 512 rows at a time instead of 8192. A graph of one
    piece is captured in a sixteenth of the time a chunk's takes, which a user waits for on every run."""

    def __init__(self, model, caches, graphs=True):
        if not all(isinstance(c, ContextMemory) for c in caches):
            raise UsageError("CUDA graphs need the InfLLM or stream caches (full attention grows its cache)")
        self.model, self.caches, self.use_graphs = model, caches, graphs
        self.piece = caches[0].cfg.exc_block_size
        self.graphs, self.version, self.captures = {}, None, 0
        self.pool = torch.cuda.graph_pool_handle() if graphs else None

    def __call__(self, tokens, last_only=False):
        T, s, outs = tokens.shape[1], 0, []
        while s < T:
            L = 1 if T - s == 1 else self.piece
            n = min(L, T - s)
            out = self._run(tokens[:, s:s + n], L, last_only)
            outs.append(out if last_only else out[:, :n].clone())  # a replay overwrites its output
            s += n
        return outs[-1] if last_only else torch.cat(outs, dim=1)

    def _run(self, tokens, L, last_only):
        """One forward of L tokens, the first n of them real."""
        n = tokens.shape[1]
        for c in self.caches:
            c.reserve(c.pos + n)
        key = (L, last_only)
        version = tuple(c.units.version for c in self.caches if c.use_units)
        if version != self.version:  # storage moved: the graphs point at the old buffers
            self.graphs, self.version = {}, version
            self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None  # dies with its last graph
        if key in self.graphs:
            graph, static_in, static_n, static_out = self.graphs[key]
            static_in[:, :n].copy_(tokens)
            static_n.fill_(n)
            graph.replay()
            out = static_out
        else:
            static_in = F.pad(tokens, (0, L - n))
            static_n = torch.full((), n, dtype=torch.long, device=tokens.device)
            out = self.model(static_in, self.caches, last_only=last_only, n_valid=static_n)
            if self.use_graphs:  # recording runs no kernel: the device state stays that of the run above
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    static_out = self.model(static_in, self.caches, last_only=last_only, n_valid=static_n)
                self.graphs[key] = (graph, static_in, static_n, static_out)
                self.captures += 1
        for c in self.caches:
            c.pos += n
        return out


# Not by default: on an H200 (docs/benchmarks.md, 2026-11-27) a fresh process answered SmolLM2 prompts of
# 32K and 128K as fast or faster without compiling (eager kernels replayed from CUDA graphs), and compiling
# with an empty cache cost 2 minutes more. --compile pays off from a few hundred K tokens on a machine
# that keeps its compile cache (960K: 53 s against 117 s).
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
    Eager: one memory-efficient attention call on a GPU, the blocked kernel on a CPU."""
    gpu = torch.device(device).type == "cuda"
    if not compile_:
        return "fused" if gpu else "blocked"
    return "flex" if gpu and attention == "infllm" else "compiled"


def forward_fn(model, caches, graphs=False):
    """The model's forward over caches: plain, or in fixed shapes replayed from CUDA graphs."""
    if graphs:
        return FixedShapes(model, caches)
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
    """Generate up to max_new_tokens from the logits that follow the prompt, one token at a time."""
    forward = forward or forward_fn(model, caches)
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


def read_prompt(args) -> str:
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
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="file holding the prompt (UTF-8)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--attention", choices=["infllm", "stream", "full"], default="infllm")
    p.add_argument("--infllm", default="", metavar="KEY=VALUE,...",
                   help="InfLLM settings, e.g. n_local=4096,topk=16 (defaults: the authors' Mistral config)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the layers and the piece step (default: no; worth it for prompts of several hundred K tokens once the compile cache is warm)")
    p.add_argument("--compile-cache", metavar="DIR", default=None,
                   help="where compiled programs are kept between runs (default: $INFLLM_COMPILE_CACHE or ~/.cache/infllm/compile)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def run(args) -> dict:
    device = pick_device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    cfg = InfLLMConfig.parse(args.infllm)
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    text = read_prompt(args)
    if not Path(args.ckpt).is_dir():
        raise UsageError(f"checkpoint folder {args.ckpt} does not exist")
    compile_ = args.compile if args.compile is not None else device.type == "cuda" and COMPILE_ON_GPU
    if compile_ or device.type == "cuda":  # the eager GPU path has Triton kernels of its own to keep
        use_compile_cache(args.compile_cache)
    if device.type == "cuda":
        gpu_matmuls(dtype)
    model, tok = load(args.ckpt, device, dtype)
    if compile_:
        model.compile_blocks()
    if args.chat:
        text = chat_prompt(args.ckpt, tok, text)
    ids = tok.encode(text, bos=True)
    if args.attention == "full" and len(ids) > model.args.max_seq_len:
        print(f"warning: the prompt has {len(ids)} tokens, more than the {model.args.max_seq_len} this model was "
              "trained on; full attention will likely fail past that (try --attention infllm)", file=sys.stderr)

    progress = None
    if not args.no_progress and not args.json:
        from tqdm import tqdm
        progress = tqdm(total=len(ids), desc="prefill", unit="tok", file=sys.stderr, leave=False)
    caches = make_caches(model, args.attention, cfg, kernel=fast_kernel(device, args.attention, compile_))
    # On a GPU the model's forwards are replayed from CUDA graphs, compiled or not (not for full attention:
    # its cache grows).
    forward = forward_fn(model, caches, graphs=device.type == "cuda" and args.attention != "full")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    logits = prefill(model, caches, ids, cfg.chunk_size, progress, forward, room=args.max_new_tokens)
    sync()
    t1 = time.perf_counter()
    first_token_at = time.time() - STARTED
    if progress is not None:
        progress.close()

    shown = [""]

    def stream(out_ids):  # print what the new tokens add to the decoded text
        text_now = tok.decode(out_ids)
        if not args.json and not text_now.endswith("\ufffd"):  # wait for a whole UTF-8 character
            sys.stdout.write(text_now[len(shown[0]):])
            sys.stdout.flush()
            shown[0] = text_now

    new = decode(model, caches, logits, args.max_new_tokens, set(tok.eos_ids), args.temperature,
                 args.top_k, args.seed, on_token=stream, forward=forward)
    sync()
    t2 = time.perf_counter()
    answer = tok.decode(new)
    if not args.json:
        sys.stdout.write(answer[len(shown[0]):] + "\n")
        sys.stdout.flush()
    stats = memory_stats(caches)
    return {
        "text": answer,
        "prompt_tokens": len(ids),
        "new_tokens": len(new),
        "compiled": compile_,
        # From the process's start, compilation and loading included: what a user waits for.
        "first_token_s": round(first_token_at, 3),
        "wall_s": round(time.time() - STARTED, 3),
        "prefill_s": round(t1 - t0, 4),
        "prefill_tok_s": round(len(ids) / (t1 - t0), 2),
        # The first new token comes from the prefill's logits; each later one costs a decoding step.
        "decode_tok_s": round((len(new) - 1) / (t2 - t1), 2) if len(new) > 1 else None,
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if device.type == "cuda" else None,
        "peak_rss_gib": round(peak_rss_gib(), 3),
        "unit_cache_hit_rate": stats["hit_rate"],
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except (UsageError, CheckpointError, TokenizerError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        r = result
        print(f"[{r['prompt_tokens']} prompt tokens, first token after {r['first_token_s']:.1f} s, "
              f"whole run {r['wall_s']:.1f} s{' (compiled)' if r['compiled'] else ''}; "
              f"prefill {r['prefill_s']:.2f} s ({r['prefill_tok_s']:.0f} tok/s), "
              f"{r['new_tokens']} new tokens at {r['decode_tok_s'] or 0:.1f} tok/s, peak RSS {r['peak_rss_gib']:.2f} GiB"
              + (f", peak GPU {r['peak_gpu_gib']:.2f} GiB" if r["peak_gpu_gib"] is not None else "")
              + (f", unit cache hit rate {r['unit_cache_hit_rate']:.1%}" if r["unit_cache_hit_rate"] is not None else "")
              + "]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
