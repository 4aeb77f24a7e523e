"""Passkey retrieval: hide a 5-digit key at some depth of a long haystack and ask for it back.

    python scripts/passkey.py --ckpt DIR --lengths 4K,8K,16K,32K --depths 0,0.25,0.5,0.75,1 --trials 3 \
        --attention infllm,stream,full [--device cpu|cuda] [--dtype bf16|fp16|fp32] [--infllm key=val,...] \
        [--seed 0] [--chat] [--full-max-length 16K] [--out results.jsonl] [--resume] [--plot passkey.png] \
        [--table docs/passkey.md] [--depths-stream 0.1,0.5,0.9]

The prompt is the classic one measured in ../shared/TEST_MODEL.md. Lengths are in tokens of the checkpoint's
tokenizer ("K" = 1024, "M" = 1024K); each prompt is as long as possible without passing its target.
Progress goes to stderr, the table (found/trials per depth) to stdout.
"""
import argparse
import datetime
import json
import random
import re
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from generate import (UsageError, decode, fast_kernel, forward_fn, gpu_matmuls, load, pick_device, prefill,  # noqa: E402
                      use_compile_cache)
from infllm import InfLLMConfig, make_caches, memory_stats  # noqa: E402
from model import DTYPES, CheckpointError  # noqa: E402
from tokenizer import TokenizerError, chat_prompt  # noqa: E402

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEY = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"
MODES = ("infllm", "stream", "full")
MAX_NEW_TOKENS = 10  # found = the key among the first 10 new tokens


# ------------------------------------------------------------------------------------------ the prompt


def prompt_text(n_before: int, n_after: int, key, wrap=("", "")) -> str:
    """The haystack as text: n_before filler groups, the key sentence, n_after groups, the question."""
    return wrap[0] + INSTRUCTION + FILLER * n_before + KEY.format(key=key) + FILLER * n_after + QUESTION + wrap[1]


class Pieces:
    """Token ids of the prompt's parts, so that a prompt of any length is assembled without re-tokenizing.

    Every part but the first after the instruction is cut as ' ' + sentence (the space moves from the end
    of a part to the start of the next): byte-level BPE splits words before their leading space, so these
    cuts are token boundaries and the ids of the parts add up to the ids of the whole text. Each part is
    encoded after a fixed context and the context's ids are cut off, which also suits sentencepiece's
    dummy prefix. `check` compares a small assembled prompt, with every kind of boundary, with encoding it."""

    def __init__(self, tok, wrap=("", "")):
        self.tok, self.wrap = tok, wrap
        self.head = tok.encode(wrap[0] + INSTRUCTION, bos=True)
        ref = "Here we go."  # a context that ends like every part does

        def after(ctx, text, bos=False):
            ctx_ids, ids = tok.encode(ctx, bos=bos), tok.encode(ctx + text, bos=bos)
            if ids[:len(ctx_ids)] != ctx_ids:
                raise TokenizerError("this tokenizer merges across the passkey prompt's parts; cannot assemble it by ids.")
            return ids[len(ctx_ids):]

        first = lambda s: after(wrap[0] + INSTRUCTION, s.rstrip(" "), bos=True)  # noqa: E731
        later = lambda s: after(ref, " " + s.rstrip(" "))  # noqa: E731
        self.filler0, self.filler = first(FILLER), later(FILLER)
        self._key0, self._key = (lambda k: first(KEY.format(key=k))), (lambda k: later(KEY.format(key=k)))
        self.question = after(ref, " " + QUESTION + wrap[1])
        self.check()

    def ids(self, n_before: int, n_after: int, key) -> list[int]:
        if n_before:
            body = self.filler0 + self.filler * (n_before - 1) + self._key(key)
        else:
            body = self._key0(key)
        return self.head + body + self.filler * n_after + self.question

    def length(self, n: int, depth: float, key) -> int:
        a = round(depth * n)
        return len(self.head) + len(self.question) + n * len(self.filler) + (
            len(self.filler0) - len(self.filler) + len(self._key(key)) if a else len(self._key0(key)))

    def check(self):
        for a, b in ((0, 0), (0, 2), (2, 0), (1, 1), (2, 3)):
            if self.ids(a, b, 12345) != self.tok.encode(prompt_text(a, b, 12345, self.wrap), bos=True):
                raise TokenizerError("assembling the passkey prompt by ids does not reproduce its tokenization.")


_PIECES: dict = {}


