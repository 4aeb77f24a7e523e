"""Needles in a haystack, RULER's family (Hsieh et al. 2024, arXiv 2404.06654): hide "The special number for
<key> is <value>." sentences in a long text and ask for the values of some keys.

    python scripts/niah.py --ckpt DIR --tasks single,multikey,multivalue,multiquery --haystacks prose \
        --lengths 4K,8K --depths 0,0.25,0.5,0.75,1 --samples 3 --attention infllm,stream,full \
        [--keys words] [--values numbers] [--digits 7] [--max-new-tokens 128] [--device cpu|cuda] \
        [--dtype bf16|fp16|fp32] [--infllm key=val,...] [--engine reference|fast] [--compile] [--seed 0] [--chat] \
        [--full-max-length 16K] [--out results.jsonl] [--resume] [--table docs/quality.md] [--plot niah.png]

Tasks, as RULER's (needles with distinct keys, values per key, keys asked):
    single      1  1  1   one needle
    multikey    4  1  1   three distractor needles with other keys
    multivalue  1  4  1   one key with four values: all four must come back
    multiquery  4  1  4   four keys asked at once: all four values must come back
Haystacks:
    repeat  the classic passkey filler, "The grass is green. ...", over and over (RULER calls this one `noise`)
    prose   Python's documentation, `pydoc_data.topics` (in every Python; some 100K tokens), from its start,
            going round again when a prompt is longer (RULER uses Paul Graham's essays)
    noise   the words of `prose` in a fixed random order: the same tokens without sentences or meaning
Keys and values are words (adjective-noun, as "quiet-otter"), numbers of --digits digits (RULER's 7) or UUIDs,
drawn from --seed: a sample has the same needles at every length, depth and attention mode and on every haystack,
and the same keys whatever --digits (a small model may need values shorter than 7 digits). The first needle
sits at the depth (0: right after the instruction, 1: right before the question), the others at depths drawn
for the sample. A sample's score is the fraction of the expected values that the answer holds (RULER's
string_match_all); the table gives the mean score in % per depth. Lengths are in tokens, as in passkey.py;
progress goes to stderr, the table to stdout.
"""
import argparse
import bisect
import functools
import json
import platform
import random
import re
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from passkey import FILLER  # noqa: E402
from sweep import (Runner, UsageError, add_common_args, check_common, check_setup, chat_wrap,  # noqa: E402
                   encode_after, heatmaps, length_label, parse_choices, run_cli, settings_of, tokens_label,
                   write_markdown)
from tokenizer import TokenizerError, load_tokenizer  # noqa: E402

TASKS = {"single": (1, 1, 1), "multikey": (4, 1, 1), "multivalue": (1, 4, 1), "multiquery": (4, 1, 4)}
HAYSTACKS = ("repeat", "prose", "noise")
KINDS = {"words": ("word", "words"), "numbers": ("number", "numbers"), "uuids": ("UUID", "UUIDs")}

INSTRUCTION_ONE = "A special {noun} is hidden in the text below. Find it and remember it: I will ask you for it at the end.\n"
INSTRUCTION_ALL = "Special {nouns} are hidden in the text below. Find them and remember them: I will ask you for them at the end.\n"
NEEDLE = "The special {noun} for {key} is {value}."
QUESTION_ONE = "What is the special {noun} for {keys}? The special {noun} for {keys} is"
QUESTION_ALL = "What are all the special {nouns} for {keys}? The special {nouns} for {keys} are"
REF = "Here we go."  # a context that ends like every part of the body does, for encode_after

ADJECTIVES = ("amber bold brave bright calm clever cold crisp dusty eager faint gentle golden hollow humble jolly "
              "lively lucky misty noble odd pale proud quiet rapid rusty silent silver steady swift tame wild").split()
NOUNS = ("anchor apple badger beacon canyon castle cedar comet falcon garden harbor island kettle lantern meadow "
         "mirror orchard otter pebble pepper piano pigeon river saddle summit thistle tiger tulip valley violin "
         "wagon willow").split()


# ------------------------------------------------------------------------------------------ the needles


@dataclass
class Sample:
    task: str
    value_kind: str
    needles: list[str]  # the needle sentences; the first sits at the sweep's depth
    other_depths: list[float]  # where the others sit, drawn for the sample
    asked: list[str]  # the keys in the question
    expected: list[str]  # the values the answer must hold


