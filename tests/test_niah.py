"""scripts/niah.py: prompts assembled by ids against tokenizing the whole text, needles where they were asked
for, the samples and the scoring, one real prompt with SmolLM2, the CLI's plumbing on a tiny random model,
and its errors."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import niah  # noqa: E402
from niah import HAYSTACKS, TASKS, build_prompt, haystack, make_sample, score  # noqa: E402

CKPT = ROOT / "checkpoints" / "smollm2-135m-instruct"
needs_tokenizer = pytest.mark.skipif(not (CKPT / "tokenizer.json").exists(),
                                     reason="run `python scripts/prepare_test_model.py` first")
needs_ckpt = pytest.mark.skipif(not (CKPT / "model.safetensors").exists(),
                                reason="run `python scripts/prepare_test_model.py` first")
KINDS = [("words", "numbers"), ("words", "uuids"), ("uuids", "words"), ("numbers", "numbers")]


@pytest.fixture(scope="module")
def parts():
    from tokenizer import load_tokenizer
    return niah.Parts(load_tokenizer(CKPT))


# ------------------------------------------------------------------------------------------ the prompt


@needs_tokenizer
@pytest.mark.parametrize("hay", HAYSTACKS)
@pytest.mark.parametrize("task", TASKS)
def test_prompt_ids_are_the_whole_text_encoded(parts, hay, task):
    """Every haystack and task, needles of every kind, at depths 0, between and 1: the ids assembled from parts
    are those of encoding the prompt's text, and the prompt is as long as whole words allow."""
    tok = parts.tok
    for i, (keys, values) in enumerate(KINDS):
        s = make_sample(task, keys, values, 3, i)
        for depth in (0.0, 0.37, 1.0):
            length = 1500 + 97 * i
            p = build_prompt(parts, haystack(hay, parts), s, length, depth)
            assert p.ids == tok.encode(p.text, bos=True)
            assert length - 8 < len(p.ids) <= length
            assert p.text.startswith(niah.instruction(s)) and p.text.endswith(niah.question(s))
            assert all(p.text.count(n) == 1 for n in s.needles)


@needs_tokenizer
def test_prose_goes_round_and_chat_wraps(parts):
    """A prompt longer than the whole prose (some 100K tokens) goes on from its start; --chat's template wraps it."""
    tok = parts.tok
    s = make_sample("multivalue", "words", "numbers", 0, 0)
    prose = haystack("prose", parts)
    p = build_prompt(parts, prose, s, 130_000, 0.5)
    assert p.ids == tok.encode(p.text, bos=True) and 130_000 - 8 < len(p.ids) <= 130_000
    assert prose.tokens(len(prose.units)) < 130_000
    assert p.text.count(prose.units[0]) == 2 and p.text.count(prose.units[-1]) == 1

    from sweep import chat_wrap
    chat = niah.Parts(tok, chat_wrap(CKPT, tok))
    p = build_prompt(chat, haystack("noise", chat), s, 3000, 0.25)
    assert p.text.startswith("<|im_start|>user\n") and p.text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert p.ids == tok.encode(p.text, bos=True) and len(p.ids) <= 3000


@needs_tokenizer
@pytest.mark.parametrize("hay", HAYSTACKS)
def test_needles_sit_at_their_depths(parts, hay):
    """The needle's ids are in the prompt where needle_at says, after the share of the haystack's tokens that its
    depth asks for (within the length of a unit: needles go between sentences, or words for noise)."""
    tok = parts.tok
    for task in ("single", "multikey"):
        s = make_sample(task, "words", "numbers", 1, 0)
        for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
            p = build_prompt(parts, haystack(hay, parts), s, 2000, depth)
            head, question = tok.encode(niah.instruction(s), bos=True), tok.encode(" " + niah.question(s))
            needle_ids = {j: tok.encode(" " + n) for j, n in enumerate(s.needles)}  # each on its own
            for j, at in enumerate(p.needle_at):
                ids = needle_ids[j]
                if at == len(head):  # right after the instruction: no leading space
                    ids = tok.encode(niah.instruction(s) + s.needles[j], bos=True)[len(head):]
                assert p.ids[at:at + len(ids)] == ids
            hay_tokens = len(p.ids) - len(head) - len(question) - sum(map(len, needle_ids.values()))
            before = p.needle_at[0] - len(head) - sum(len(needle_ids[j]) for j, at in enumerate(p.needle_at)
                                                       if at < p.needle_at[0])
            longest_unit = max(len(tok.encode(" " + u)) for u in p.text.split(". "))
            assert abs(before - depth * hay_tokens) <= longest_unit
            if depth == 0:
                assert p.needle_at[0] == len(head)
            if depth == 1:
                assert p.ids[-len(question):] == question
                assert p.needle_at[0] + len(needle_ids[0]) == len(p.ids) - len(question)
                assert p.text.endswith(s.needles[0] + " " + niah.question(s))


