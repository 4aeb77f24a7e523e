"""Tensor parallel with torch.distributed (gloo on CPU), launched by torchrun as a user would: the greedy
tokens of 2 and 3 processes equal those of one process, for full attention and for InfLLM with evictions."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generate
from model import checkpoint_state, load_model, random_model, read_config

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "checkpoints" / "smollm2-135m-instruct"
needs_ckpt = pytest.mark.skipif(not (CKPT / "model.safetensors").exists(),
                                reason="run `python scripts/prepare_test_model.py` first")
SMALL = "n_init=8,n_local=64,block_size=16,topk=2,max_cached_block=3,exc_block_size=32,chunk_size=96"
PROMPT = "The list. " + " ".join(f"item{i} is {i * 7 % 13}." for i in range(60)) + " What is item3? item3 is"


def torchrun(n, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
           str(ROOT / "generate.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def one_process(capsys, *args):
    assert generate.main([*map(str, args)]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def tiny3_ckpt(tiny_ckpt, tmp_path_factory):
    """tiny_ckpt's tokenizer with 6 query and 3 key-value heads: a model for 3 processes."""
    import shutil

    from safetensors.torch import save_file
    d = tmp_path_factory.mktemp("tiny3")
    for f in tiny_ckpt.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, d / f.name)
    cfg = {**json.loads((tiny_ckpt / "config.json").read_text()), "hidden_size": 48, "num_attention_heads": 6,
           "num_key_value_heads": 3, "intermediate_size": 96}
    (d / "config.json").write_text(json.dumps(cfg))
    model = random_model(read_config(d), seed=3)
    save_file({k: v.contiguous() for k, v in checkpoint_state(model).items() if k != "lm_head.weight"}, str(d / "model.safetensors"))
    return d


@pytest.mark.parametrize("attention, n, which, infllm", [
    pytest.param("infllm", 2, "tiny", SMALL, id="infllm-2-tiny"),
    pytest.param("infllm", 3, "tiny3", SMALL, id="infllm-3-tiny3"),
    pytest.param("full", 2, "tiny", SMALL, id="full-2-tiny"),
    pytest.param("full", 3, "tiny3", SMALL, id="full-3-tiny3"),
])
def test_processes_generate_what_one_process_does(tiny_ckpt, tiny3_ckpt, capsys, n, which, attention, infllm):
    ckpt = {"tiny": tiny_ckpt, "tiny3": tiny3_ckpt}[which]
    args = ["--ckpt", ckpt, "--prompt", PROMPT, "--device", "cpu", "--attention", attention, "--infllm", infllm,
            "--max-new-tokens", 8, "--json"]
    ref = one_process(capsys, *args)
    r = torchrun(n, *args)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, "only process 0 prints"
    got = json.loads(lines[0])
    assert got["processes"] == n and got["prompt_tokens"] == ref["prompt_tokens"] > 6 * 64
    assert got["text"] == ref["text"] and got["new_tokens"] == ref["new_tokens"] == 8
    # The same units selected on every process as in one: the same unit-cache hits and misses.
    assert got["unit_cache_hit_rate"] == ref["unit_cache_hit_rate"]



def test_compiled_processes_generate_what_one_process_does(tiny_ckpt, capsys, tmp_path):
    """--compile under torchrun: the all-reduces sit between the compiled pieces (the layers' norms and MLP,
    the piece step), each process compiles its own share's shapes; the same tokens and selections."""
    args = ["--ckpt", tiny_ckpt, "--prompt", PROMPT, "--device", "cpu", "--infllm", SMALL, "--max-new-tokens", 8, "--json",
            "--engine", "fast"]  # --compile is the engine's
    ref = one_process(capsys, *args)
    r = torchrun(2, *args, "--compile", "--compile-cache", tmp_path)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["compiled"] and got["processes"] == 2 and got["prompt_tokens"] == ref["prompt_tokens"]
    assert got["text"] == ref["text"] and got["unit_cache_hit_rate"] == ref["unit_cache_hit_rate"]

