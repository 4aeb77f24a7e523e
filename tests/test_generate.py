"""generate.py end to end: the real SmolLM2 checkpoint against transformers, and the CLI's errors."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "checkpoints" / "smollm2-135m-instruct"
needs_ckpt = pytest.mark.skipif(not (CKPT / "model.safetensors").exists(),
                                reason="run `python scripts/prepare_test_model.py` first")


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


@needs_ckpt
def test_greedy_full_attention_equals_transformers():
    transformers = pytest.importorskip("transformers")
    from tokenizer import chat_prompt, load_tokenizer

    question = "Name three colours of the rainbow and say which one is between the other two."
    r = cli("--ckpt", CKPT, "--prompt", question, "--chat", "--attention", "full", "--max-new-tokens", 20,
            "--json", "--device", "cpu", "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    ours = json.loads(r.stdout)

    tok = load_tokenizer(CKPT)
    ids = tok.encode(chat_prompt(CKPT, tok, question), bos=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(CKPT, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=tok.eos_ids,
                          pad_token_id=tok.eos_ids[0])
    ref = [t for t in out[0, len(ids):].tolist() if t not in tok.eos_ids]
    assert ours["prompt_tokens"] == len(ids)
    assert ours["text"] == tok.decode(ref)
    assert ours["new_tokens"] == len(ref) and len(ref) > 5
    for key in ("prefill_s", "peak_rss_gib"):
        assert ours[key] > 0
    assert ours["prefill_tok_s"] is None  # a prompt shorter than one chunk: no prefill speed
    assert 0 <= ours["reserve_s"] < ours["prefill_s"]
    assert ours["peak_gpu_gib"] is None and ours["warmup_s"] is None  # no CUDA graphs on a CPU


@needs_ckpt
def test_streamed_text_and_reproducible_sampling():
    args = ["--ckpt", CKPT, "--prompt", "Write a short poem about the sea.", "--chat", "--max-new-tokens", 12,
            "--temperature", 0.9, "--top-k", 40, "--device", "cpu", "--no-progress"]
    a, b = cli(*args, "--seed", 3), cli(*args, "--seed", 3)
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout.strip()
    assert "prompt tokens" in a.stderr and "tok/s" in a.stderr


@needs_ckpt
def test_long_prompt_with_full_attention_warns(tmp_path):
    # The same weights, told they were trained on 64 tokens: a 100-token prompt is then "too long".
    ckpt = tmp_path / "short"
    ckpt.mkdir()
    for f in CKPT.iterdir():
        (ckpt / f.name).symlink_to(f)
    cfg = json.loads((CKPT / "config.json").read_text())
    (ckpt / "config.json").unlink()
    (ckpt / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 64}))
    r = cli("--ckpt", ckpt, "--prompt", "The grass is green. " * 20, "--attention", "full", "--max-new-tokens", 1,
            "--json")
    assert r.returncode == 0, r.stderr
    assert "trained on" in r.stderr and "--attention infllm" in r.stderr
    assert json.loads(r.stdout)["prompt_tokens"] > 64


@pytest.mark.parametrize("case, words", [
    ("missing-prompt-file", "does not exist"),
    ("empty-prompt", "empty"),
    ("not-utf8", "not UTF-8"),
    ("missing-ckpt", "does not exist"),
    ("cuda", "no CUDA"),
    ("bad-knob", "exc_block_size"),
    ("no-config", "config.json"),
])
def test_bad_input_is_one_sentence(tmp_path, case, words):
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    empty_ckpt = tmp_path / "ckpt"
    empty_ckpt.mkdir()
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    ckpt = CKPT if CKPT.exists() else empty_ckpt
    args = {
        "missing-prompt-file": ["--ckpt", ckpt, "--prompt-file", tmp_path / "nope.txt"],
        "empty-prompt": ["--ckpt", ckpt, "--prompt-file", tmp_path / "empty.txt"],
        "not-utf8": ["--ckpt", ckpt, "--prompt-file", tmp_path / "latin1.txt"],
        "missing-ckpt": ["--ckpt", tmp_path / "nowhere", "--prompt", "hi"],
        "cuda": ["--ckpt", ckpt, "--prompt", "hi", "--device", "cuda"],
        "bad-knob": ["--ckpt", ckpt, "--prompt", "hi", "--infllm", "exc_block_size=8192"],
        "no-config": ["--ckpt", empty_ckpt, "--prompt", "hi"],
    }[case]
    r = cli(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], r.stderr
    assert r.stdout == ""


@needs_ckpt
def test_infllm_answers_the_bundled_long_prompt():
    """The README's prompt: 12K tokens, past the 8K the model was trained on, with the answer 90% of the
    way back from the question. (Full attention answers garbage there, StreamingLLM a made-up number.)"""
    r = cli("--ckpt", CKPT, "--prompt-file", ROOT / "prompts" / "logbook.txt", "--attention", "infllm",
            "--max-new-tokens", 6, "--json", "--device", "cpu", timeout=1800)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["prompt_tokens"] > 12000
    assert "31874" in out["text"], out["text"]


SMALL_INFLLM = "n_init=8,n_local=64,block_size=16,topk=2,max_cached_block=4,exc_block_size=32,chunk_size=128"


def test_compile_generates_the_same_tokens(tiny_ckpt, capsys):
    """--compile (compiled layers and chunk step; on a CPU no CUDA graphs) generates what the eager path
    does, over a prompt long enough to make memory units and look them up."""
    import generate
    prompt = " ".join(f"word{i}" for i in range(200))
    argv = ["--ckpt", str(tiny_ckpt), "--prompt", prompt, "--max-new-tokens", "6", "--json", "--device", "cpu",
            "--infllm", SMALL_INFLLM, "--engine", "fast"]  # --compile is the engine's
    runs = []
    for extra in ([], ["--compile"]):
        assert generate.main(argv + extra) == 0
        runs.append(json.loads(capsys.readouterr().out))
    assert runs[0]["text"] == runs[1]["text"] and runs[0]["new_tokens"] == runs[1]["new_tokens"] >= 1
    assert runs[0]["prompt_tokens"] > 3 * 64 and runs[1]["unit_cache_hit_rate"] is not None


EVICTING = "n_init=4,n_local=32,block_size=8,topk=2,max_cached_block=3,exc_block_size=8,chunk_size=24"


def test_reference_and_engine_give_the_same_answer(tiny_ckpt, capsys):
    """--engine reference (infllm.py) and --engine fast (engine/) on a CPU: the same greedy tokens and the same
    unit-cache hits over a prompt that makes units, evicts them from the pool and looks them up."""
    import generate
    prompt = " ".join(f"word{i}" for i in range(80))
    argv = ["--ckpt", str(tiny_ckpt), "--prompt", prompt, "--max-new-tokens", "8", "--json", "--device", "cpu",
            "--infllm", EVICTING]
    runs = {}
    for which in ("reference", "fast"):
        assert generate.main(argv + ["--engine", which]) == 0
        runs[which] = json.loads(capsys.readouterr().out)
    ref, fast = runs["reference"], runs["fast"]
    assert ref["engine"] == "reference" and fast["engine"] == "fast"
    assert ref["prompt_tokens"] == fast["prompt_tokens"] > 4 * 32
    assert ref["text"] == fast["text"] and ref["new_tokens"] == fast["new_tokens"] == 8
    assert ref["unit_cache_hit_rate"] == fast["unit_cache_hit_rate"] is not None and ref["unit_cache_hit_rate"] < 1
    assert generate.main(argv) == 0  # a CPU's default: the reference
    assert json.loads(capsys.readouterr().out)["engine"] == "reference"


@pytest.mark.parametrize("extra", [["--infllm", "unit_dtype=fp8"], ["--compile"]], ids=["fp8", "compile"])
def test_the_reference_refuses_what_only_the_engine_does(tiny_ckpt, capsys, monkeypatch, extra):
    """fp8 units and --compile live in the engine: --engine reference says so in one sentence, before any prefill."""
    import generate
    import reader

    def no_prefill(*args, **kwargs):
        raise AssertionError("the prefill ran")
    monkeypatch.setattr(reader, "prefill", no_prefill)
    argv = ["--ckpt", str(tiny_ckpt), "--prompt", "hi", "--device", "cpu", "--engine", "reference", *extra]
    assert generate.main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and lines[0].startswith("error: ") and "--engine fast" in lines[0], err


@pytest.mark.parametrize("args, words", [
    (["--temperature", "-0.5"], "--temperature must be 0 (greedy) or more, not -0.5"),
    (["--temperature", "nan"], "--temperature must be 0 (greedy) or more, not nan"),
    (["--top-k", "0"], "--top-k must be at least 1"),
    (["--top-k", "-3", "--temperature", "0.7"], "--top-k must be at least 1"),
])
def test_bad_sampling_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch, args, words):
    import generate
    import reader

    def loaded(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(reader, "load", loaded)
    assert generate.main(["--ckpt", str(tmp_path), "--prompt", "hi", *args]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err


def test_bad_sampling_in_python_is_one_sentence_before_any_work(tiny_ckpt, monkeypatch):
    import reader
    r = reader.Reader(tiny_ckpt, "cpu", "fp32", "infllm", SMALL_INFLLM, progress=False)
    r.read("a short document")
    fed = r.tokens

    def feed(*a, **k):
        raise AssertionError("the question was fed")
    monkeypatch.setattr(r, "feed", feed)
    with pytest.raises(reader.UsageError, match=r"^temperature must be 0 \(greedy\) or more, not -1$"):
        r.ask("\nWhy?", 4, temperature=-1)
    with pytest.raises(reader.UsageError, match=r"^top_k must be at least 1 .*, not 0$"):
        r.ask("\nWhy?", 4, temperature=0.8, top_k=0)
    assert r.tokens == fed
    with pytest.raises(reader.UsageError, match="top_k must be at least 1"):
        reader.sample(torch.zeros(10), 1.0, top_k=0)
    with pytest.raises(ValueError, match="temperature must be"):  # UsageError is a ValueError
        reader.sample(torch.zeros(10), float("nan"))


def test_the_report_gives_the_figures_that_mean_something(tiny_ckpt, tmp_path, capsys):
    """No first token's time where no token came (--max-new-tokens 0), no prefill speed for a prompt shorter
    than one chunk (a question), in the text report and in --json (null)."""
    import generate
    doc = " ".join(f"word{i}" for i in range(200))  # more than one chunk of SMALL_INFLLM's 128 tokens
    base = ["--ckpt", str(tiny_ckpt), "--device", "cpu", "--infllm", SMALL_INFLLM]
    save = base + ["--prompt", doc, "--save-memory", str(tmp_path / "doc.mem"), "--max-new-tokens"]
    ask = base + ["--load-memory", str(tmp_path / "doc.mem"), "--prompt", " word7", "--max-new-tokens", "2"]
    runs = {}
    for name, argv in (("read", save + ["0"]), ("read and answer", save + ["2"]), ("ask", ask)):
        assert generate.main(argv + ["--json"]) == 0
        runs[name] = json.loads(capsys.readouterr().out)
        assert generate.main(argv + ["--no-progress"]) == 0
        runs[name]["report"] = capsys.readouterr().err
    read, both, ask = runs["read"], runs["read and answer"], runs["ask"]
    assert read["new_tokens"] == 0 and read["first_token_s"] is None
    assert "first token after" not in read["report"]
    assert both["new_tokens"] == 2 and both["first_token_s"] > 0 and "first token after" in both["report"]
    assert read["prompt_tokens"] > 128 and read["prefill_tok_s"] > 0
    assert re.search(r"prefill \d+\.\d\d s \(\d+ tok/s\)", read["report"]), read["report"]
    assert 0 < ask["prompt_tokens"] < 128 and ask["prefill_tok_s"] is None
    assert re.search(r"prefill \d+\.\d\d s, 2 new tokens", ask["report"]), ask["report"]
