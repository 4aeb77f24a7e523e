"""The transformer: a Llama / Mistral / Qwen2 decoder read straight from a Hugging Face checkpoint.

Attention does not own its keys and values. Each layer is handed a cache object (full, stream or
infllm: see infllm.py) that stores what it needs, places the rotary positions and computes the
attention. The model never knows which kind of cache it has: tokens -> model -> cache -> logits.
Plain PyTorch: on a GPU, engine.accelerate swaps some forwards for Triton kernels that compute the same.
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tp import sum_over_processes, tensor_parallel


class CheckpointError(ValueError):
    """A problem with the checkpoint folder; the message is one sentence for the user."""


SUPPORTED = ("llama", "mistral", "qwen2")


@dataclass
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", ...} as in config.json
    max_seq_len: int = 4096  # the context the model was trained on
    qkv_bias: bool = False
    tie_embeddings: bool = False
    # Tensor parallel over tp_size processes (torchrun): n_heads, n_kv_heads and ffn_dim are then one
    # process's share, and each layer sums its attention and MLP outputs over the processes.
    tp_size: int = 1

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        kind = cfg.get("model_type")
        if kind not in SUPPORTED:
            raise CheckpointError(f"model_type {kind!r} is not supported (supported: {', '.join(SUPPORTED)})")
        # transformers >= 5 writes rope_parameters; older configs have rope_theta and rope_scaling.
        rope = dict(cfg.get("rope_parameters") or {})
        base = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = dict(rope or cfg.get("rope_scaling") or {}) or None
        if scaling is not None:
            scaling["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
            if scaling["rope_type"] == "default":
                scaling = None
            elif scaling["rope_type"] not in ("llama3", "linear"):
                raise CheckpointError(f"rope scaling {scaling['rope_type']!r} is not supported (supported: llama3, linear)")
        try:
            n_heads = cfg["num_attention_heads"]
            return cls(vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
                       n_heads=n_heads, n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
                       head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads, ffn_dim=cfg["intermediate_size"],
                       norm_eps=cfg.get("rms_norm_eps", 1e-5), rope_base=float(base), rope_scaling=scaling,
                       max_seq_len=cfg.get("max_position_embeddings", 4096),
                       # Qwen2 always has q/k/v biases; Llama-family configs say so with attention_bias.
                       qkv_bias=kind == "qwen2" or bool(cfg.get("attention_bias", False)),
                       tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))
        except KeyError as e:
            raise CheckpointError(f"config.json lacks the field {e.args[0]!r}") from None


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """The rotary inverse frequencies, with Llama-3's long-context rescaling where the config asks."""
    d = args.head_dim
    # On the CPU also inside a meta-device context: meta arithmetic would import dynamo (2 s).
    inv_freq = 1.0 / (args.rope_base ** (torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d))
    s = args.rope_scaling
    if s is None:
        return inv_freq.float()
    if s["rope_type"] == "linear":
        return (inv_freq / s["factor"]).float()
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_len / wavelen - low) / (high - low)).clamp(0, 1)
    return ((1 - smooth) * inv_freq / factor + smooth * inv_freq).float()


