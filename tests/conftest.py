"""Fixtures shared by the test files."""
import json
import shutil
from pathlib import Path

import pytest

CKPT = Path(__file__).resolve().parents[1] / "checkpoints" / "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A 2-layer random model with SmolLM2's tokenizer: the CLI's plumbing, not its answers."""
    if not (CKPT / "tokenizer.json").exists():
        pytest.skip("run `python scripts/prepare_test_model.py` first")
    from safetensors.torch import save_file

    from model import checkpoint_state, random_model, read_config

    d = tmp_path_factory.mktemp("tiny")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (CKPT / f).exists():
            shutil.copy(CKPT / f, d / f)
    cfg = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "rms_norm_eps": 1e-5,
           "rope_theta": 10000.0, "max_position_embeddings": 512, "vocab_size": 49152,
           "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}
    (d / "config.json").write_text(json.dumps(cfg))
    model = random_model(read_config(d))
    state = {k: v.contiguous() for k, v in checkpoint_state(model).items() if k != "lm_head.weight"}
    save_file(state, str(d / "model.safetensors"))
    return d
