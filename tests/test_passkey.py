"""scripts/passkey.py: the prompt builder against tokenizing the whole text, one real passkey beyond
SmolLM2's training length, the CLI's plumbing on a tiny random model, and its errors."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import passkey  # noqa: E402
from passkey import INSTRUCTION, QUESTION, build_prompt, found, layout, prompt_text  # noqa: E402

CKPT = ROOT / "checkpoints" / "smollm2-135m-instruct"
needs_tokenizer = pytest.mark.skipif(not (CKPT / "tokenizer.json").exists(),
                                     reason="run `python scripts/prepare_test_model.py` first")
needs_ckpt = pytest.mark.skipif(not (CKPT / "model.safetensors").exists(),
                                reason="run `python scripts/prepare_test_model.py` first")


@pytest.fixture(scope="module")
def tok():
    from tokenizer import load_tokenizer
    return load_tokenizer(CKPT)


@needs_tokenizer
@pytest.mark.parametrize("length", [700, 4096, 12 * 1024])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_prompt_length_depth_and_ids(tok, length, depth):
    key = 40917
    ids = build_prompt(tok, length, depth, key)
    a, b = layout(tok, length, depth, key)
    text = prompt_text(a, b, key)
    assert ids == tok.encode(text, bos=True)  # assembled by ids == tokenizing the whole text
    assert tok.decode(ids) == text and text.startswith(INSTRUCTION) and text.endswith(QUESTION)
    assert length - len(passkey.pieces(tok).filler) < len(ids) <= length  # one filler group short at most
    # The key sits after round(depth * groups) groups: 0 right after the instruction, 1 right before the question.
    at = text.index("The pass key is 40917.")
    haystack = len(text) - len(INSTRUCTION) - len(QUESTION) - len(passkey.KEY.format(key=key))  # filler only
    assert abs((at - len(INSTRUCTION)) / haystack - depth) <= 0.5 / (a + b)  # within half a filler group
    if depth == 0:
        assert text[len(INSTRUCTION):].startswith("The pass key is 40917. Remember it. 40917 is the pass key. The grass")
    if depth == 1:
        assert text.endswith("40917 is the pass key. " + QUESTION)


@needs_tokenizer
def test_prompt_without_bos_and_as_measured(tok):
    """SmolLM2 gets no BOS; the filler group is the measured one (25 tokens on its own, 24 inside the text)."""
    ids = build_prompt(tok, 1000, 0.5, 12345)
    assert ids[0] != 1 and tok.bos_id is None
    assert len(tok.encode(passkey.FILLER)) == 25
    assert tok.decode(ids).count("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ") \
        == sum(layout(tok, 1000, 0.5, 12345))


@needs_tokenizer
def test_chat_prompt_ids(tok):
    wrap = passkey.chat_wrap(CKPT, tok)
    assert wrap == ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n")
    ids = build_prompt(tok, 3000, 0.25, 99999, wrap)
    assert ids == tok.encode(prompt_text(*layout(tok, 3000, 0.25, 99999, wrap), 99999, wrap), bos=True)
    assert len(ids) <= 3000


@needs_tokenizer
def test_too_short_a_length_is_refused(tok):
    with pytest.raises(passkey.UsageError):
        build_prompt(tok, 50, 0.5, 12345)


def test_found_and_keys():
    assert found(" 12345. Remember it.", 12345) and not found(" 1234 5", 12345) and not found("", 12345)
    keys = passkey.trial_keys(7, 5)
    assert keys == passkey.trial_keys(7, 5) and keys[:3] == passkey.trial_keys(7, 3)
    assert all(10000 <= k <= 99999 for k in keys) and keys != passkey.trial_keys(8, 5)
    assert [passkey.parse_length(s) for s in ("4K", "12k", "1M", "3000")] == [4096, 12288, 1024 ** 2, 3000]


@needs_ckpt
def test_infllm_finds_the_key_beyond_training_length(tok):
    """About 12K tokens (SmolLM2 was trained on 8K), InfLLM with the defaults of INFLLM.md, fp32 on CPU."""
    from infllm import InfLLMConfig
    from reader import load

    model, tok = load(CKPT, "cpu", torch.float32)
    key = passkey.trial_keys(0, 1)[0]
    ids = build_prompt(tok, 12 * 1024, 0.5, key)
    assert len(ids) > model.args.max_seq_len
    r = passkey.run_trial(model, tok, ids, key, "infllm", InfLLMConfig(), torch.device("cpu"))
    assert r["found"], f"InfLLM missed the key {key} at {len(ids)} tokens: answered {r['answer']!r}"
    assert r["hit_rate"] is not None


# ------------------------------------------------------------------------------------- the command line


def test_cli_sweep_table_resume_and_plot(tiny_ckpt, tmp_path, capsys):
    out, table = tmp_path / "r.jsonl", tmp_path / "docs" / "passkey.md"
    table.parent.mkdir()  # an output's folder must exist (tests/test_outputs.py)
    argv = ["--ckpt", str(tiny_ckpt), "--lengths", "300,1K", "--depths", "0,1", "--depths-stream", "0.5",
            "--trials", "2", "--attention", "infllm,stream,full", "--full-max-length", "512", "--device", "cpu",
            "--infllm", "n_init=8,n_local=64,block_size=16,topk=2,max_cached_block=4,exc_block_size=32,chunk_size=128",
            "--out", str(out), "--table", str(table)]
    assert passkey.main(argv) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    # infllm: 2 lengths x 2 depths x 2 trials; stream: 2 x 1 x 2; full: 2 x 2 x 2 with the 1K ones skipped.
    assert len(recs) == 8 + 4 + 8
    assert {(r["attention"], r["depth"]) for r in recs if r["attention"] == "stream"} == {("stream", 0.5)}
    assert all(r.get("skipped") and r["found"] is None for r in recs if r["attention"] == "full" and r["length_target"] == 1024)
    ran = [r for r in recs if not r.get("skipped")]
    assert all(r["prompt_tokens"] <= r["length_target"] and isinstance(r["found"], bool) for r in ran)
    assert all(set(r) >= {"attention", "length_target", "prompt_tokens", "depth", "trial", "key", "found", "answer",
                          "seconds", "hit_rate", "settings"} for r in recs)
    assert len({r["key"] for r in recs}) == 2  # one key per trial, shared by modes, lengths and depths
    assert any(r["hit_rate"] is not None for r in ran if r["attention"] == "infllm" and r["length_target"] == 1024)
    stdout, stderr = capsys.readouterr()
    assert "| infllm | 1K" in stdout and re.search(r"\| full \| 1K \(\d+ tok\) \| skipped", stdout)
    assert stderr.count("trial") == len(ran)  # one progress line per trial that ran
    md = table.read_text()
    assert "scripts/passkey.py --ckpt" in md and "| attention | length | depth 0 | depth 0.5 | depth 1 | total |" in md

    # --resume runs nothing new and keeps the file; a third trial runs only the new ones.
    assert passkey.main(argv + ["--resume"]) == 0
    assert out.read_text().count("\n") == len(recs)
    assert passkey.main(argv + ["--resume", "--trials", "3"]) == 0
    assert out.read_text().count("\n") == len(recs) + len(recs) // 2
    assert "/6 |" in capsys.readouterr()[0]  # totals over 2 depths x 3 trials

    pytest.importorskip("matplotlib")
    assert passkey.main(argv + ["--resume", "--plot", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 1000


@pytest.mark.parametrize("args, words", [
    (["--attention", "infllm,dense"], "unknown attention mode 'dense'"),
    (["--lengths", "4Q"], "bad length '4Q'"),
    (["--depths", "0.5,1.5"], "outside [0, 1]"),
    (["--infllm", "topk=x"], "needs an integer"),
    (["--trials", "0"], "at least 1"),
    (["--engine", "reference", "--compile"], "--engine fast"),
])
def test_cli_errors(tmp_path, capsys, args, words):
    assert passkey.main(["--ckpt", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and err.count("\n") == 1


def test_cli_missing_checkpoint_exits_2(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "passkey.py"), "--ckpt", str(tmp_path / "nope")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "does not exist" in r.stderr


def test_cli_compile_gives_the_same_answers(tiny_ckpt, tmp_path):
    """--compile keeps one set of compiled caches per mode for the whole sweep, reset between trials."""
    argv = ["--ckpt", str(tiny_ckpt), "--lengths", "300,600", "--depths", "0,1", "--attention", "infllm,full",
            "--device", "cpu", "--infllm", "n_init=8,n_local=64,block_size=16,topk=2,max_cached_block=4,exc_block_size=32,chunk_size=128",
            "--engine", "fast"]  # --compile is the engine's
    answers = {}
    for extra in ([], ["--compile"]):
        out = tmp_path / f"r{len(extra)}.jsonl"
        assert passkey.main(argv + extra + ["--out", str(out)]) == 0
        recs = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(recs) == 8 and all(r["settings"].get("compile", False) == bool(extra) for r in recs)
        answers[bool(extra)] = [(r["attention"], r["length_target"], r["depth"], r["answer"]) for r in recs]
    assert answers[True] == answers[False]
