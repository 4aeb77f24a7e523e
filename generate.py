"""Read a long prompt with InfLLM's context memory (or a baseline) and answer it.

    python generate.py --ckpt DIR --prompt-file long.txt [--chat] [--attention infllm|stream|full]
    python generate.py --ckpt DIR --prompt-file doc.txt --save-memory doc.mem --max-new-tokens 0
    python generate.py --ckpt DIR --load-memory doc.mem --prompt-file question.txt
    python generate.py --ckpt DIR --prompt-file doc.txt --interactive    (questions from stdin)
    python generate.py --ckpt DIR --prompt-file long.txt --engine reference   (infllm.py's plain PyTorch)
    torchrun --nproc-per-node N generate.py --ckpt DIR --prompt-file long.txt  (tensor parallel: tp.py)

Text streams to stdout; figures (prompt tokens, prefill and decode speed, peak memory) go to stderr,
or everything as one JSON object with --json. The work is reader.Reader's (in Python, use it directly);
this file is its command line.
"""
import time

STARTED = time.time()  # the process's start, near enough: before torch is imported

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from model import CheckpointError
from infllm import memory_stats
from reader import (ENGINES, GiB, Reader, SnapshotError, UsageError, WriteInterrupted, check_output_path,
                    check_sampling, peak_rss_gib, read_snapshot_header)
from tokenizer import TokenizerError
from tp import join_processes, leave_processes


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
    if not text.strip() and not args.load_memory:  # after a document, an empty question continues it
        raise UsageError("the prompt is empty")
    return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="Hugging Face style checkpoint folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (with --load-memory: the question; empty: the model "
                     "continues the document)")
    src.add_argument("--prompt-file", help="file holding the prompt (UTF-8)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--attention", choices=["infllm", "stream", "full"], default="infllm")
    p.add_argument("--engine", choices=ENGINES, default=None,
                   help="reference: infllm.py in plain PyTorch, the code to read; fast: engine/, the same results "
                        "faster (CUDA graphs, Triton kernels; needed for --compile, unit_dtype=fp8 and, on a GPU, "
                        "unit_storage=device). Default: fast on a GPU, reference on a CPU")
    p.add_argument("--infllm", default="", metavar="KEY=VALUE,...",
                   help="InfLLM settings, e.g. n_local=4096,topk=16,unit_dtype=fp8 (defaults: the authors' Mistral config)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the layers and the piece step, with --engine fast (default: no; docs/benchmarks.md says when it pays)")
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


def check_args(args, world=1):
    """Everything the command line alone can get wrong, before the prompt is read or the model loads."""
    check_sampling(args.temperature, args.top_k, names=("--temperature", "--top-k"))
    if args.save_memory:  # refused now, not after a prefill of minutes
        check_output_path(args.save_memory, "--save-memory")
    if world > 1 and (args.save_memory or args.load_memory or args.interactive):
        raise UsageError("--save-memory, --load-memory and --interactive do not run tensor parallel yet: use one process")
    if args.max_new_tokens < 0 or (args.max_new_tokens == 0 and not args.save_memory):
        raise UsageError("--max-new-tokens must be at least 1 (0 only with --save-memory: read and save)")
    if args.save_memory and args.load_memory:
        raise UsageError("--save-memory and --load-memory go to separate runs: save a document, then load it to ask")
    if args.save_memory and args.interactive:
        raise UsageError("--save-memory and --interactive go to separate runs: save a document, then load it with --interactive")
    if args.load_memory:
        read_snapshot_header(args.load_memory)  # a missing file or none of ours, told before the model loads


def check_prompt(args, text):
    if text is None and not (args.load_memory and args.interactive):
        raise UsageError("give a prompt (--prompt or --prompt-file); only --load-memory with --interactive needs none")
    if text is not None and args.load_memory and args.interactive:
        raise UsageError("with --load-memory and --interactive the questions come from stdin: drop the prompt")


