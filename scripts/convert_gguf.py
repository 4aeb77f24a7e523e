"""Convert a llama-architecture GGUF file into a Hugging Face style checkpoint folder.

    python scripts/convert_gguf.py model.gguf checkpoints/my-model [--dtype fp32|bf16|fp16]

Writes config.json, generation_config.json, model.safetensors, tokenizer.json and
tokenizer_config.json. Weights are dequantised with the `gguf` package (numpy reference code,
so it needs no llama.cpp build); llama.cpp's rotary row permutation of q/k is undone.
"""

import argparse
import json
import os
import sys

import numpy as np

# gguf.quants has a numpy dequantiser for each of these; the exotic IQ/TQ types are left out
# because nothing here checks them against llama.cpp.
SUPPORTED_TYPES = {
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
}

TOP_LEVEL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

# Pre-tokenizer per `tokenizer.ggml.pre`, following llama.cpp's llama-vocab.cpp. Each entry is
# (kind, regex): "gpt2" = ByteLevel's built-in GPT-2 regex; "digits+gpt2" = every digit isolated
# first (llama.cpp's "\p{N}" pass), then the GPT-2 regex, which is exactly the Digits + ByteLevel
# pre-tokenizer of the original SmolLM/StarCoder tokenizer.json; "split" = the given regex.
GPT2_FAMILY = ("gpt2", None)
DIGITS_FAMILY = ("digits+gpt2", None)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {
    **{k: GPT2_FAMILY for k in ("default", "gpt2", "mpt", "olmo", "jais", "trillion")},
    **{k: DIGITS_FAMILY for k in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")},
    **{k: ("split", LLAMA3_SPLIT) for k in ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx")},
    **{k: ("split", QWEN2_SPLIT) for k in ("qwen2", "deepseek-r1-qwen", "stablelm2")},
}

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class ConvertError(Exception):
    """A file we refuse to convert; the message is the one sentence the user sees."""


def field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def clean_float(x):
    # GGUF stores float32: 1e-5 comes back as 9.999999747378752e-06. Print the shortest decimal
    # that is the same float32, as the original config.json had it.
    return float(str(np.float32(x)))


def hf_name(gguf_name, n_layers):
    if gguf_name in TOP_LEVEL_NAMES:
        return TOP_LEVEL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in BLOCK_NAMES:
        if int(parts[1]) < n_layers:
            return f"model.layers.{parts[1]}.{BLOCK_NAMES[parts[2]]}"
    return None


def unpermute_rotary(w, n_heads):
    """Undo llama.cpp's q/k row permutation.

    llama.cpp's converter reorders each head's rows from Hugging Face's rotate-half layout
    (first half, second half) to interleaved pairs: reshape(n_heads, 2, hd/2, in).swapaxes(1, 2).
    The inverse reads the stored rows as (n_heads, hd/2, 2, in) and swaps back.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_hparams(reader):
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise ConvertError(f"architecture {arch!r} is not supported, only 'llama' GGUF files can be converted")
    p = lambda key, default=None: field(reader, f"llama.{key}", default)  # noqa: E731
    tokens = field(reader, "tokenizer.ggml.tokens")
    n_embd, n_head = p("embedding_length"), p("attention.head_count")
    hp = dict(
        n_layers=p("block_count"),
        hidden=n_embd,
        ffn=p("feed_forward_length"),
        n_head=n_head,
        n_kv_head=p("attention.head_count_kv", n_head),
        head_dim=p("attention.key_length", n_embd // n_head),
        eps=clean_float(p("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=clean_float(p("rope.freq_base", 10000.0)),
        ctx=p("context_length"),
        vocab=p("vocab_size", len(tokens) if tokens is not None else None),
    )
    missing = [k for k, v in hp.items() if v is None]
    if missing:
        raise ConvertError(f"the GGUF metadata lacks {', '.join(missing)}, so the model cannot be described")
    if p("rope.dimension_count", hp["head_dim"]) != hp["head_dim"]:
        raise ConvertError("partial rotary embeddings (rope.dimension_count < head_dim) are not supported")
    scaling = p("rope.scaling.type", "none")
    hp["rope_scaling"] = None
    if scaling == "linear":
        hp["rope_scaling"] = {"rope_type": "linear", "factor": clean_float(p("rope.scaling.factor"))}
    elif scaling != "none":
        raise ConvertError(f"rope scaling {scaling!r} is not supported, only none or linear")
    return hp


def check_tensors(reader, hp):
    """Refuse before writing anything: unknown tensor names or types."""
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            raise ConvertError("llama3-style rope scaling (rope_freqs.weight) is not supported")
        if hf_name(t.name, hp["n_layers"]) is None:
            raise ConvertError(f"tensor {t.name!r} has no Hugging Face llama counterpart, so it cannot be converted")
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise ConvertError(
                f"tensor {t.name!r} has type {t.tensor_type.name}, which is not supported "
                f"(supported: {', '.join(sorted(SUPPORTED_TYPES))})"
            )
    names = {t.name for t in reader.tensors}
    if "token_embd.weight" not in names or "output_norm.weight" not in names:
        raise ConvertError("the GGUF file lacks token_embd.weight or output_norm.weight")


def load_tensor(t, hp):
    """One tensor as float32 in Hugging Face layout [out, in]; numpy's shape is GGUF's reversed."""
    import gguf

    w = gguf.quants.dequantize(t.data, t.tensor_type)
    w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
    if t.name.endswith("attn_q.weight"):
        w = unpermute_rotary(w, hp["n_head"])
    elif t.name.endswith("attn_k.weight"):
        w = unpermute_rotary(w, hp["n_kv_head"])
    w = np.ascontiguousarray(w, dtype=np.float32)
    return w if w.flags.writeable else w.copy()  # F32 comes back as a read-only view of the mmap


def write_weights(reader, hp, path, dtype):
    import torch
    from safetensors.torch import save_file

    torch_dtype = getattr(torch, DTYPES[dtype])
    tensors = {}
    # One tensor dequantised at a time; the casts free the float32 copy right away, so the dict
    # is the only full copy (safetensors writes from the tensors' own buffers).
    for t in reader.tensors:
        tensors[hf_name(t.name, hp["n_layers"])] = torch.from_numpy(load_tensor(t, hp)).to(torch_dtype)
    save_file(tensors, path, metadata={"format": "pt"})
    return "lm_head.weight" not in tensors


def write_config(reader, hp, out, dtype, tied):
    bos, eos = field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id")
    pad = field(reader, "tokenizer.ggml.padding_token_id")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hp["hidden"],
        "intermediate_size": hp["ffn"],
        "num_hidden_layers": hp["n_layers"],
        "num_attention_heads": hp["n_head"],
        "num_key_value_heads": hp["n_kv_head"],
        "head_dim": hp["head_dim"],
        "hidden_act": "silu",
        "rms_norm_eps": hp["eps"],
        "rope_theta": hp["rope_theta"],
        "rope_scaling": hp["rope_scaling"],
        "max_position_embeddings": hp["ctx"],  # the context the model was trained on
        "vocab_size": hp["vocab"],
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": DTYPES[dtype],
        "use_cache": True,
    }
    generation = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}
    eot = field(reader, "tokenizer.ggml.eot_token_id")
    if eot is not None and eot != eos:
        generation["eos_token_id"] = [eos, eot]  # chat models stop at end-of-turn too
    for name, obj in (("config.json", config), ("generation_config.json", generation)):
        with open(os.path.join(out, name), "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")


def build_tokenizer(reader):
    """A `tokenizers.Tokenizer` for a GPT-2 style (byte-level BPE) GGUF vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    vocab = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)  # a duplicate keeps the first id, as llama.cpp's text->id map does
    if len(vocab) != len(tokens):
        print(f"convert_gguf: warning: {len(tokens) - len(vocab)} duplicate tokens in the vocabulary", file=sys.stderr)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))

    pre = field(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        print(f"convert_gguf: warning: unknown tokenizer.ggml.pre {pre!r}, using the GPT-2 regex", file=sys.stderr)
    kind, regex = PRE_TOKENIZERS.get(pre, GPT2_FAMILY)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=kind != "split")
    if kind == "gpt2":
        tk.pre_tokenizer = byte_level
    elif kind == "digits+gpt2":
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        split = pre_tokenizers.Split(Regex(regex), behavior="isolated")
        tk.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    tk.decoder = decoders.ByteLevel()

    post = processors.ByteLevel(trim_offsets=False)
    bos = field(reader, "tokenizer.ggml.bos_token_id")
    if field(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        b = tokens[bos]
        bos_template = processors.TemplateProcessing(
            single=f"{b}:0 $A:0", pair=f"{b}:0 $A:0 {b}:1 $B:1", special_tokens=[(b, bos)]
        )
        post = processors.Sequence([post, bos_template])
    tk.post_processor = post

    # llama.cpp matches CONTROL and USER_DEFINED tokens whole in the text; they keep their ids.
    pairs = list(zip(tokens, types))
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in pairs if ty == TOKEN_CONTROL])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in pairs if ty == TOKEN_USER_DEFINED])
    return tk


