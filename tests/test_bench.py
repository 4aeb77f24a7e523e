"""scripts/bench.py on a CPU with a small shape: the CI smoke test of the benchmark's plumbing."""
import functools
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import bench  # noqa: E402

SMALL_INFLLM = "n_init=8,n_local=64,block_size=16,topk=2,max_cached_block=4,exc_block_size=32,chunk_size=128"


def test_bench_reports_each_length(capsys):
    argv = ["--shape", "tiny", "--lengths", "300,1K", "--decode", "3", "--repeats", "2", "--device", "cpu",
            "--json", "--infllm", SMALL_INFLLM]
    assert bench.main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["length"] for r in rows] == [300, 1024]
    for r in rows:
        assert r["attention"] == "infllm" and len(r["prefill_tok_s_all"]) == len(r["decode_tok_s_all"]) == 2
        assert min(r["prefill_tok_s_all"]) <= r["prefill_tok_s"] <= max(r["prefill_tok_s_all"])
        assert r["decode_tok_s"] > 0 and r["peak_gpu_gib"] is None and r["peak_rss_gib"] > 0
        assert 0 <= r["hit_rate"] <= 1  # units were made (past n_local) and looked up
    assert bench.main(argv[:4] + ["--attention", "full", "--repeats", "1", "--device", "cpu", "--json"]) == 0
    full = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["length"] for r in full] == [300, 1024]
    assert all(r["attention"] == "full" and r["hit_rate"] is None and r["decode_tok_s"] > 0 for r in full)
    # The reference (generate.py --engine reference) measured the same way.
    assert bench.main(argv[:4] + ["--kernel", "reference", "--repeats", "1", "--device", "cpu", "--json",
                                  "--infllm", SMALL_INFLLM]) == 0
    ref = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["length"] for r in ref] == [300, 1024] and all(0 <= r["hit_rate"] <= 1 for r in ref)


def test_bench_bad_length_is_one_sentence():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--lengths", "12Q", "--device", "cpu"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "12Q" in r.stderr


def test_bench_profile_prints_the_prefill_tail_and_decoding(capsys):
    """--profile traces only a prefill's last tokens (the rest fed unprofiled into the same caches) and 16
    decoding steps: both tables come out, the tail's with the operators of a forward in it."""
    import torch

    import engine
    from engine.graphs import forward_fn
    from infllm import InfLLMConfig
    from model import random_model
    model = random_model(bench.SHAPES["tiny"])
    caches = engine.make_caches(model, "infllm", InfLLMConfig.parse(SMALL_INFLLM), "blocked")
    bench.profile(model, caches, forward_fn(model, caches), 128, 700, torch.device("cpu"), tail=300)
    out = capsys.readouterr().out
    assert "== prefill of the last 300 tokens ==" in out and "== 16 decoding steps ==" in out
    assert out.count("aten::matmul") >= 2  # the projections: a row in each table
    assert caches[0].pos == 700 + 16 - 1  # head, tail, then 16 steps (the first from the tail's logits)


def kernel_rows(piece, step, warm_s):
    """Rows of scripts/kernel_bench.py for one kernel: (kernel ms, compiled spec ms) a piece and a step."""
    return [{"step": phase, "kernel_graph_ms": k, "kernel_eager_ms": 9.0, "spec_graph_ms": s, "spec_eager_ms": 9.0,
             "spec_warm_s": warm_s / 2} for phase, (k, s) in (("piece", piece), ("step", step))]


def test_kernel_bench_verdicts_follow_issue_34s_rule():
    """A kernel stays where it is 1.2x its compiled spec on a piece or a step, or where the spec's compile costs a
    fresh process more than the spec saves it; else it goes. (256 pieces and 128 steps through 32 layers.)"""
    import kernel_bench
    verdict = functools.partial(kernel_bench.verdict, n_layers=32, pieces=256, steps=128)
    why, saved, _ = verdict(kernel_rows((1.0, 1.1), (0.010, 0.013), warm_s=0.5))  # 1.3x on a step
    assert why.startswith("stays: 1.30x") and saved > 0
    why, saved, _ = verdict(kernel_rows((1.0, 1.1), (0.010, 0.011), warm_s=0.5))  # 1.1x: the spec is slower
    assert why.startswith("stays: 1.10x") and "save it 0.00 s" in why
    why, saved, _ = verdict(kernel_rows((1.0, 0.9), (0.010, 0.010), warm_s=0.5))  # the spec saves 0.82 s > 0.5 s
    assert why.startswith("goes") and abs(saved + 0.8192) < 1e-9
    why, _, compile_s = verdict(kernel_rows((1.0, 0.9), (0.010, 0.010), warm_s=2.0))  # ... < 2 s of compiling
    assert why.startswith("stays") and compile_s == 2.0


def test_kernel_bench_records_and_times_on_a_cpu(tmp_path, capsys):
    """scripts/kernel_bench.py's plumbing on a CPU (the specs stand in for the Triton kernels): the calls of a
    piece and a decoding step are recorded from a real run, each replayed from its recorded state and timed beside
    its compiled spec; the table has a row a kernel and step. (tests/test_gpu.py runs it with the kernels.)"""
    import kernel_bench
    out = tmp_path / "kernels.jsonl"
    kernel_bench.main(["--shape", "tiny", "--tokens", "5K", "--layers", "1", "--reps", "2",
                       "--only", "select_top,retire", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["kernel"], r["step"]) for r in rows} == {(k, s) for k in ("select_top", "retire")
                                                        for s in ("piece", "step")}
    assert all(r["kernel_eager_ms"] > 0 and r["spec_eager_ms"] > 0 and r["spec_cold_s"] > 0 and
               r["kernel_graph_ms"] is None for r in rows)
    table = capsys.readouterr().out
    assert table.count("| select_top |") == 2 and table.count("| retire |") == 2 and "gather_from_host" in table
