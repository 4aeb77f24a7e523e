"""The engine: InfLLM made fast, beside the reference (infllm.py, kernels.py, model.py) and proven equal to it.

Nothing here changes what is computed (but for unit_dtype=fp8, which rounds the stored units): only how fast.
The pieces, what each equals, and the test that proves it:
  memory.py      FixedShapeMemory / FixedShapeStream: infllm.ContextMemory / StreamCache in fixed shapes,
                 with device-side counters, a ring for the window and padded pieces: the torch.compile and
                 CUDA-graph target. Equal to the reference in float64 on a CPU, the same units selected every
                 step (tests/test_engine.py).
  bookkeeping.py the steps of a piece (ring writes, masks, lookup, LRU, memory part, retirement), each a Triton
                 kernel beside its PyTorch specification; memory.pick_ops picks one of the two per step, once
                 per cache (tests/test_gpu.py: each kernel against its spec).
  attention.py   the chunk attention: the CHUNK_ATTENTION table (plain, blocked, triton, compiled, flex), each
                 equal to kernels.chunk_attention (tests/test_kernels.py on a CPU, tests/test_gpu.py).
  layers.py      rotary angles and rotations, RMSNorm (with the residual sum), the MLP's silu product, in Triton,
                 and the forwards that use them (tests/test_gpu.py: each against float64).
  storage.py     where the units live (pinned host memory or GPU memory, unit_storage), the memory plan, fp8
                 units, and the copies between storage and the device pool (tests/test_gpu.py, test_memory.py).
  graphs.py      CUDA graphs, the wavefront over layers and decoding ahead (tests/test_gpu.py).
This file: make_caches (the engine's caches), accelerate (the one place that swaps our modules' forwards for the
Triton ones), pick_kernel (the chunk attention to run) and compile_blocks.
"""
import itertools
import types

import torch

import model as model_lib
from engine import layers
from engine.memory import FixedShapeMemory, FixedShapeStream
from infllm import FullCache, InfLLMConfig


def make_caches(model, attention: str = "full", cfg: InfLLMConfig | None = None, kernel: str = "blocked"):
    """One engine cache per layer, on the model's device and dtype (full attention: infllm.FullCache). kernel
    picks the chunk attention of engine/attention.py: "plain" (the specification) or a faster path with the
    same results (pick_kernel)."""
    a = model.args
    p = model.embed_tokens.weight
    if attention == "full":
        return [FullCache(model.rope, a.n_kv_heads, a.head_dim, p.device, p.dtype) for _ in range(a.n_layers)]
    kind = {"infllm": FixedShapeMemory, "stream": FixedShapeStream}.get(attention)
    if kind is None:
        raise ValueError(f"unknown attention {attention!r} (choose full, stream or infllm)")
    cfg = cfg or InfLLMConfig()
    # Split over processes (tensor parallel), a.n_heads and a.n_kv_heads are this process's share.
    return [kind(model.rope, cfg, a.n_heads, a.n_kv_heads, a.head_dim, p.device, p.dtype, kernel, a.tp_size > 1)
            for _ in range(a.n_layers)]


def accelerate(model):
    """Swap the forwards of our own modules for the Triton ones of engine/layers.py, on an eager GPU: Rotary
    (angles and rotation), RMSNorm, MLP, and Block (its residual sum and the norm after it in one kernel), in
    model and every module inside it. The one place the engine changes the model; call it before make_caches
    (the memory part's rotation is computed then). A no-op on a CPU, in float64 or without Triton, and when
    called again. Each fast forward still takes its module's own where the kernels do not serve (inside
    torch.compile: compile_blocks). Returns the model."""
    p = next(itertools.chain(model.parameters(), model.buffers()))  # a Transformer: its embeddings
    if not p.is_cuda or p.dtype == torch.float64 or layers.triton is None:
        return model
    swaps = {model_lib.Rotary: {"angles": layers.rotary_angles, "forward": layers.rotary_forward},
             model_lib.RMSNorm: {"forward": layers.rms_norm_forward},
             model_lib.MLP: {"forward": layers.mlp_forward},
             model_lib.Block: {"forward": layers.block_forward}}
    for m in model.modules():
        for name, fn in swaps.get(type(m), {}).items():
            setattr(m, name, types.MethodType(fn, m))  # an instance attribute: type(m).name stays the reference
    return model


def pick_kernel(device, attention: str = "infllm", compiled: bool = True) -> str:
    """The chunk attention to run (engine/attention.py). Compiled: FlexAttention's fused kernels for InfLLM on
    a GPU; else the compiled blocked kernel (inductor's CPU FlexAttention cannot return the log-sum-exp yet, and
    with the stream cache's memory part, init tokens alone, inductor fails to generate the fused kernel).
    Eager: one Triton flash-attention kernel over both parts on a GPU (faster than PyTorch's memory-efficient
    attention over both parts, the path it replaced: docs/benchmarks.md), the blocked kernel on a CPU."""
    gpu = torch.device(device).type == "cuda"
    if not compiled:
        return "triton" if gpu else "blocked"
    return "flex" if gpu and attention == "infllm" else "compiled"


def compile_blocks(model):
    """torch.compile the dense per-token work of every layer (norms, MLP); the attention and its cache keep
    their own data-dependent control flow outside the compiled graphs."""
    for layer in model.layers:
        for m in (layer.input_layernorm, layer.post_attention_layernorm, layer.mlp):
            m.compile(dynamic=True)
    return model
