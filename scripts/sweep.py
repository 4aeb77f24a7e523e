"""What the retrieval sweeps (passkey.py, niah.py) share: the command line's lengths, depths and attention modes,
prompts assembled from pre-tokenized parts, the model loaded once with one set of caches per mode, greedy answers,
JSON lines a sweep resumes from, and the markdown tables and heat maps of the results."""
import argparse
import contextlib
import datetime
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import engine.storage  # noqa: E402
from infllm import InfLLMConfig, memory_stats  # noqa: E402
from model import DTYPES, CheckpointError  # noqa: E402
from reader import (ENGINES, UsageError, WriteInterrupted, caches_and_forward, chat_turn,  # noqa: E402
                    check_engine, check_output_path, decode, default_engine, free_gpu_memory, gpu_matmuls, load,
                    pick_device, prefill, prepare, use_compile_cache, write_file)
from tokenizer import TokenizerError  # noqa: E402
from tp import join_processes, leave_processes  # noqa: E402

MODES = ("infllm", "stream", "full")


class MissingDependency(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------ the command line


def parse_length(s: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", s)
    if not m or int(m[1]) == 0:
        raise UsageError(f"bad length {s.strip()!r} (use a number of tokens like 3000, 4K or 1M; K = 1024)")
    return int(m[1]) * {"": 1, "k": 1024, "m": 1024 ** 2}[m[2].lower()]


def parse_lengths(s: str) -> list[int]:
    lengths = sorted({parse_length(x) for x in s.split(",") if x.strip()})
    if not lengths:
        raise UsageError("no lengths given")
    return lengths


def length_label(n: int) -> str:
    return f"{n // 1024 ** 2}M" if n % 1024 ** 2 == 0 else f"{n // 1024}K" if n % 1024 == 0 else str(n)


def parse_depths(s: str) -> list[float]:
    out = []
    for d in filter(None, (x.strip() for x in s.split(","))):
        try:
            v = float(d)
        except ValueError:
            raise UsageError(f"bad depth {d!r} (use numbers between 0 and 1)") from None
        if not 0 <= v <= 1:
            raise UsageError(f"depth {d} is outside [0, 1]")
        out.append(v)
    if not out:
        raise UsageError("no depths given")
    return out


def parse_choices(s: str, known, what: str) -> list[str]:
    """'a,b' -> ['a', 'b'], each one of `known`: the attention modes, niah's tasks and haystacks."""
    out = [x.strip() for x in s.split(",") if x.strip()]
    for x in out:
        if x not in known:
            raise UsageError(f"unknown {what} {x!r} (use {', '.join(known)})")
    if not out:
        raise UsageError(f"no {what}s given")
    return out


def parse_modes(s: str) -> list[str]:
    return parse_choices(s, MODES, "attention mode")


def add_common_args(p: argparse.ArgumentParser):
    """The options both sweeps take, after each script's own --lengths and --depths."""
    p.add_argument("--attention", default="infllm,stream,full", help="modes among infllm, stream, full")
    p.add_argument("--infllm", default="", metavar="KEY=VALUE,...", help="InfLLM (and stream) settings")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--seed", type=int, default=0, help="seed of the keys")
    p.add_argument("--engine", choices=ENGINES, default=None,
                   help="as generate.py --engine: the reference (infllm.py) or the engine (default: fast on a GPU, "
                        "reference on a CPU)")
    p.add_argument("--compile", action="store_true",
                   help="as generate.py --compile (--engine fast): compiled layers and piece steps (the first trial "
                        "pays the compilation)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    p.add_argument("--full-max-length", default="16K", help="skip full attention above this length (quadratic)")
    p.add_argument("--out", default=None, help="JSON lines file, one line per trial")
    p.add_argument("--resume", action="store_true", help="skip the trials already in --out (else --out is rewritten)")
    p.add_argument("--plot", default=None, help="heat map image per attention mode (needs matplotlib)")
    p.add_argument("--table", default=None, help="markdown file for the table, with the command line and date")


def check_common(args):
    """What add_common_args's options can get wrong (and --lengths, --depths), before the model loads."""
    args.lengths = parse_lengths(args.lengths)
    args.depths = parse_depths(args.depths)
    args.modes = parse_modes(args.attention)
    args.full_max = parse_length(args.full_max_length)


def check_setup(args):
    """The settings, the device, the files: checked after each script's own options, before the model loads."""
    args.cfg = InfLLMConfig.parse(args.infllm)
    args.device_ = pick_device(args.device)
    args.engine = args.engine or default_engine(args.device_)
    check_engine(args.engine, args.compile)
    args.dtype_name = args.dtype or ("bf16" if args.device_.type == "cuda" else "fp32")
    if args.resume and not args.out:
        raise UsageError("--resume needs --out")
    if not Path(args.ckpt).is_dir():
        raise UsageError(f"checkpoint folder {args.ckpt} does not exist")
    for option in ("out", "table", "plot"):  # written after the sweep's hours: refused now if they cannot be
        if getattr(args, option):
            check_output_path(getattr(args, option), f"--{option}")
    if args.plot:
        try:
            import matplotlib.figure
        except ImportError:
            raise MissingDependency("--plot needs matplotlib, which is not installed (pip install matplotlib)") from None
        known = matplotlib.figure.Figure().canvas.get_supported_filetypes()
        if plot_format(args.plot) not in known:
            raise UsageError(f"--plot {args.plot}: matplotlib writes no .{plot_format(args.plot)} pictures "
                             f"(use one of .{', .'.join(sorted(known))})")


def plot_format(path) -> str:
    """The picture format a plot's file name asks for: its suffix, png without one."""
    return Path(path).suffix.removeprefix(".").lower() or "png"


def settings_of(args, mode, max_new_tokens) -> dict:
    """What makes two trials of one prompt comparable: a resumed sweep reruns a trial whose settings changed."""
    s = {"ckpt": Path(args.ckpt).name, "dtype": args.dtype_name, "chat": args.chat, "seed": args.seed,
         "max_new_tokens": max_new_tokens}
    if mode != "full":
        s["infllm"] = vars(args.cfg) if mode == "infllm" else {"n_init": args.cfg.n_init, "n_local": args.cfg.n_local,
                                                               "chunk_size": args.cfg.chunk_size}
    else:
        s["chunk_size"] = args.cfg.chunk_size
    if args.compile:  # the same arithmetic up to rounding, but told apart (a resumed sweep does not mix them)
        s["compile"] = True
    if args.engine == "reference":  # likewise; a record without the key is the engine's (it came first)
        s["engine"] = "reference"
    return s


def run_cli(argv, parse_args, check_args, sweep, report) -> int:
    """Both scripts' main: check the command line, sweep (each trial appended to --out as it ends), report.
    Errors the user can cause are one sentence on stderr and exit status 2, never a traceback."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        # Under torchrun, tensor parallel: every process runs every trial on its share of the model, and
        # only process 0 prints and writes files.
        args.rank_, args.world_, device = join_processes(args.device)
        check_args(args)
        args.device_ = device or args.device_
        records = read_records(args.out) if args.resume and Path(args.out).is_file() else []
        # --out is a log, not a file written at the end: each trial is appended as it ends, so that a killed
        # sweep keeps its finished trials for --resume (a line cut short is skipped when read). It is opened
        # with the first trial: a sweep refused before any ran leaves an earlier file as it was.
        out = []

        def write(rec):
            if not args.out or args.rank_ != 0:
                return
            if not out:
                cut = args.resume and cut_short(args.out)
                out.append(open(args.out, "a" if args.resume else "w"))
                if cut:
                    out[0].write("\n")  # the next record starts a line of its own
            out[0].write(json.dumps(rec) + "\n")
            out[0].flush()

        try:
            with quiet(args.rank_ > 0):
                sweep(args, records, write)
        finally:
            if out:
                out[0].close()
        if args.rank_ == 0:
            report(args, records, argv)  # the table and the plot: written whole or not at all (write_file)
    except (UsageError, CheckpointError, TokenizerError, ValueError) as e:
        sys.stderr.write(f"error: {e}\n")  # every process says it, in one write
        return 2
    except MissingDependency as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    except WriteInterrupted as e:  # Ctrl-C while the table or the plot was written
        sys.stderr.write(f"error: {e}\n")
        return 130
    finally:
        leave_processes()
    return 0


def quiet(yes: bool):
    """Progress lines of processes other than 0 go nowhere."""
    if not yes:
        return contextlib.nullcontext()
    sink = open(os.devnull, "w")
    stack = contextlib.ExitStack()
    stack.enter_context(sink)
    stack.enter_context(contextlib.redirect_stdout(sink))
    stack.enter_context(contextlib.redirect_stderr(sink))
    return stack


def cut_short(path) -> bool:
    """Whether a file's last line lacks its newline: a sweep killed while it wrote a record."""
    if not Path(path).is_file() or Path(path).stat().st_size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def read_records(path) -> list[dict]:
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut short by an interrupted run: that trial runs again
    return out


# ------------------------------------------------------------------------------------------ prompts by ids


def encode_after(tok, ctx: str, text: str, bos=False) -> list[int]:
    """The ids of `text` where it follows `ctx`: encode both, cut off the context's ids. A prompt assembled from
    such parts has the ids of its whole text wherever a part starts a new token (checked by the callers), and
    sentencepiece's dummy prefix lands on the context, not on the part."""
    ctx_ids, ids = tok.encode(ctx, bos=bos), tok.encode(ctx + text, bos=bos)
    if ids[:len(ctx_ids)] != ctx_ids:
        raise TokenizerError("this tokenizer merges across the prompt's parts; cannot assemble it by ids.")
    return ids[len(ctx_ids):]


chat_wrap = chat_turn  # the chat template's text before and after a user's message, for --chat


# ------------------------------------------------------------------------------------------ running a trial


def mode_runner(model, mode, cfg, device, which, compile_, longest, max_new_tokens):
    """The caches and forward of one mode, kept for the whole sweep (--compile, or a GPU): the caches are
    reset between trials and sized once for the longest prompt, so the compiled steps and the engine's CUDA
    graphs serve every trial of every length."""
    caches, forward = caches_and_forward(model, mode, cfg, which, compile_)
    if device.type == "cuda" and which == "fast":  # unit_storage=auto: the units in GPU memory where they fit
        engine.storage.place_units(caches, model.args, cfg, longest + max_new_tokens, free_gpu_memory(device))
    for c in caches:
        c.reserve(longest + max_new_tokens)
    return caches, forward


@torch.no_grad()
def answer(model, tok, ids, mode, cfg, device, runner=None, max_new_tokens=10, which=None) -> dict:
    """Prefill the prompt, decode greedily: the answer's text, the seconds both took, InfLLM's unit cache hit rate.
    Without a runner, fresh caches of the engine `which` (default: the device's)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    if runner is None:
        caches, forward = caches_and_forward(model, mode, cfg, which or default_engine(device))
    else:
        caches, forward = runner
        for c in caches:
            c.reset()
    logits = prefill(model, caches, ids, cfg.chunk_size, forward=forward, room=max_new_tokens)
    new = decode(model, caches, logits, max_new_tokens, stop_ids=set(tok.eos_ids), forward=forward)
    sync()
    return {"answer": tok.decode(new), "seconds": round(time.perf_counter() - t0, 3),
            "hit_rate": memory_stats(caches)["hit_rate"]}


class Runner:
    """The model, loaded when the first trial needs it (a resumed sweep may have none left to run), and with
    --compile or on a GPU one set of caches per attention mode for the whole sweep."""

    def __init__(self, args, max_new_tokens):
        self.args, self.max_new_tokens = args, max_new_tokens
        self.model = self.tok = self.wrap = None
        self.runners = {}

    def load(self):
        a = self.args
        if self.model is None:
            if a.device_.type == "cuda":
                use_compile_cache()
                gpu_matmuls(DTYPES[a.dtype_name])
            self.model, self.tok = load(a.ckpt, a.device_, DTYPES[a.dtype_name], getattr(a, "rank_", 0), getattr(a, "world_", 1))
            prepare(self.model, a.engine, a.compile)
            self.wrap = chat_wrap(a.ckpt, self.tok) if a.chat else ("", "")
        return self.model, self.tok, self.wrap

    def answer(self, ids, mode) -> dict:
        a = self.args
        model, tok, _ = self.load()
        if (a.compile or (a.device_.type == "cuda" and mode != "full")) and mode not in self.runners:
            self.runners[mode] = mode_runner(model, mode, a.cfg, a.device_, a.engine, a.compile, max(a.lengths),
                                             self.max_new_tokens)
        return answer(model, tok, ids, mode, a.cfg, a.device_, self.runners.get(mode), self.max_new_tokens, a.engine)


# ------------------------------------------------------------------------------------------ reporting


def tokens_label(length: int, records) -> str:
    """'4K (4073 tok)', or the range of prompt lengths the records of that target length had."""
    toks = {r["prompt_tokens"] for r in records if r["length_target"] == length and r.get("prompt_tokens")}
    return length_label(length) + (f" ({min(toks)}-{max(toks)} tok)" if len(toks) > 1 else
                                   f" ({min(toks)} tok)" if toks else "")


def write_markdown(path, title, script, argv, note, table):
    cmd = f"python scripts/{script} " + " ".join(shlex.quote(a) for a in argv)
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    text = f"# {title}\n\n`{cmd}`\n\n{date}, {note}\n\n" + table
    write_file(path, "--table", lambda f: f.write(text.encode()))


def heatmaps(panels, path, xlabel, ylabel, height=3.8):
    """One heat map of accuracies in [0, 1] per panel (title, {(row, column): value}, rows, columns), side by side;
    grey where a cell has no value (skipped or not run)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n_cols = max(len(cols) for _, _, _, cols in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(1.2 + 0.9 * n_cols * len(panels), height), squeeze=False)
    for ax, (title, values, rows, cols) in zip(axes[0], panels):
        acc = np.full((len(rows), len(cols)), np.nan)
        for i, r in enumerate(rows):
            for j, c in enumerate(cols):
                if (r, c) in values:
                    acc[i, j] = values[r, c]
        cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="lightgrey")
        im = ax.imshow(acc, cmap=cmap, vmin=0, vmax=1, aspect="auto")
        for (i, j), v in np.ndenumerate(acc):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(cols)), [length_label(c) if isinstance(c, int) else str(c) for c in cols])
        ax.set_yticks(range(len(rows)), [f"{r:g}" if isinstance(r, float) else str(r) for r in rows])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
    fig.colorbar(im, ax=axes[0].tolist(), label="accuracy")
    # into a file object: the temporary name's suffix (.partial) would not tell matplotlib the format
    write_file(path, "--plot", lambda f: fig.savefig(f, format=plot_format(path), dpi=150, bbox_inches="tight"))
    plt.close(fig)