def figures(r: Reader, text: str) -> dict:
    f = r.figures
    cuda = r.device.type == "cuda"
    # A prefill speed means something only over a prompt of at least one chunk: a shorter one (a question
    # after a document, say) is one forward whose time is mostly fixed costs, and its tokens per second would
    # compare with nothing. None then, as the first token's time where no token came.
    speed = f["prompt_tokens"] >= r.cfg.chunk_size and f["prefill_s"] > 0
    return {
        "text": text,
        "prompt_tokens": f["prompt_tokens"],
        "memory_tokens": r.tokens,
        "new_tokens": f.get("new_tokens", 0),
        "engine": r.engine,
        "compiled": r.compiled,
        # From the process's start, compilation and loading included: what a user waits for.
        "first_token_s": round(f["first_token_at"] - STARTED, 3) if f.get("new_tokens") else None,
        "wall_s": round(time.time() - STARTED, 3),
        "prefill_s": round(f["prefill_s"], 4),
        "prefill_tok_s": round(f["prompt_tokens"] / f["prefill_s"], 2) if speed else None,
        # Parts of prefill_s that a later prompt of the same size does not pay (or pays less of): reserving the
        # unit storage, and the forwards run for the first time and captured (compilation included; None
        # without CUDA graphs).
        "reserve_s": round(f["reserve_s"], 4),
        "warmup_s": round(f["warmup_s"], 4) if f["warmup_s"] is not None else None,
        "decode_tok_s": round(f["decode_tok_s"], 2) if f.get("decode_tok_s") else None,
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / GiB, 3) if cuda else None,
        "peak_rss_gib": round(peak_rss_gib(), 3),
        "unit_cache_hit_rate": memory_stats(r.caches)["hit_rate"],
        "units_on_gpu": r.units_on_gpu if r.attention == "infllm" and cuda else None,  # where unit_storage put them
    } | ({"answer_s": round(f["answer_s"], 3)} if "answer_s" in f else {})


def report(args, result):
    if args.json:
        print(json.dumps(result), flush=True)
        return
    r = result
    speed = [f"{r['prefill_tok_s']:.0f} tok/s"] if r["prefill_tok_s"] is not None else []
    if r["warmup_s"]:
        speed.append(f"storage {r['reserve_s']:.2f} s, first runs and captures {r['warmup_s']:.2f} s")
    print(f"[{r['prompt_tokens']} prompt tokens ({r['memory_tokens']} in memory), "
          + (f"first token after {r['first_token_s']:.1f} s, " if r["first_token_s"] is not None else "")
          + f"whole run {r['wall_s']:.1f} s{' (compiled)' if r['compiled'] else ''}; "
          f"prefill {r['prefill_s']:.2f} s" + (f" ({'; '.join(speed)})" if speed else "")
          + f", {r['new_tokens']} new tokens at {r['decode_tok_s'] or 0:.1f} tok/s, peak RSS {r['peak_rss_gib']:.2f} GiB"
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
    check_args(args, world)
    text = read_prompt(args)
    check_prompt(args, text)
    budget = {k: None if v is None else int(v * GiB) for k, v in (("host", args.host_memory), ("gpu", args.gpu_memory))}
    r = Reader(args.ckpt, device or args.device, args.dtype, args.attention, args.infllm, args.chat, args.compile,
               args.compile_cache, progress=not (args.no_progress or args.json or rank), host_memory=budget["host"],
               gpu_memory=budget["gpu"], rank=rank, world=world, engine=args.engine)
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
    except WriteInterrupted as e:  # Ctrl-C while the snapshot was written: say what became of the file
        sys.stderr.write(f"error: {e}\n")
        sys.stderr.flush()
        return 130  # the shell's status for a process ended by Ctrl-C
    finally:
        leave_processes()
    return 0


if __name__ == "__main__":
    code = main()
    # Everything is written and flushed; what the interpreter would still do (free every module, the CUDA
    # context, gigabytes of page-locked unit storage) takes a noticeable part of a short run and helps no one
    # (docs/benchmarks.md: "generate.py skips the interpreter's teardown").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