def write_tokenizer(reader, hp, out):
    model = field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        print(
            f"convert_gguf: warning: tokenizer model {model!r} is not byte-level BPE; wrote weights and config only",
            file=sys.stderr,
        )
        return
    tk = build_tokenizer(reader)
    tk.save(os.path.join(out, "tokenizer.json"))

    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type") or []
    name = lambda key: None if field(reader, key) is None else tokens[field(reader, key)]  # noqa: E731
    special = {i: tokens[i] for i, ty in enumerate(types) if ty in (TOKEN_CONTROL, TOKEN_USER_DEFINED)}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name("tokenizer.ggml.bos_token_id"),
        "eos_token": name("tokenizer.ggml.eos_token_id"),
        "unk_token": name("tokenizer.ggml.unknown_token_id"),
        "pad_token": name("tokenizer.ggml.padding_token_id"),
        "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(field(reader, "tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": hp["ctx"],
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": types[i] == TOKEN_CONTROL}
            for i, t in special.items()
        },
    }
    template = field(reader, "tokenizer.chat_template")
    if template is not None:
        config["chat_template"] = template
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")


def convert(gguf_path, out, dtype="fp32"):
    import gguf

    try:
        reader = gguf.GGUFReader(gguf_path)
    except (OSError, ValueError) as e:
        raise ConvertError(f"cannot read {gguf_path} as a GGUF file ({e})") from None
    hp = read_hparams(reader)
    check_tensors(reader, hp)
    os.makedirs(out, exist_ok=True)
    tied = write_weights(reader, hp, os.path.join(out, "model.safetensors"), dtype)
    write_config(reader, hp, out, dtype, tied)
    write_tokenizer(reader, hp, out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf", help="path of the .gguf file")
    ap.add_argument("out", help="output folder")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of model.safetensors")
    args = ap.parse_args(argv)
    try:
        convert(args.gguf, args.out, args.dtype)
    except ConvertError as e:
        print(f"convert_gguf: error: {e}.", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