@needs_tokenizer
@pytest.mark.parametrize("hay", ["prose", "repeat"])
def test_prompt_with_5_digit_numbers(parts, hay):
    """--digits 5: the prompt holds the 5-digit needle where the 7-digit one was, and is still its text encoded."""
    s5, s7 = make_sample("single", "words", "numbers", 0, 0, 5), make_sample("single", "words", "numbers", 0, 0)
    p5, p7 = (build_prompt(parts, haystack(hay, parts), s, 3000, 0.5) for s in (s5, s7))
    assert p5.ids == parts.tok.encode(p5.text, bos=True) and 3000 - 8 < len(p5.ids) <= 3000
    (value,) = re.findall(r"The special number for humble-piano is (\d+)\.", p5.text)
    assert value == s5.expected[0] and len(value) == 5 and value not in p7.text
    # The same words around it: the same text with the 7-digit needle put back, up to the haystack's last words
    # (two tokens fewer of needle leave room for more words there).
    same = len(p7.text) - len(niah.question(s7)) - 100
    assert p5.text.replace(s5.needles[0], s7.needles[0])[:same] == p7.text[:same]
    assert p5.needle_at == p7.needle_at


@needs_tokenizer
def test_too_short_a_length_is_refused(parts):
    s = make_sample("multiquery", "uuids", "uuids", 0, 0)
    need = niah.minimum_length(parts, s)
    assert len(build_prompt(parts, haystack("prose", parts), s, need, 0.5).ids) == need
    with pytest.raises(niah.UsageError, match=f"needs at least {need} tokens"):
        build_prompt(parts, haystack("prose", parts), s, need - 1, 0.5)


# ------------------------------------------------------------------------------------------ needles and scores