def draw(rng: random.Random, kind: str, digits: int = 7) -> str:
    if kind == "numbers":  # as RULER's generate_random_number: no leading zero, so exactly `digits` digits
        return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))
    if kind == "words":
        return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def make_sample(task: str, key_kind: str, value_kind: str, seed: int, i: int, digits: int = 7) -> Sample:
    """The i-th sample of a task: its own generator, so that it does not depend on what else the sweep runs.
    `digits` stays out of the generator's seed: with other digits a sample keeps its keys (words or UUIDs), so
    that only the values' length changes (the other needles' depths, drawn after the values, may move)."""
    rng = random.Random(f"{seed}/{task}/{key_kind}/{value_kind}/{i}")
    n_keys, n_values, n_asked = TASKS[task]
    taken = set()

    def fresh(kind):  # every key and value distinct, so that no needle answers for another
        while (x := draw(rng, kind, digits)) in taken:
            pass
        taken.add(x)
        return x

    keys = [fresh(key_kind) for _ in range(n_keys)]
    values = [[fresh(value_kind) for _ in range(n_values)] for _ in keys]
    noun = KINDS[value_kind][0]
    needles = [NEEDLE.format(noun=noun, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    other_depths = [rng.random() for _ in needles[1:]]
    return Sample(task, value_kind, needles, other_depths, keys[:n_asked], [v for vs in values[:n_asked] for v in vs])


def instruction(s: Sample) -> str:
    noun, nouns = KINDS[s.value_kind]
    return (INSTRUCTION_ONE if len(s.expected) == 1 else INSTRUCTION_ALL).format(noun=noun, nouns=nouns)


def question(s: Sample) -> str:
    noun, nouns = KINDS[s.value_kind]
    keys = s.asked[0] if len(s.asked) == 1 else ", ".join(s.asked[:-1]) + " and " + s.asked[-1]
    return (QUESTION_ONE if len(s.expected) == 1 else QUESTION_ALL).format(noun=noun, nouns=nouns, keys=keys)


def score(answer: str, expected: list[str]) -> float:
    """RULER's string_match_all: the fraction of the expected values found in the answer, case aside."""
    return sum(v.lower() in answer.lower() for v in expected) / len(expected)


# ------------------------------------------------------------------------------------------ the haystacks


@functools.cache
def prose_text() -> str:
    """Python's documentation topics in the order of their names, every run of white space one space (as RULER
    does with its essays), without the lines that only underline a heading."""
    from pydoc_data.topics import topics
    lines = "\n".join(topics[k] for k in sorted(topics)).splitlines()
    text = " ".join(line for line in lines if not re.fullmatch(r"\s*([*=~^-])\1+\s*", line))
    return re.sub(r"\s+", " ", text).strip()


def haystack_units(name: str) -> list[str]:
    """One round of a haystack, cut into the units between which needles go: sentences, or words for noise."""
    if name == "repeat":
        return re.split(r"(?<=\.) ", FILLER.strip())
    if name == "prose":
        return re.split(r"(?<=[.!?]) (?=[A-Z\"'(])", prose_text())
    words = prose_text().split(" ")
    random.Random(0).shuffle(words)  # a fixed order: --seed changes the needles, never the haystack
    return words


class Parts:
    """Token ids of a prompt's parts, so that a prompt of any length is assembled without re-tokenizing it.

    The body (haystack units and needles) is cut before the space that starts each part: byte-level BPE and
    sentencepiece split words before their leading space, so the cuts are token boundaries and the parts' ids
    add up to the ids of the whole text. A part is encoded after REF (or, the first one, after the instruction)
    and memoized: a haystack's units are encoded once per process, however long the prompts."""

    def __init__(self, tok, wrap=("", "")):
        self.tok, self.wrap, self.memo = tok, wrap, {}

    def later(self, text: str) -> list[int]:
        if text not in self.memo:
            self.memo[text] = encode_after(self.tok, REF, " " + text)
        return self.memo[text]

    def first(self, head: str, text: str) -> list[int]:
        return encode_after(self.tok, self.wrap[0] + head, text, bos=True)

    def head(self, s: Sample) -> list[int]:
        return self.tok.encode(self.wrap[0] + instruction(s), bos=True)

    def question(self, s: Sample) -> list[int]:
        return encode_after(self.tok, REF, " " + question(s) + self.wrap[1])

    def text(self, s: Sample, body: list[str]) -> str:
        return self.wrap[0] + instruction(s) + " ".join(body) + " " + question(s) + self.wrap[1]


class Haystack:
    """A haystack going round for ever, with the token counts of its first units, encoded as far as asked."""

    def __init__(self, name: str, parts: Parts):
        self.name, self.parts, self.units = name, parts, haystack_units(name)
        self.cum = [0]  # tokens of the first i units of a round

    def unit(self, i: int) -> str:
        return self.units[i % len(self.units)]

    def tokens(self, m: int) -> int:
        """Tokens of the first m units."""
        rounds, rest = divmod(m, len(self.units))
        while len(self.cum) <= (len(self.units) if rounds else rest):
            self.cum.append(self.cum[-1] + len(self.parts.later(self.units[len(self.cum) - 1])))
        return rounds * self.cum[-1] + self.cum[rest]  # cum holds the whole round when rounds > 0

    def fit(self, budget: int) -> list[str]:
        """The longest start of the haystack within `budget` tokens: whole units, then the words of the next
        unit that still fit (a long sentence of prose would leave the prompt short by hundreds of tokens)."""
        m = bisect.bisect_right(range(budget + 1), budget, key=self.tokens) - 1
        words = self.unit(m).split(" ")
        room = budget - self.tokens(m)
        k = bisect.bisect_right(range(len(words)), room, key=lambda k: len(self.parts.later(" ".join(words[:k]))) if k else 0) - 1
        return [self.unit(i) for i in range(m)] + ([" ".join(words[:k])] if k else [])

    def check(self):
        """Every boundary between units, the round's end to its start included, against encoding the text."""
        n = len(self.units)
        ids = [t for i in range(n + 2) for t in self.parts.later(self.unit(i))]
        if ids != encode_after(self.parts.tok, REF, " " + " ".join(self.unit(i) for i in range(n + 2))):
            raise TokenizerError(f"assembling the {self.name} haystack by ids does not reproduce its tokenization.")


_HAYSTACKS: dict = {}


def haystack(name: str, parts: Parts) -> Haystack:
    """One checked haystack per name and tokenizer, for the whole process."""
    if (name, id(parts)) not in _HAYSTACKS:
        _HAYSTACKS[name, id(parts)] = Haystack(name, parts)
        _HAYSTACKS[name, id(parts)].check()
    return _HAYSTACKS[name, id(parts)]


# ------------------------------------------------------------------------------------------ the prompt


@dataclass
class Prompt:
    ids: list[int]
    text: str
    needle_at: list[int]  # where each needle's first token is, in the order of Sample.needles


def nearest(cum: list[int], t: float) -> int:
    """The index of the value of the ascending list `cum` nearest to t (the lower one on a tie)."""
    i = bisect.bisect_left(cum, t)
    return i - 1 if i > 0 and (i == len(cum) or t - cum[i - 1] <= cum[i] - t) else i


def assemble(parts: Parts, hay: Haystack, s: Sample, budget: int, depth: float) -> Prompt:
    """The prompt with `budget` tokens of haystack: each needle goes to the boundary between units nearest its
    depth, counted in tokens of the haystack (the first needle at `depth`)."""
    units = hay.fit(budget)
    cum = [0]
    for u in units:
        cum.append(cum[-1] + len(parts.later(u)))
    at: dict[int, list[int]] = {}  # boundary (after that many units) -> needles there
    for j, d in enumerate([depth] + s.other_depths):
        at.setdefault(nearest(cum, d * cum[-1]), []).append(j)
    body, which = [], []  # the texts in order; which needle each one is (None: haystack)
    for i in range(len(units) + 1):
        for j in at.get(i, []):
            body.append(s.needles[j])
            which.append(j)
        if i < len(units):
            body.append(units[i])
            which.append(None)
    head = parts.head(s)
    ids, needle_at = list(head), [0] * len(s.needles)
    for n, (text, j) in enumerate(zip(body, which)):
        if j is not None:
            needle_at[j] = len(ids)
        ids += parts.first(instruction(s), text) if n == 0 else parts.later(text)
    ids += parts.question(s)
    return Prompt(ids, parts.text(s, body), needle_at)


def check(parts: Parts, hay: Haystack, s: Sample):
    """A small prompt of the sample with every kind of boundary (instruction to needle or unit, needle to needle,
    unit to needle, a unit cut short, to the question) against encoding its whole text."""
    budget = hay.tokens(3) + len(parts.later(hay.unit(3).split(" ")[0]))  # three units and a word
    for depth in (0.0, 0.5, 1.0):
        p = assemble(parts, hay, s, budget, depth)
        if p.ids != parts.tok.encode(p.text, bos=True):
            raise TokenizerError(f"assembling the {s.task} prompt on the {hay.name} haystack by ids does not "
                                 "reproduce its tokenization.")


def minimum_length(parts: Parts, s: Sample) -> int:
    """Tokens of the sample's prompt without any haystack."""
    return len(assemble(parts, haystack("repeat", parts), s, 0, 0.0).ids)


def build_prompt(parts: Parts, hay: Haystack, s: Sample, length: int, depth: float) -> Prompt:
    """The sample's prompt, as long as whole words of haystack allow without passing `length` tokens."""
    check(parts, hay, s)
    fixed = len(parts.head(s)) + len(parts.question(s)) + sum(len(parts.later(n)) for n in s.needles)
    budget = length - fixed
    while True:
        p = assemble(parts, hay, s, max(budget, 0), depth)
        if len(p.ids) <= length:  # the first part, encoded after the instruction, may differ by a token
            return p
        if budget <= 0:
            break
        budget -= len(p.ids) - length
    raise UsageError(f"length {length} is too short: the {s.task} prompt needs at least {minimum_length(parts, s)} tokens")


# ------------------------------------------------------------------------------------------ the sweep


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="Hugging Face style checkpoint folder")
    p.add_argument("--tasks", default="single,multikey,multivalue,multiquery", help=f"among {', '.join(TASKS)}")
    p.add_argument("--haystacks", default="prose", help=f"among {', '.join(HAYSTACKS)}")
    p.add_argument("--keys", default="words", help=f"kinds of keys, among {', '.join(KINDS)}")
    p.add_argument("--values", default="numbers", help=f"kinds of values, among {', '.join(KINDS)}")
    p.add_argument("--lengths", default="4K,8K,16K,32K", help="prompt lengths in tokens (K = 1024)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="where the first needle sits: 0 start, 1 end")
    p.add_argument("--digits", type=int, default=7, help="digits of `numbers` keys and values (1-12; RULER's: 7)")
    p.add_argument("--samples", type=int, default=1, help="samples (needles drawn from --seed) per (length, depth)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="answer length (RULER's: 128)")
    add_common_args(p)
    return p.parse_args(argv)


def check_args(args):
    """Everything that can be wrong with the command line, before the model loads."""
    args.tasks = parse_choices(args.tasks, tuple(TASKS), "task")
    args.haystacks = parse_choices(args.haystacks, HAYSTACKS, "haystack")
    args.key_kinds = parse_choices(args.keys, tuple(KINDS), "kind of key")
    args.value_kinds = parse_choices(args.values, tuple(KINDS), "kind of value")
    check_common(args)
    if not 1 <= args.digits <= 12:  # 1 digit still gives the 8 distinct numbers a task may need
        raise UsageError(f"--digits must be between 1 and 12, not {args.digits}")
    if args.samples < 1:
        raise UsageError("--samples must be at least 1")
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    check_setup(args)
    args.suites = [(t, h, k, v) for t in args.tasks for h in args.haystacks for k in args.key_kinds for v in args.value_kinds]


def settings(args, mode) -> dict:
    # pydoc_data.topics is rebuilt for every Python release: prose and noise are the same text only within one.
    # digits: a 5-digit needle is another task than a 7-digit one, and a resumed sweep must not mix them.
    return settings_of(args, mode, args.max_new_tokens) | {"python": platform.python_version(),
                                                           "digits": args.digits}


def suite_label(suite) -> str:
    task, hay, k, v = suite
    return f"{task}/{hay}" + ("" if (k, v) == ("words", "numbers") else f"/{k}->{v}")


def ident(r) -> tuple:
    return (r["task"], r["haystack"], r["key_kind"], r["value_kind"], r["attention"], r["length_target"], r["depth"],
            r["sample"], tuple(r["expected"]), json.dumps(r["settings"], sort_keys=True))


def sweep(args, records: list[dict], write) -> None:
    for r in records:
        r["settings"].setdefault("digits", 7)  # written before --digits: RULER's 7, the only length then
    done = {ident(r) for r in records}
    tok = load_tokenizer(args.ckpt)
    parts = Parts(tok, chat_wrap(args.ckpt, tok) if args.chat else ("", ""))
    samples = {suite: [make_sample(suite[0], *suite[2:], args.seed, i, args.digits) for i in range(args.samples)]
               for suite in args.suites}
    need = max(minimum_length(parts, s) for ss in samples.values() for s in ss)
    if args.lengths[0] < need:  # before any trial runs
        raise UsageError(f"length {args.lengths[0]} is too short: the prompts need at least {need} tokens")
    runner = Runner(args, args.max_new_tokens)
    for length in args.lengths:
        for suite in args.suites:
            task, hay, key_kind, value_kind = suite
            for depth in args.depths:
                for i, s in enumerate(samples[suite]):
                    prompt = None
                    for mode in args.modes:
                        rec = {"task": task, "haystack": hay, "key_kind": key_kind, "value_kind": value_kind,
                               "attention": mode, "length_target": length, "prompt_tokens": None, "depth": depth,
                               "sample": i, "needle_at": None, "asked": s.asked, "expected": s.expected,
                               "answer": None, "score": None, "seconds": None, "hit_rate": None,
                               "settings": settings(args, mode)}
                        if ident(rec) in done:
                            continue
                        if mode == "full" and length > args.full_max:
                            rec["skipped"] = f"full attention above --full-max-length {length_label(args.full_max)}"
                        else:
                            if prompt is None:
                                prompt = build_prompt(parts, haystack(hay, parts), s, length, depth)
                            rec.update(prompt_tokens=len(prompt.ids), needle_at=prompt.needle_at,
                                       **runner.answer(prompt.ids, mode))
                            rec["score"] = score(rec["answer"], s.expected)
                            print(f"{mode:6} {suite_label(suite)} {length_label(length):>5} ({len(prompt.ids)} tok) "
                                  f"depth {depth:.2f} sample {i}: {rec['score']:.0%} {rec['answer']!r} "
                                  f"(expected {', '.join(s.expected)}), {rec['seconds']:.1f} s",
                                  file=sys.stderr, flush=True)
                        records.append(rec)
                        write(rec)


# ------------------------------------------------------------------------------------------ reporting


def summary(args, records) -> dict:
    """{(suite, mode, length): {depth: [scores]}} over the records of this command's grid and settings."""
    want = {(*suite, m, n, d) for suite in args.suites for m in args.modes for n in args.lengths for d in args.depths}
    cells: dict = {}
    for r in records:
        suite = (r["task"], r["haystack"], r["key_kind"], r["value_kind"])
        if ((*suite, r["attention"], r["length_target"], r["depth"]) not in want or r["sample"] >= args.samples
                or r.get("skipped") or r["settings"] != settings(args, r["attention"])):
            continue
        cells.setdefault((suite, r["attention"], r["length_target"]), {}).setdefault(r["depth"], []).append(r["score"])
    return cells


def mean(xs) -> float:
    return sum(xs) / len(xs)


def markdown_table(args, records) -> str:
    cells = summary(args, records)
    lines = ["| task | haystack | keys -> values | attention | length | "
             + " | ".join(f"depth {d:g}" for d in args.depths) + " | mean |",
             "|---|---|---|---|---|" + "---|" * (len(args.depths) + 1)]
    for suite in args.suites:
        for m in args.modes:
            for n in args.lengths:
                row = cells.get((suite, m, n), {})
                skipped = m == "full" and n > args.full_max
                cols = ["skipped" if skipped else f"{mean(row[d]):.0%}" if d in row else "-" for d in args.depths]
                every = [x for xs in row.values() for x in xs]
                total = "skipped" if skipped else f"{mean(every):.0%} ({len(every)})" if every else "-"
                lines.append(f"| {suite[0]} | {suite[1]} | {suite[2]} -> {suite[3]} | {m} | {tokens_label(n, records)} | "
                             + " | ".join(cols) + f" | {total} |")
    # RULER's summary: every task of the sweep at once, per attention mode and length.
    lines += ["", "| attention | " + " | ".join(length_label(n) for n in args.lengths) + " |",
              "|---|" + "---|" * len(args.lengths)]
    for m in args.modes:
        cols = []
        for n in args.lengths:
            every = [x for suite in args.suites for xs in cells.get((suite, m, n), {}).values() for x in xs]
            cols.append("skipped" if m == "full" and n > args.full_max else f"{mean(every):.0%}" if every else "-")
        lines.append(f"| {m} | " + " | ".join(cols) + " |")
    return "\n".join(lines) + "\n"


def write_table(args, records, path, argv):
    write_markdown(path, "Needles in a haystack (RULER)", "niah.py", argv,
                   f"mean score (the fraction of the expected values in the answer) per depth, greedy, "
                   f"{args.max_new_tokens} new tokens at most, numbers of {args.digits} digits; in brackets the "
                   f"number of trials.",
                   markdown_table(args, records))


def plot(args, records, path):
    """Per attention mode: the mean score of each task (rows) at each length (columns)."""
    cells = summary(args, records)
    rows = [suite_label(s) for s in args.suites]
    panels = [(m, {(suite_label(s), n): mean([x for xs in cells[s, m, n].values() for x in xs])
                   for s in args.suites for n in args.lengths if (s, m, n) in cells}, rows, args.lengths)
              for m in args.modes]
    heatmaps(panels, path, "prompt length (tokens)", "task", height=1.6 + 0.4 * len(rows))


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