class Rotary(nn.Module):
    """Rotary position embedding, applied by the caches: InfLLM places keys and queries at positions
    of its own choosing (window-relative, or one fixed distance for memory), so the model cannot."""

    def __init__(self, args: ModelArgs, device=None):
        super().__init__()
        self.register_buffer("inv_freq", rope_frequencies(args).to(device), persistent=False)

    def angles(self, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of positions pos [T], each [T, head_dim] in dtype: computed once for every tensor
        rotated to the same positions (a piece's queries and keys; memory's one fixed position)."""
        acc = torch.promote_types(dtype, torch.float32)
        # Angles in float64, reduced to one turn: InfLLM's window keys sit at their absolute positions, and
        # at position 1M a float32 angle is off by up to 0.03 rad. Counted in turns and reduced by floor, not
        # by %: compiled, the float64 remainder would run once for every element of x, and it is slow.
        turns = pos.double()[:, None] * (self.inv_freq.double()[None, :] / (2 * math.pi))
        freqs = ((turns - turns.floor()) * (2 * math.pi)).to(acc)
        cos, sin = freqs.cos().to(dtype), freqs.sin().to(dtype)
        return torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None, angles=None) -> torch.Tensor:
        """Rotate x [..., T, head_dim] to positions pos [T], or by their angles (Hugging Face's half-split layout)."""
        cos, sin = self.angles(pos, x.dtype) if angles is None else angles
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 as the reference does: bf16 sums of squares lose too much.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        hd = args.head_dim
        # The checkpoint's q_proj, k_proj and v_proj stacked by rows (CHECKPOINT_PARTS): one matrix product.
        self.qkv_proj = nn.Linear(args.dim, (args.n_heads + 2 * args.n_kv_heads) * hd, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * hd, args.dim, bias=False)

    def forward(self, x, cache, n_valid=None):
        B, T, _ = x.shape
        a = self.args
        q, k, v = self.qkv_proj(x).split([a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim,
                                          a.n_kv_heads * a.head_dim], dim=-1)
        q, k, v = (t.view(B, T, -1, a.head_dim).transpose(1, 2) for t in (q, k, v))
        y = cache.attend(q, k, v, n_valid)  # q, k unrotated: the cache decides their positions
        return self.o_proj(y.transpose(1, 2).reshape(B, T, a.n_heads * a.head_dim))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        # The checkpoint's gate_proj and up_proj stacked by rows: one matrix product.
        self.gate_up_proj = nn.Linear(args.dim, 2 * args.ffn_dim, bias=False)
        self.down_proj = nn.Linear(args.ffn_dim, args.dim, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)
        # Split over processes, attention and MLP each end in a partial sum: one all-reduce after each.
        self.reduce = sum_over_processes if args.tp_size > 1 else (lambda x: x)

    def forward(self, x, cache, n_valid=None):
        h = x + self.reduce(self.self_attn(self.input_layernorm(x), cache, n_valid))
        return h + self.reduce(self.mlp(self.post_attention_layernorm(h)))


class Transformer(nn.Module):
    """Module names follow the Hugging Face checkpoint ("model." prefix dropped), so loading is a lookup."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        # Weights come from the checkpoint (or random_model): no initialiser runs. On the meta device an
        # Embedding's own would import dynamo, 2 s at the start of every process that never compiles.
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim, _weight=torch.empty(args.vocab_size, args.dim))
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.rope = Rotary(args)

    def forward(self, tokens: torch.Tensor, caches: list, last_only: bool = False, n_valid=None) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, vocab] (or [B, 1, vocab] with last_only, which a long prefill wants:
        the full logits of an 8K chunk would take gigabytes). With n_valid (a device count) only the first
        n_valid tokens are real, the rest padding: a CUDA graph replays inputs of a fixed length."""
        x = self.embed_tokens(tokens)
        for layer, cache in zip(self.layers, caches):
            x = layer(x, cache, n_valid)
        if last_only:
            x = x[:, -1:] if n_valid is None else x.index_select(1, n_valid.view(1) - 1)
        return self.logits(x)

    def logits(self, x):
        """The last layer's output -> logits, in fp32 (float64 for a float64 model: the tests' oracle)."""
        return self.lm_head(self.norm(x)).to(torch.promote_types(x.dtype, torch.float32))


# ----------------------------------------------------------------------------- loading

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


def read_config(ckpt: Path) -> ModelArgs:
    path = Path(ckpt) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: a checkpoint folder needs config.json")
    try:
        return ModelArgs.from_hf_config(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def safetensors_files(ckpt: Path) -> list[Path]:
    ckpt = Path(ckpt)
    index = ckpt / "model.safetensors.index.json"
    files = ([ckpt / n for n in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
             if index.is_file() else sorted(ckpt.glob("*.safetensors")))
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {ckpt} (pickled .bin checkpoints are not read)")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f} is listed in the index but missing")
    return files


# Tensor parallel: the layers split by output rows (heads, MLP units) and by input columns (their sums).
SPLIT_ROWS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
SPLIT_COLUMNS = ("o_proj", "down_proj")

# Our parameters that stack several of the checkpoint's by rows, in this order: a token's projections then take
# one matrix product instead of three (two in the MLP), which a decoding step, one row at a time, runs faster.
CHECKPOINT_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def checkpoint_layout(model: "Transformer") -> dict[str, tuple[str, int, int]]:
    """Each checkpoint tensor's name (Hugging Face's, "model." dropped) -> (our parameter, its first row, rows)."""
    a = model.args
    rows = {"q_proj": a.n_heads * a.head_dim, "k_proj": a.n_kv_heads * a.head_dim, "v_proj": a.n_kv_heads * a.head_dim,
            "gate_proj": a.ffn_dim, "up_proj": a.ffn_dim}
    layout = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        *path, module, kind = name.split(".")
        start = 0
        for part in CHECKPOINT_PARTS.get(module, ()):
            layout[".".join(path + [part, kind])] = (name, start, rows[part])
            start += rows[part]
        if module not in CHECKPOINT_PARTS:
            layout[name] = (name, 0, p.shape[0])
    return layout


def checkpoint_state(model: "Transformer") -> dict[str, torch.Tensor]:
    """The weights under the checkpoint's names (the stacked parameters cut back into theirs): what a
    checkpoint folder of this model holds (tests and benchmarks write random models so)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    return {n: params[ours][start:start + rows] for n, (ours, start, rows) in checkpoint_layout(model).items()}


def load_model(ckpt, device="cpu", dtype=torch.bfloat16, rank=0, world=1) -> Transformer:
    """Build the model on the meta device and fill it tensor by tensor from memory-mapped safetensors:
    no randomly initialised copy, no second full copy of the weights. Split over world processes
    (tensor parallel), process rank reads only its slices of the split layers."""
    from safetensors import SafetensorError, safe_open

    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint folder {ckpt} does not exist")
    args = tensor_parallel(read_config(ckpt), world)
    with torch.device("meta"):
        model = Transformer(args)
    ours, layout = dict(model.named_parameters(remove_duplicate=False)), checkpoint_layout(model)
    state, found = {}, set()  # found: the checkpoint's names read
    for f in safetensors_files(ckpt):
        try:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for key in st.keys():
                    name = key.removeprefix("model.")
                    if name.endswith("rotary_emb.inv_freq"):
                        continue  # some old checkpoints store it; we compute it from the config
                    if name not in layout:
                        raise CheckpointError(f"{f.name} holds an unexpected tensor {key!r}")
                    param, start, rows = layout[name]
                    shape = (rows, *ours[param].shape[1:])
                    t = _shard(st, key, name, shape, rank) if world > 1 else st.get_tensor(key)
                    if t.shape != shape:
                        raise CheckpointError(f"tensor {key!r} in {f.name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
                    if rows == ours[param].shape[0]:
                        state[param] = t.to(device=device, dtype=dtype)
                    else:  # one part of a stacked parameter: its rows
                        if param not in state:
                            state[param] = torch.empty(ours[param].shape, dtype=dtype, device=device)
                        state[param][start:start + rows] = t
                    found.add(name)
        except SafetensorError as e:
            raise CheckpointError(f"{f} is not a readable safetensors file ({e})") from None
    if args.tie_embeddings:
        if "embed_tokens.weight" in found:
            found.add("lm_head.weight")
        state.setdefault("lm_head.weight", state.get("embed_tokens.weight"))
    missing = [n for n in layout if n not in found]
    if missing:
        raise CheckpointError(f"the checkpoint lacks the tensor {missing[0]!r}" +
                              (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    model.load_state_dict(state, assign=True)
    if args.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rope = Rotary(args, device=device)
    return model.eval()


def _shard(st, key, name, shape, rank):
    """Process rank's slice of a tensor split for tensor parallel (rows or columns of the mmap, read alone)."""
    part, layer = st.get_slice(key), name.split(".")[-2]
    if layer in SPLIT_ROWS:
        return part[rank * shape[0]:(rank + 1) * shape[0]]
    if layer in SPLIT_COLUMNS:
        return part[:, rank * shape[1]:(rank + 1) * shape[1]]
    return part[:]


def random_model(args: ModelArgs, device="cpu", dtype=torch.float32, seed: int = 0) -> Transformer:
    """Random weights made on the device (benchmarks and tests): speed does not depend on the values."""
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # made in its dtype: a 7B model in fp32 first would need 28 GB more
    try:
        with torch.device(device):
            model = Transformer(args)
    finally:
        torch.set_default_dtype(default)
    for name, p in model.named_parameters():
        nn.init.normal_(p, *((1.0, 0.1) if name.endswith("norm.weight") else (0.0, 0.02)))
    model = model.to(dtype)
    model.rope = Rotary(args, device=device)  # .to(dtype) must not round the frequencies
    return model.eval()