@pytest.mark.parametrize("n, which", [(2, "tiny"), (3, "tiny3")])
def test_decoding_ahead_on_processes_equals_one_process(tiny_ckpt, tiny3_ckpt, n, which):
    """decode_ahead (each greedy token chosen and fed on the device, a stop token fed as padding and taken back)
    under tensor parallel, in FixedShapes' pieces as a GPU replays them: every process takes the same tokens and
    stops at the same one, so the answers, positions and statistics equal one process's."""
    ckpt = {"tiny": tiny_ckpt, "tiny3": tiny3_ckpt}[which]
    worker = ROOT / "tests" / "tp_decode_worker.py"
    args = [str(ckpt), PROMPT, SMALL]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(worker), *args], capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert one.returncode == 0, one.stderr
    many = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                           str(worker), *args], capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert many.returncode == 0, many.stderr
    a, b = json.loads(one.stdout), json.loads(many.stdout)
    assert a == b
    assert len(a["free"]) == 8 and a["stopped"] == a["free"][:a["free"].index(a["stop"])]
    assert a["pos"] == [a["pos_d"][0]] * len(a["pos"])  # the host's count took the stop token back
    assert a["stats"]["misses"] > 0


@needs_ckpt
def test_smollm2_on_three_processes_and_refused_on_two(capsys):
    args = ["--ckpt", CKPT, "--prompt", PROMPT, "--device", "cpu", "--infllm", SMALL, "--max-new-tokens", 8, "--json"]
    ref = one_process(capsys, *args)
    r = torchrun(3, *args)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["text"] == ref["text"] and got["unit_cache_hit_rate"] == ref["unit_cache_hit_rate"] is not None
    r = torchrun(2, *args)
    assert r.returncode != 0 and r.stdout == ""
    said = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(said) == 2 and len(set(said)) == 1, r.stderr  # every process, one sentence
    assert "3 key-value heads" in said[0] and "divides 3" in said[0]


@needs_ckpt
def test_each_process_loads_its_slices():
    full = load_model(CKPT, dtype=torch.float32)
    for rank in range(3):
        part = load_model(CKPT, dtype=torch.float32, rank=rank, world=3)
        assert part.args.n_kv_heads == 1 and part.args.n_heads == 3 and part.args.tp_size == 3
        a, b = checkpoint_state(part), checkpoint_state(full)  # under the checkpoint's names
        rows = slice(rank * 192, (rank + 1) * 192)
        at = "layers.7.self_attn.", "layers.7.mlp."
        assert torch.equal(a[at[0] + "q_proj.weight"], b[at[0] + "q_proj.weight"][rows])
        assert torch.equal(a[at[0] + "k_proj.weight"], b[at[0] + "k_proj.weight"][rank * 64:(rank + 1) * 64])
        assert torch.equal(a[at[0] + "o_proj.weight"], b[at[0] + "o_proj.weight"][:, rows])
        assert torch.equal(a[at[1] + "up_proj.weight"], b[at[1] + "up_proj.weight"][rank * 512:(rank + 1) * 512])
        assert torch.equal(a[at[1] + "down_proj.weight"], b[at[1] + "down_proj.weight"][:, rank * 512:(rank + 1) * 512])
        assert torch.equal(part.embed_tokens.weight, full.embed_tokens.weight)


def test_snapshots_are_refused_under_tensor_parallel(tiny_ckpt, tmp_path):
    r = torchrun(2, "--ckpt", tiny_ckpt, "--prompt", "hi", "--device", "cpu", "--save-memory", tmp_path / "m.mem")
    assert r.returncode != 0 and not (tmp_path / "m.mem").exists()
    assert sum(line.startswith("error: ") and "tensor parallel" in line for line in r.stderr.splitlines()) == 2


@needs_ckpt
def test_passkey_sweep_on_three_processes_answers_as_one(tmp_path):
    """scripts/passkey.py under torchrun: the same answers, one results file (written by process 0)."""
    args = ["--ckpt", CKPT, "--lengths", "1K", "--depths", "0.5", "--trials", "1", "--attention", "infllm",
            "--infllm", SMALL.replace("n_local=64", "n_local=128"), "--device", "cpu"]
    script = str(ROOT / "scripts" / "passkey.py")
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, script, *map(str, args), "--out", tmp_path / "one.jsonl"],
                         capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert one.returncode == 0, one.stderr
    three = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
                            script, *map(str, args), "--out", tmp_path / "three.jsonl"],
                           capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert three.returncode == 0, three.stderr
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.jsonl", "three.jsonl"))
    assert a["answer"] == b["answer"] and a["prompt_tokens"] == b["prompt_tokens"]
    # Selections are equal up to the order of a floating-point sum (the scores add over processes): over a
    # thousand tokens, a near tie may go the other way and change a hit or two.
    assert abs(a["hit_rate"] - b["hit_rate"]) < 0.01
    assert three.stdout.count("| infllm |") == 1  # the table, printed once