def test_samples_are_seeded_and_shaped_as_their_tasks():
    for task, (n_keys, n_values, n_asked) in TASKS.items():
        for keys, values in KINDS:
            s = make_sample(task, keys, values, 7, 2)
            assert s == make_sample(task, keys, values, 7, 2)  # the same needles whatever else the sweep runs
            assert s != make_sample(task, keys, values, 8, 2) and s != make_sample(task, keys, values, 7, 3)
            assert len(s.needles) == n_keys * n_values == len(s.other_depths) + 1
            assert len(s.asked) == n_asked and len(s.expected) == n_asked * n_values
            found = re.findall(r"The special \w+ for (\S+) is (\S+)\.", " ".join(s.needles))
            assert s.expected == [v for k in s.asked for k2, v in found if k2 == k]  # every value of the keys asked
            assert len(found) == len(s.needles) and len({x for kv in found for x in kv}) == len(s.needles) + n_keys
            pattern = {"numbers": r"[1-9]\d{6}", "words": r"[a-z]+-[a-z]+",
                       "uuids": r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"}
            assert all(re.fullmatch(pattern[keys], k) for k, _ in found)
            assert all(re.fullmatch(pattern[values], v) for _, v in found)
            assert all(0 <= d <= 1 for d in s.other_depths)


@pytest.mark.parametrize("digits", [1, 4, 5, 12])
def test_digits_shorten_the_numbers_and_keep_the_keys(digits):
    """--digits changes the length of `numbers` keys and values and nothing else of a sample: the same keys
    (words, UUIDs), values of other kinds untouched, RULER's 7 by default."""
    for task in TASKS:
        for keys, values in KINDS + [("words", "words")]:
            s, s7 = make_sample(task, keys, values, 7, 2, digits), make_sample(task, keys, values, 7, 2)
            assert s7 == make_sample(task, keys, values, 7, 2, 7) and s == make_sample(task, keys, values, 7, 2, digits)
            found = re.findall(r"The special \w+ for (\S+) is (\S+)\.", " ".join(s.needles))
            number = rf"[1-9]\d{{{digits - 1}}}"
            assert all(re.fullmatch(number, k) for k, _ in found) == (keys == "numbers")
            assert all(re.fullmatch(number, v) for _, v in found) == (values == "numbers")
            assert len({x for kv in found for x in kv}) == len(s.needles) + TASKS[task][0]  # all distinct
            if keys != "numbers":
                assert s.asked == s7.asked and [k for k, _ in found] == [n.split()[4] for n in s7.needles]
            if values == "numbers":
                assert all(len(v) == digits for v in s.expected) and all(len(v) == 7 for v in s7.expected)
            elif keys != "numbers":
                assert s == s7


def test_score_is_the_fraction_of_values_found():
    assert score(" 7603393. The special", ["7603393"]) == 1.0
    assert score(" 760339. The special", ["7603393"]) == 0.0 and score("", ["7603393"]) == 0.0
    assert score(" 1111111, 2222222 and 3333333", ["1111111", "4444444", "3333333", "2222222"]) == 0.75
    assert score("Quiet-Otter", ["quiet-otter"]) == 1.0  # case aside, as RULER
    assert score("9dd1c6c8-0b3c-4c49-8a41-4e1e1ef1d7e2", ["9DD1C6C8-0B3C-4C49-8A41-4E1E1EF1D7E2", "x"]) == 0.5


# ------------------------------------------------------------------------------------------ the command line


@needs_ckpt
def test_real_model_end_to_end(tmp_path, capsys):
    """SmolLM2 with full attention at 2K tokens (inside its training length) finds a needle in prose."""
    out, table = tmp_path / "r.jsonl", tmp_path / "quality.md"
    argv = ["--ckpt", str(CKPT), "--tasks", "single", "--haystacks", "prose", "--lengths", "2K", "--depths", "0.5",
            "--attention", "full", "--max-new-tokens", "12", "--device", "cpu", "--dtype", "fp32",
            "--out", str(out), "--table", str(table)]
    assert niah.main(argv) == 0
    (r,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert (r["task"], r["haystack"], r["attention"], r["length_target"], r["depth"]) == ("single", "prose", "full", 2048, 0.5)
    assert 2048 - 8 < r["prompt_tokens"] <= 2048 and r["settings"]["max_new_tokens"] == 12
    assert r["expected"] == make_sample("single", "words", "numbers", 0, 0).expected
    assert abs(r["needle_at"][0] - r["prompt_tokens"] / 2) < 100
    assert r["score"] == score(r["answer"], r["expected"]) == 1.0, f"missed {r['expected']}: answered {r['answer']!r}"
    stdout, stderr = capsys.readouterr()
    row = f"| single | prose | words -> numbers | full | 2K ({r['prompt_tokens']} tok) | 100% | 100% (1) |"
    assert row in stdout and row in table.read_text() and "scripts/niah.py --ckpt" in table.read_text()
    assert stderr.count("sample 0: 100%") == 1


def test_cli_sweep_table_resume_and_plot(tiny_ckpt, tmp_path, capsys):
    out, table = tmp_path / "r.jsonl", tmp_path / "docs" / "quality.md"
    table.parent.mkdir()  # an output's folder must exist (tests/test_outputs.py)
    argv = ["--ckpt", str(tiny_ckpt), "--tasks", "single,multiquery", "--haystacks", "repeat,prose", "--lengths", "400,1K",
            "--depths", "0,1", "--samples", "2", "--attention", "infllm,full", "--full-max-length", "512",
            "--max-new-tokens", "4", "--device", "cpu",
            "--infllm", "n_init=8,n_local=64,block_size=16,topk=2,max_cached_block=4,exc_block_size=32,chunk_size=128",
            "--out", str(out), "--table", str(table)]
    assert niah.main(argv) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 2 * 2 * 2 * 2 * 2 * 2  # tasks x haystacks x lengths x depths x samples x modes
    skipped = [r for r in recs if r.get("skipped")]
    assert {(r["attention"], r["length_target"]) for r in skipped} == {("full", 1024)} and len(skipped) == 16
    ran = [r for r in recs if not r.get("skipped")]
    assert all(r["length_target"] - 8 < r["prompt_tokens"] <= r["length_target"] for r in ran)
    assert all(r["score"] == score(r["answer"], r["expected"]) for r in ran)
    assert all(len(r["expected"]) == {"single": 1, "multiquery": 4}[r["task"]] == len(r["asked"]) for r in recs)
    # A sample has the same needles at every length, depth, haystack and mode.
    assert len({(r["task"], r["sample"], tuple(r["expected"])) for r in recs}) == 4
    stdout, stderr = capsys.readouterr()
    assert stderr.count(" sample ") == len(ran)  # one progress line per trial that ran
    assert re.search(r"\| multiquery \| prose \| words -> numbers \| infllm \| 1K \(\d+(-\d+)? tok\) \| \d+% \| \d+% \| \d+% \(4\) \|", stdout)
    assert "| full | 1K" in stdout and "| skipped | skipped | skipped |" in stdout
    assert "| attention | 400 | 1K |" in stdout
    md = table.read_text()
    assert "scripts/niah.py --ckpt" in md and "| task | haystack | keys -> values | attention | length | depth 0 | depth 1 | mean |" in md

    # --resume runs nothing new; a third sample runs only the new trials; other settings run again.
    assert niah.main(argv + ["--resume"]) == 0
    assert out.read_text().count("\n") == len(recs)
    assert niah.main(argv + ["--resume", "--samples", "3"]) == 0
    assert out.read_text().count("\n") == len(recs) + len(recs) // 2
    assert "(6) |" in capsys.readouterr()[0]  # 2 depths x 3 samples per cell

    pytest.importorskip("matplotlib")
    assert niah.main(argv + ["--resume", "--plot", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_cli_digits_are_recorded_and_never_mixed(tiny_ckpt, tmp_path, capsys):
    """--digits 5 puts 5-digit values (the keys of the 7-digit run) into the records and their settings; a resumed
    sweep with other digits runs its own trials, and records from before --digits count as 7 digits."""
    out = tmp_path / "r.jsonl"
    argv = ["--ckpt", str(tiny_ckpt), "--tasks", "single,multivalue", "--haystacks", "repeat", "--lengths", "400",
            "--depths", "0.5", "--samples", "2", "--attention", "full", "--max-new-tokens", "2", "--device", "cpu",
            "--out", str(out)]
    assert niah.main(argv + ["--digits", "5"]) == 0
    five = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(five) == 4 and all(r["settings"]["digits"] == 5 for r in five)
    assert all(re.fullmatch(r"[1-9]\d{4}", v) for r in five for v in r["expected"])
    for r in five:
        assert r["asked"] == make_sample(r["task"], "words", "numbers", 0, r["sample"]).asked
        assert r["expected"] == make_sample(r["task"], "words", "numbers", 0, r["sample"], 5).expected
    capsys.readouterr()
    assert niah.main(argv + ["--resume"]) == 0  # 7 digits: four more trials, and a table of those alone
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 8 and [r["settings"]["digits"] for r in recs] == [5] * 4 + [7] * 4
    assert all(len(v) == 7 for r in recs[4:] for v in r["expected"])
    stdout, stderr = capsys.readouterr()
    assert stderr.count(" sample ") == 4 and stdout.count("| 400 (") == 2 and stdout.count("% (2) |") == 2

    # Records written before --digits (no digits in their settings) are 7-digit ones: nothing runs again.
    out.write_text("".join(json.dumps({**r, "settings": {k: v for k, v in r["settings"].items() if k != "digits"}})
                           + "\n" for r in recs[4:]))
    assert niah.main(argv + ["--resume"]) == 0
    assert out.read_text().count("\n") == 4 and capsys.readouterr()[1].count(" sample ") == 0


@pytest.mark.parametrize("args, words", [
    (["--tasks", "single,needle"], "unknown task 'needle'"),
    (["--haystacks", "essay"], "unknown haystack 'essay'"),
    (["--lengths", "4Q"], "bad length '4Q'"),
    (["--values", "emoji"], "unknown kind of value 'emoji'"),
    (["--attention", "dense"], "unknown attention mode 'dense'"),
    (["--depths", "2"], "outside [0, 1]"),
    (["--samples", "0"], "at least 1"),
    (["--digits", "0"], "--digits must be between 1 and 12, not 0"),
    (["--digits", "13"], "--digits must be between 1 and 12, not 13"),
])
def test_cli_errors(tmp_path, capsys, args, words):
    assert niah.main(["--ckpt", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and err.count("\n") == 1


def test_cli_too_short_a_length(tiny_ckpt, tmp_path, capsys):
    """Refused before any trial runs."""
    out = tmp_path / "r.jsonl"
    assert niah.main(["--ckpt", str(tiny_ckpt), "--tasks", "single,multivalue", "--lengths", "90,4K", "--device", "cpu",
                      "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: length 90 is too short: the prompts need at least \d+ tokens\n", err)
    assert not out.exists()  # opened with the first trial: an earlier --out would be left as it was


@pytest.mark.parametrize("script", ["niah", "needle_units"])
def test_help_shows_the_whole_description(script, capsys):
    """The description is the docstring's first paragraph, whole: not its first line, which ends mid-sentence."""
    module = __import__(script)
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0
    first = " ".join(module.__doc__.split("\n\n")[0].split())
    assert first.endswith(".") and first in " ".join(capsys.readouterr().out.split())


def test_cli_missing_checkpoint_exits_2(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "niah.py"), "--ckpt", str(tmp_path / "nope")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "does not exist" in r.stderr
