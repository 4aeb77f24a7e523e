"""model.py against Hugging Face transformers (the independent oracle) on random weights, fp32."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from infllm import make_caches  # noqa: E402
from model import CheckpointError, load_model  # noqa: E402

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

FAMILIES = {
    "llama2": lambda: transformers.LlamaConfig(**{**SMALL, "num_key_value_heads": 4}, rope_theta=10000.0),
    "llama3.1": lambda: transformers.LlamaConfig(**SMALL, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}),
    "mistral": lambda: transformers.MistralConfig(**SMALL, rope_theta=1e6, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, rope_theta=1e6),
    "tied": lambda: transformers.LlamaConfig(**SMALL, tie_word_embeddings=True, head_dim=32),
}


def make_checkpoint(tmp_path, family, seed=0):
    torch.manual_seed(seed)
    cfg = FAMILIES[family]()
    hf = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0: randomise so they are tested
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(tmp_path, family):
    hf = make_checkpoint(tmp_path, family)
    ours = load_model(tmp_path, dtype=torch.float32)
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 40))
    with torch.no_grad():
        ref = hf(tokens).logits
        whole = ours(tokens, make_caches(ours, "full"))
    assert (whole - ref).abs().max() <= 1e-4

    # Prefill in two chunks, then token-by-token decoding through the cache.
    caches = make_caches(ours, "full")
    with torch.no_grad():
        parts = [ours(tokens[:, :17], caches), ours(tokens[:, 17:30], caches)]
        parts += [ours(tokens[:, t:t + 1], caches) for t in range(30, 40)]
    assert (torch.cat(parts, dim=1) - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("family", ["qwen2", "tied"])
def test_stacked_projections_hold_the_checkpoints_tensors(tmp_path, family):
    """Attention.qkv_proj and MLP.gate_up_proj stack the checkpoint's q/k/v and gate/up by rows (biases too, in
    qwen2): checkpoint_state cuts them back into exactly transformers' tensors, under its names."""
    from model import checkpoint_state
    hf = make_checkpoint(tmp_path, family)
    theirs = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    ours = checkpoint_state(load_model(tmp_path, dtype=torch.float32))
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_a_misshapen_part_of_a_stacked_projection_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    def shape(d):
        sd = load_file(d / "model.safetensors")
        sd["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(33, 64)
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    msg = _broken(tmp_path, shape)
    assert "k_proj.weight" in msg and "(33, 64)" in msg


def test_rope_scaling_changes_logits(tmp_path):
    """The llama3 rescaling must matter at long positions, or the test above could not see it."""
    hf = make_checkpoint(tmp_path, "llama3.1")
    cfg = json.loads((tmp_path / "config.json").read_text())
    ours = load_model(tmp_path, dtype=torch.float32)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "rope_parameters": {"rope_theta": 500000.0}}))
    plain = load_model(tmp_path, dtype=torch.float32)
    tokens = torch.randint(0, SMALL["vocab_size"], (1, 200))
    with torch.no_grad():
        assert (ours(tokens, make_caches(ours))[:, -1] - hf(tokens).logits[:, -1]).abs().max() <= 1e-4
        assert (plain(tokens, make_caches(plain))[:, -1] - hf(tokens).logits[:, -1]).abs().max() > 1e-3


def test_sharded_checkpoint_and_bf16(tmp_path):
    hf = make_checkpoint(tmp_path, "mistral")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    (tmp_path / "sharded" / "config.json").write_text((tmp_path / "config.json").read_text())
    ours = load_model(tmp_path / "sharded", dtype=torch.bfloat16)
    assert ours.lm_head.weight.dtype == torch.bfloat16
    tokens = torch.randint(0, SMALL["vocab_size"], (1, 12))
    with torch.no_grad():
        err = (ours(tokens, make_caches(ours)) - hf(tokens).logits).abs().max()
    assert err < 0.1


def _broken(tmp_path, edit):
    make_checkpoint(tmp_path, "llama2")
    edit(tmp_path)
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path, dtype=torch.float32)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 300
    return msg


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    def edit(d):
        sd = load_file(d / "model.safetensors")
        del sd["model.layers.1.mlp.up_proj.weight"]
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    assert "layers.1.mlp.up_proj.weight" in _broken(tmp_path, edit)


def test_unexpected_and_misshapen_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    def extra(d):
        sd = load_file(d / "model.safetensors")
        sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    assert "q_proj.bias" in _broken(tmp_path / "a", extra)

    def shape(d):
        sd = load_file(d / "model.safetensors")
        sd["model.norm.weight"] = torch.zeros(65)
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    assert "norm.weight" in _broken(tmp_path / "b", shape)


def test_truncated_file_and_bad_config(tmp_path):
    def truncate(d):
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "model.safetensors" in _broken(tmp_path / "a", truncate)

    def arch(d):
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    assert "gpt_neox" in _broken(tmp_path / "b", arch)
    assert "does not exist" in _broken(tmp_path / "c", lambda d: __import__("shutil").rmtree(d))
