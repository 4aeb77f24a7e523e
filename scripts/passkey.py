"""Passkey retrieval: hide a 5-digit key at some depth of a long haystack and ask for it back.

    python scripts/passkey.py --ckpt DIR --lengths 4K,8K,16K,32K --depths 0,0.25,0.5,0.75,1 --trials 3 \
        --attention infllm,stream,full [--device cpu|cuda] [--dtype bf16|fp16|fp32] [--infllm key=val,...] \
        [--engine reference|fast] [--compile] [--seed 0] [--chat] [--full-max-length 16K] [--out results.jsonl] \
        [--resume] [--plot passkey.png] [--table docs/passkey.md] [--depths-stream 0.1,0.5,0.9]

The prompt is the classic one measured in ../shared/TEST_MODEL.md. Lengths are in tokens of the checkpoint's
tokenizer ("K" = 1024, "M" = 1024K); each prompt is as long as possible without passing its target.
Progress goes to stderr, the table (found/trials per depth) to stdout.
"""
import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sweep import (MODES, Runner, UsageError, add_common_args, answer, check_common, check_setup,  # noqa: E402
                   encode_after, heatmaps, length_label, parse_depths, run_cli, settings_of, tokens_label,
                   write_markdown)
from sweep import chat_wrap, parse_length  # noqa: E402,F401 (passkey's own names before sweep.py held them)
from tokenizer import TokenizerError  # noqa: E402

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEY = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"
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

        first = lambda s: encode_after(tok, wrap[0] + INSTRUCTION, s.rstrip(" "), bos=True)  # noqa: E731
        later = lambda s: encode_after(tok, ref, " " + s.rstrip(" "))  # noqa: E731
        self.filler0, self.filler = first(FILLER), later(FILLER)
        self._key0, self._key = (lambda k: first(KEY.format(key=k))), (lambda k: later(KEY.format(key=k)))
        self.question = encode_after(tok, ref, " " + QUESTION + wrap[1])
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


# ------------------------------------------------------------------------------------------ the sweep


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="Hugging Face style checkpoint folder")
    p.add_argument("--lengths", default="4K,8K,16K,32K", help="prompt lengths in tokens (K = 1024)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="where the key sits: 0 start, 1 end")
    for m in MODES:
        p.add_argument(f"--depths-{m}", default=None, metavar="DEPTHS", help=f"depths for {m} only")
    p.add_argument("--trials", type=int, default=1, help="keys per (length, depth)")
    add_common_args(p)
    return p.parse_args(argv)


def check_args(args):
    """Everything that can be wrong with the command line, before the model loads."""
    check_common(args)
    args.mode_depths = {m: parse_depths(getattr(args, f"depths_{m}")) if getattr(args, f"depths_{m}") else args.depths
                        for m in args.modes}
    if args.trials < 1:
        raise UsageError("--trials must be at least 1")
    check_setup(args)


def trial_keys(seed: int, trials: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(10000, 99999) for _ in range(trials)]


def ident(r) -> tuple:
    return r["attention"], r["length_target"], r["depth"], r["trial"], r["key"], json.dumps(r["settings"], sort_keys=True)


def run_trial(model, tok, ids, key, mode, cfg, device, runner=None) -> dict:
    r = answer(model, tok, ids, mode, cfg, device, runner, MAX_NEW_TOKENS)
    return {"found": found(r["answer"], key), **r}


def sweep(args, records: list[dict], write) -> None:
    done = {ident(r) for r in records}
    keys = trial_keys(args.seed, args.trials)
    runner = Runner(args, MAX_NEW_TOKENS)
    for length in args.lengths:
        for depth in sorted({d for m in args.modes for d in args.mode_depths[m]}):
            for trial, key in enumerate(keys):
                ids = None
                for mode in args.modes:
                    if depth not in args.mode_depths[mode]:
                        continue
                    rec = {"attention": mode, "length_target": length, "prompt_tokens": None, "depth": depth,
                           "trial": trial, "key": key, "found": None, "answer": None, "seconds": None,
                           "hit_rate": None, "settings": settings_of(args, mode, MAX_NEW_TOKENS)}
                    if ident(rec) in done:
                        continue
                    if mode == "full" and length > args.full_max:
                        rec["skipped"] = f"full attention above --full-max-length {length_label(args.full_max)}"
                    else:
                        _, tok, wrap = runner.load()
                        if ids is None:
                            ids = build_prompt(tok, length, depth, key, wrap)
                        rec["prompt_tokens"] = len(ids)
                        r = runner.answer(ids, mode)
                        rec.update(found=found(r["answer"], key), **r)
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
                or r["settings"] != settings_of(args, r["attention"], MAX_NEW_TOKENS)):
            continue
        f, t = cells.setdefault((r["attention"], r["length_target"]), {}).get(r["depth"], (0, 0))
        cells[r["attention"], r["length_target"]][r["depth"]] = (f + bool(r["found"]), t + 1)
    return cells


def markdown_table(args, records) -> str:
    cells = summary(args, records)
    depths = sorted({d for m in args.modes for d in args.mode_depths[m]})
    lines = ["| attention | length | " + " | ".join(f"depth {d:g}" for d in depths) + " | total |",
             "|---|---|" + "---|" * (len(depths) + 1)]
    for m in args.modes:
        for n in args.lengths:
            row = cells.get((m, n), {})
            skipped = m == "full" and n > args.full_max
            cols = ["skipped" if skipped else f"{row[d][0]}/{row[d][1]}" if d in row else
                    ("" if d not in args.mode_depths[m] else "-") for d in depths]
            f, t = sum(v[0] for v in row.values()), sum(v[1] for v in row.values())
            lines.append(f"| {m} | {tokens_label(n, records)} | " + " | ".join(cols)
                         + f" | {'skipped' if skipped else f'{f}/{t}'} |")
    return "\n".join(lines) + "\n"


def write_table(args, records, path, argv):
    write_markdown(path, "Passkey retrieval", "passkey.py", argv,
                   f"found/trials, greedy, key among the first {MAX_NEW_TOKENS} new tokens.", markdown_table(args, records))


def plot(args, records, path):
    cells = summary(args, records)
    panels = [(m, {(d, n): f / t for n in args.lengths for d, (f, t) in cells.get((m, n), {}).items()},
               args.mode_depths[m], args.lengths) for m in args.modes]
    heatmaps(panels, path, "prompt length (tokens)", "key depth")


def report(args, records, argv):
    print(markdown_table(args, records), end="")
    if args.table:
        write_table(args, records, args.table, argv)
    if args.plot:
        plot(args, records, args.plot)


def main(argv=None) -> int:
    return run_cli(argv, parse_args, check_args, sweep, report)


if __name__ == "__main__":
    sys.exit(main())