def pieces(tok, wrap=("", "")) -> Pieces:
    if (id(tok), wrap) not in _PIECES:
        _PIECES[id(tok), wrap] = Pieces(tok, wrap)
    return _PIECES[id(tok), wrap]


def layout(tok, length: int, depth: float, key, wrap=("", "")) -> tuple[int, int]:
    """(filler groups before the key, after it): the most groups whose prompt fits in `length` tokens."""
    p = pieces(tok, wrap)
    n = max(0, (length - p.length(0, depth, key)) // len(p.filler) + 1)
    while n > 0 and p.length(n, depth, key) > length:
        n -= 1
    if p.length(n, depth, key) > length:
        raise UsageError(f"length {length} is too short: the passkey prompt needs at least {p.length(0, depth, key)} tokens")
    return round(depth * n), n - round(depth * n)


def build_prompt(tok, length: int, depth: float, key, wrap=("", "")) -> list[int]:
    """Prompt ids, as close to `length` tokens as the 25-token filler groups allow without passing it, the key
    after round(depth * groups) groups (0: right after the instruction, 1: right before the question).
    wrap = the chat template's text before and after the message, for --chat."""
    return pieces(tok, wrap).ids(*layout(tok, length, depth, key, wrap), key)


def found(answer: str, key) -> bool:
    return str(key) in answer


def chat_wrap(ckpt, tok) -> tuple[str, str]:
    mark = "\x00MESSAGE\x00"
    before, _, after = chat_prompt(ckpt, tok, mark).partition(mark)
    return before, after


# ------------------------------------------------------------------------------------------ the sweep


def parse_length(s: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", s)
    if not m or int(m[1]) == 0:
        raise UsageError(f"bad length {s.strip()!r} (use a number of tokens like 3000, 4K or 1M; K = 1024)")
    return int(m[1]) * {"": 1, "k": 1024, "m": 1024 ** 2}[m[2].lower()]


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


def parse_modes(s: str) -> list[str]:
    modes = [m.strip() for m in s.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            raise UsageError(f"unknown attention mode {m!r} (use {', '.join(MODES)})")
    if not modes:
        raise UsageError("no attention modes given")
    return modes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="Hugging Face style checkpoint folder")
    p.add_argument("--lengths", default="4K,8K,16K,32K", help="prompt lengths in tokens (K = 1024)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="where the key sits: 0 start, 1 end")
    for m in MODES:
        p.add_argument(f"--depths-{m}", default=None, metavar="DEPTHS", help=f"depths for {m} only")
    p.add_argument("--trials", type=int, default=1, help="keys per (length, depth)")
    p.add_argument("--attention", default="infllm,stream,full", help="modes among infllm, stream, full")
    p.add_argument("--infllm", default="", metavar="KEY=VALUE,...", help="InfLLM (and stream) settings")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--seed", type=int, default=0, help="seed of the keys")
    p.add_argument("--compile", action="store_true",
                   help="as generate.py --compile: compiled layers and piece steps (the first trial pays the compilation)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    p.add_argument("--full-max-length", default="16K", help="skip full attention above this length (quadratic)")
    p.add_argument("--out", default=None, help="JSON lines file, one line per trial")
    p.add_argument("--resume", action="store_true", help="skip the trials already in --out (else --out is rewritten)")
    p.add_argument("--plot", default=None, help="heat map image per attention mode (needs matplotlib)")
    p.add_argument("--table", default=None, help="markdown file for the table, with the command line and date")
    return p.parse_args(argv)


def check_args(args):
    """Everything that can be wrong with the command line, before the model loads."""
    args.lengths = sorted({parse_length(s) for s in args.lengths.split(",") if s.strip()})
    if not args.lengths:
        raise UsageError("no lengths given")
    args.depths = parse_depths(args.depths)
    args.modes = parse_modes(args.attention)
    args.mode_depths = {m: parse_depths(getattr(args, f"depths_{m}")) if getattr(args, f"depths_{m}") else args.depths
                        for m in args.modes}
    args.full_max = parse_length(args.full_max_length)
    if args.trials < 1:
        raise UsageError("--trials must be at least 1")
    args.cfg = InfLLMConfig.parse(args.infllm)
    args.device_ = pick_device(args.device)
    args.dtype_name = args.dtype or ("bf16" if args.device_.type == "cuda" else "fp32")
    if args.resume and not args.out:
        raise UsageError("--resume needs --out")
    if not Path(args.ckpt).is_dir():
        raise UsageError(f"checkpoint folder {args.ckpt} does not exist")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise MissingDependency("--plot needs matplotlib, which is not installed (pip install matplotlib)") from None


class MissingDependency(RuntimeError):
    pass


def trial_keys(seed: int, trials: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(10000, 99999) for _ in range(trials)]


def settings_of(args, mode) -> dict:
    s = {"ckpt": Path(args.ckpt).name, "dtype": args.dtype_name, "chat": args.chat, "seed": args.seed,
         "max_new_tokens": MAX_NEW_TOKENS}
    if mode != "full":
        s["infllm"] = vars(args.cfg) if mode == "infllm" else {"n_init": args.cfg.n_init, "n_local": args.cfg.n_local,
                                                               "chunk_size": args.cfg.chunk_size}
    else:
        s["chunk_size"] = args.cfg.chunk_size
    if args.compile:  # the same arithmetic up to rounding, but told apart (a resumed sweep does not mix them)
        s["compile"] = True
    return s


def ident(r) -> tuple:
    return r["attention"], r["length_target"], r["depth"], r["trial"], r["key"], json.dumps(r["settings"], sort_keys=True)


def read_records(path) -> list[dict]:
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut short by an interrupted run: that trial runs again
    return out


def sweep_runner(model, mode, cfg, device, compile_, longest):
    """The caches and forward of one mode, kept for the whole sweep (--compile, or CUDA graphs on a GPU):
    the caches are reset between trials and sized once for the longest prompt, so the compiled steps and
    the two CUDA graphs serve every trial of every length."""
    caches = make_caches(model, mode, cfg, kernel=fast_kernel(device, mode, compile_))
    for c in caches:
        if hasattr(c, "reserve"):
            c.reserve(longest + MAX_NEW_TOKENS)
    return caches, forward_fn(model, caches, graphs=device.type == "cuda" and mode != "full")


@torch.no_grad()
def run_trial(model, tok, ids, key, mode, cfg, device, runner=None) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    if runner is None:
        caches, forward = make_caches(model, mode, cfg), None
    else:
        caches, forward = runner
        for c in caches:
            c.reset()
    logits = prefill(model, caches, ids, cfg.chunk_size, forward=forward, room=MAX_NEW_TOKENS)
    new = decode(model, caches, logits, MAX_NEW_TOKENS, stop_ids=set(tok.eos_ids), forward=forward)
    sync()
    answer = tok.decode(new)
    return {"found": found(answer, key), "answer": answer, "seconds": round(time.perf_counter() - t0, 3),
            "hit_rate": memory_stats(caches)["hit_rate"]}


def sweep(args, records: list[dict], write) -> None:
    device = args.device_
    done = {ident(r) for r in records}
    keys = trial_keys(args.seed, args.trials)
    model = tok = wrap = None
    runners = {}  # --compile or a GPU: mode -> (caches, forward)
    for length in args.lengths:
        for depth in sorted({d for m in args.modes for d in args.mode_depths[m]}):
            for trial, key in enumerate(keys):
                ids = None
                for mode in args.modes:
                    if depth not in args.mode_depths[mode]:
                        continue
                    rec = {"attention": mode, "length_target": length, "prompt_tokens": None, "depth": depth,
                           "trial": trial, "key": key, "found": None, "answer": None, "seconds": None,
                           "hit_rate": None, "settings": settings_of(args, mode)}
                    if ident(rec) in done:
                        continue
                    if mode == "full" and length > args.full_max:
                        rec["skipped"] = f"full attention above --full-max-length {length_label(args.full_max)}"
                    else:
                        if model is None:  # loaded only when some trial needs it (a resumed sweep may be done)
                            if device.type == "cuda":
                                use_compile_cache()
                                gpu_matmuls(DTYPES[args.dtype_name])
                            model, tok = load(args.ckpt, device, DTYPES[args.dtype_name])
                            if args.compile:
                                model.compile_blocks()
                            wrap = chat_wrap(args.ckpt, tok) if args.chat else ("", "")
                        if ids is None:
                            ids = build_prompt(tok, length, depth, key, wrap)
                        rec["prompt_tokens"] = len(ids)
                        if (args.compile or (device.type == "cuda" and mode != "full")) and mode not in runners:
                            runners[mode] = sweep_runner(model, mode, args.cfg, device, args.compile, max(args.lengths))
                        rec.update(run_trial(model, tok, ids, key, mode, args.cfg, device, runners.get(mode)))
                        print(f"{mode:6} {length_label(length):>5} ({len(ids)} tok) depth {depth:.2f} trial {trial}: "
                              f"{'found' if rec['found'] else 'MISSED'} {rec['answer']!r} (key {key}), "
                              f"{rec['seconds']:.1f} s", file=sys.stderr, flush=True)
                    records.append(rec)
                    write(rec)


# ------------------------------------------------------------------------------------------ reporting


def summary(args, records):
    """{(mode, length): {depth: (found, trials)}} over the records of this command's grid."""
    want = {(m, n, d) for m in args.modes for n in args.lengths for d in args.mode_depths[m]}
    keys = set(trial_keys(args.seed, args.trials))
    cells: dict = {}
    for r in records:
        if ((r["attention"], r["length_target"], r["depth"]) not in want or r["key"] not in keys or r.get("skipped")
                or r["settings"] != settings_of(args, r["attention"])):
            continue
        f, t = cells.setdefault((r["attention"], r["length_target"]), {}).get(r["depth"], (0, 0))
        cells[r["attention"], r["length_target"]][r["depth"]] = (f + bool(r["found"]), t + 1)
    return cells


def markdown_table(args, records) -> str:
    cells = summary(args, records)
    depths = sorted({d for m in args.modes for d in args.mode_depths[m]})
    tokens = {}
    for r in records:
        if r.get("prompt_tokens"):
            tokens.setdefault(r["length_target"], set()).add(r["prompt_tokens"])
    lines = ["| attention | length | " + " | ".join(f"depth {d:g}" for d in depths) + " | total |",
             "|---|---|" + "---|" * (len(depths) + 1)]
    for m in args.modes:
        for n in args.lengths:
            row = cells.get((m, n), {})
            skipped = m == "full" and n > args.full_max
            toks = tokens.get(n)
            label = length_label(n) + (f" ({min(toks)}-{max(toks)} tok)" if toks and len(toks) > 1 else
                                       f" ({min(toks)} tok)" if toks else "")
            cols = ["skipped" if skipped else f"{row[d][0]}/{row[d][1]}" if d in row else
                    ("" if d not in args.mode_depths[m] else "-") for d in depths]
            f, t = sum(v[0] for v in row.values()), sum(v[1] for v in row.values())
            lines.append(f"| {m} | {label} | " + " | ".join(cols) + f" | {'skipped' if skipped else f'{f}/{t}'} |")
    return "\n".join(lines) + "\n"


def write_table(args, records, path, argv):
    cmd = "python scripts/passkey.py " + " ".join(shlex.quote(a) for a in argv)
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(f"# Passkey retrieval\n\n`{cmd}`\n\n{date}, found/trials, greedy, key among the first "
                          f"{MAX_NEW_TOKENS} new tokens.\n\n" + markdown_table(args, records))


def plot(args, records, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = summary(args, records)
    fig, axes = plt.subplots(1, len(args.modes), figsize=(1.2 + 0.9 * len(args.lengths) * len(args.modes), 3.8),
                             squeeze=False)
    for ax, m in zip(axes[0], args.modes):
        depths = args.mode_depths[m]
        acc = np.full((len(depths), len(args.lengths)), np.nan)
        for j, n in enumerate(args.lengths):
            for i, d in enumerate(depths):
                if d in cells.get((m, n), {}):
                    f, t = cells[m, n][d]
                    acc[i, j] = f / t
        cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="lightgrey")  # grey: skipped or not run
        im = ax.imshow(acc, cmap=cmap, vmin=0, vmax=1, aspect="auto")
        for (i, j), v in np.ndenumerate(acc):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(args.lengths)), [length_label(n) for n in args.lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("key depth")
        ax.set_title(m)
    fig.colorbar(im, ax=axes[0].tolist(), label="accuracy")
    fig.savefig(path, dpi=150, bbox_inches="tight")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        check_args(args)
        records = read_records(args.out) if args.resume and Path(args.out).is_file() else []
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        out = open(args.out, "a" if args.resume else "w") if args.out else None

        def write(rec):
            if out:
                out.write(json.dumps(rec) + "\n")
                out.flush()  # a killed sweep keeps its finished trials, for --resume

        try:
            sweep(args, records, write)
        finally:
            if out:
                out.close()
    except (UsageError, CheckpointError, TokenizerError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except MissingDependency as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(markdown_table(args, records), end="")
    if args.table:
        write_table(args, records, args.table, argv)
    if args.plot:
        plot(args, records, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
