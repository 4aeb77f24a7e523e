"""scripts/needle_units.py: which unit holds a token, and the ranks it reads from the last lookup, against the
float64 oracle of INFLLM.md (tests/dense_infllm.py), which keeps every token's unit and every selection. The ranks
come from the engine's caches, which keep each lookup's scores."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine  # noqa: E402
from dense_infllm import DenseInfLLM  # noqa: E402
from needle_units import head_scores, main, needle_units, ranks, unit_of  # noqa: E402
from test_infllm import SMALL, model64, run, tokens  # noqa: E402,F401


@pytest.mark.parametrize("kernel", ["plain", "blocked"])
def test_units_and_ranks_agree_with_the_oracle(model64, kernel):  # noqa: F811
    prompt, dec = tokens(150, 5), tokens(5, 6)
    caches = engine.make_caches(model64, "infllm", SMALL, kernel=kernel)
    for c in caches:
        c.units.last = {}
    oracles = [DenseInfLLM(SMALL, model64.rope.inv_freq) for _ in caches]
    run(model64, caches, prompt, SMALL.chunk_size, dec)
    run(model64, oracles, prompt, SMALL.chunk_size, dec)
    # every token the oracle put in a unit is in the unit unit_of names; init tokens in none
    state = oracles[0].state
    assert any(isinstance(s, int) for s in state) and "init" in state
    for p, s in enumerate(state):
        if isinstance(s, int):
            assert unit_of(p, SMALL) == s
        elif s == "init":
            assert unit_of(p, SMALL) is None
    # the topk units by the ranks read from the last lookup are the ones the oracle's last lookup selected
    n = caches[0].units.count
    assert n > SMALL.topk
    for layer, oracle in zip(ranks(caches, list(range(n))), oracles):
        assert sorted(u for u, r in enumerate(layer) if r <= SMALL.topk) == oracle.selections[-1]


def test_head_scores_add_up_to_the_lookup(model64):  # noqa: F811
    """Each head's share, summed over heads, is the score the last (one-token) lookup ranked units by."""
    cfg = SMALL
    caches = engine.make_caches(model64, "infllm", cfg, kernel="blocked")
    for c in caches:
        c.units.last = {}
    run(model64, caches, tokens(150, 7), cfg.chunk_size, tokens(2, 8))
    for c in caches:
        n = c.units.count
        assert n > cfg.topk
        torch.testing.assert_close(head_scores(c.units).sum(dim=1), c.units.last["scores"][:n].double())


def test_needle_split_by_a_cut_is_in_two_units():
    c = SMALL  # n_init 4, block 8: units start at 4, 12, 20, ...
    assert needle_units(10, 4, c) == [0, 1]
    assert needle_units(12, 8, c) == [1]
    assert needle_units(0, 3, c) == []


def test_cli_traces_a_short_prompt(capsys):
    ckpt = Path(__file__).resolve().parents[1] / "checkpoints" / "smollm2-135m-instruct"
    if not (ckpt / "model.safetensors").exists():
        pytest.skip("run `python scripts/prepare_test_model.py` first")
    small = "n_init=16,n_local=256,block_size=32,topk=2,max_cached_block=4,exc_block_size=64,chunk_size=256"
    assert main(["--ckpt", str(ckpt), "--haystack", "repeat", "--length", "700", "--depth", "0.1",
                 "--steps", "2", "--infllm", small, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["needle_units"] and len(r["ranks"]) == 3  # the prompt's last token, then 2 decoding steps
    assert all(len(step) == 30 for step in r["ranks"])
    for key in ("ranks", "head_ranks"):
        assert all(1 <= x <= r["stored_units"] for step in r[key] for layer in step for x in layer if x is not None)
    assert all(len(layer) == 9 for step in r["head_ranks"] for layer in step)  # SmolLM2's query heads


def test_cli_refuses_a_bad_depth(capsys, tmp_path):
    assert main(["--ckpt", str(tmp_path), "--depth", "2"]) == 2
    assert "--depth" in capsys.readouterr().err
