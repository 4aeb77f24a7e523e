"""The layer ops of an eager GPU, each a Triton kernel beside its PyTorch specification, and the accelerated
forwards of our own modules (model.Rotary, RMSNorm, MLP, Block) that engine.accelerate swaps in.

In PyTorch operations the rotations, norms (with the residual sum before one) and the MLP's silu product took
some 50 kernels per layer and piece, each covering the GPU; here each is one kernel:
  rope_angles  model.Rotary.angles: cos and sin of positions, the angle reduced to one turn in float64
  rotate       model.Rotary.forward: x rotated by cos and sin, in float32, rounded once (rotate_spec: 3 times)
  rms_norm     model.RMSNorm, with add the residual sum x + h before it (Block: h = x + attn; norm(h))
  silu_mul     model.MLP's F.silu(gate) * up
Each fast forward falls back to the module's own forward on a CPU, in float64 (the tests' oracle) and while
torch.compile traces it (inductor fuses the PyTorch operations itself). tests/test_gpu.py checks each kernel
against float64 (test_rotations_on_the_gpu_equal_float64, test_rms_norm_on_the_gpu_equals_float64,
test_residual_norm_and_silu_product_on_the_gpu_equal_pytorchs).
"""
import torch

import model as model_lib

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU build of torch: nothing here runs without a GPU
    triton = None


def fast(x: torch.Tensor, dtype=None) -> bool:
    """Whether the Triton kernels serve x: on an eager GPU, never in float64 nor inside torch.compile."""
    return (x.is_cuda and (dtype or x.dtype) != torch.float64 and triton is not None
            and not torch.compiler.is_compiling())


def rope_angles(pos, inv_freq, dtype):
    """model.Rotary.angles in one kernel (instead of some 14): cos and sin of positions pos [T], each [T, head_dim]
    in dtype, the angle in float64 reduced to one turn, then float32, as Rotary.angles has it."""
    T, half = pos.shape[0], inv_freq.shape[0]
    cos = torch.empty(T, 2 * half, dtype=dtype, device=pos.device)
    sin = torch.empty_like(cos)
    BT = 32  # positions per program
    _rope_angles_kernel[(-(-T // BT),)](pos, inv_freq, cos, sin, T, half, BT=BT, BH=triton.next_power_of_2(half))
    return cos, sin


def rotate(x, cos, sin):
    """rotate_spec in one kernel (instead of 5): x [H, T, D] (any strides) rotated by cos and sin [T or 1, D] (both
    halves equal), in float32 and rounded once to x's dtype (PyTorch's operations round three times). Returns a
    contiguous [H, T, D]."""
    H, T, D = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty(H, T, D, dtype=x.dtype, device=x.device)
    BT = min(32, max(2, triton.next_power_of_2(T)))  # positions per program
    row = cos.stride(0) if cos.shape[0] > 1 else 0  # one position for every query (memory's): broadcast
    _rotate_kernel[(H, -(-T // BT))](x, cos, sin, out, T, D // 2, x.stride(0), x.stride(1), row, BT=BT,
                                     BH=triton.next_power_of_2(D // 2))
    return out


def rotate_spec(x, cos, sin):
    """x [..., T, D] rotated by cos and sin [T, D] (Hugging Face's half-split layout): model.Rotary.forward itself,
    which reads nothing of its module when given the angles."""
    return model_lib.Rotary.forward(None, x, angles=(cos, sin))


def rms_norm(x, weight, eps, add=None):
    """model.RMSNorm in one kernel (instead of 9): each row normalised in float32, rounded to x's dtype, then
    scaled by the weight, as the reference rounds. With add (h, x's shape and dtype): the residual sum s = x + h
    first, and (s, its norm) returned (2 kernels otherwise)."""
    rows = _rows(x)
    out = torch.empty(rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    h = rows if add is None else _rows(add)
    total = torch.empty_like(rows) if add is not None else rows
    _rms_norm_kernel[(rows.shape[0],)](rows, h, total, weight, out, rows.shape[1], rows.stride(0), h.stride(0), eps,
                                       ADD=add is not None, BD=triton.next_power_of_2(rows.shape[1]))
    out = out.view(*x.shape[:-1], -1)
    return out if add is None else (total.view(x.shape), out)


def _rows(x):
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def silu_mul(gate_up):
    """model.MLP's F.silu(gate) * up in one kernel (instead of 2), gate and up the two halves of the last
    dimension of gate_up (the MLP's one matrix product): silu in float32 rounded to the dtype, then the product
    rounded, as PyTorch's two operations round."""
    gate_up = gate_up.contiguous()
    F2 = gate_up.shape[-1]
    rows = gate_up.numel() // F2
    out = torch.empty(*gate_up.shape[:-1], F2 // 2, dtype=gate_up.dtype, device=gate_up.device)
    # 512 elements and 8 warps a program: the fastest tile measured for a mistral-7b piece (docs/benchmarks.md).
    BLOCK = 512
    _silu_mul_kernel[(rows, -(-(F2 // 2) // BLOCK))](gate_up, out, F2 // 2, BLOCK=BLOCK, num_warps=8)
    return out


# ----------------------------------------------------------------------------- the accelerated forwards
# Bound to a module by engine.accelerate, each in place of the method of the same name; type(self).name is the
# module's own (the reference), which each takes where the kernels do not serve.

def rotary_angles(self, pos, dtype):
    if not fast(pos, dtype):
        return type(self).angles(self, pos, dtype)
    return rope_angles(pos, self.inv_freq, dtype)


def rotary_forward(self, x, pos=None, angles=None):
    cos, sin = self.angles(pos, x.dtype) if angles is None else angles
    if not fast(x):
        return type(self).forward(self, x, angles=(cos, sin))
    return rotate(x.reshape(-1, *x.shape[-2:]), cos, sin).view(x.shape)


def rms_norm_forward(self, x):
    if not fast(x):
        return type(self).forward(self, x)
    return rms_norm(x, self.weight, self.eps)


def mlp_forward(self, x):
    if not fast(x):
        return type(self).forward(self, x)
    return self.down_proj(silu_mul(self.gate_up_proj(x)))


def block_forward(self, x, cache, n_valid=None):
    """model.Block.forward with the residual sum and the norm after it in one kernel."""
    if not fast(x):
        return type(self).forward(self, x, cache, n_valid)
    h = self.reduce(self.self_attn(self.input_layernorm(x), cache, n_valid))
    norm = self.post_attention_layernorm
    x, normed = rms_norm(x, norm.weight, norm.eps, add=h)  # x = x + h; normed = norm(x)
    return x + self.reduce(self.mlp(normed))


# ----------------------------------------------------------------------------- Triton kernels (GPU only)

if triton is not None:
    @triton.jit(do_not_specialize=["T"])
    def _rope_angles_kernel(pos, inv_freq, cos, sin, T, HALF, BT: tl.constexpr, BH: tl.constexpr):
        t = tl.program_id(0) * BT + tl.arange(0, BT)
        _angles(tl.load(pos + t, mask=t < T, other=0), t, inv_freq, cos, sin, T, HALF, BH)

    @triton.jit
    def _angles(pos, t, inv_freq, cos, sin, T, HALF, BH: tl.constexpr):
        """cos and sin of positions pos [BT] (rows t of the outputs), as rope_angles says."""
        i = tl.arange(0, BH)
        ok = (t[:, None] < T) & (i[None, :] < HALF)
        p = pos.to(tl.float64)
        f = tl.load(inv_freq + i, mask=i < HALF, other=0.0).to(tl.float64) / 6.283185307179586
        turns = p[:, None] * f[None, :]
        # In [-pi, pi): the range where the GPU's fast float32 cosine and sine are most accurate.
        a = ((turns - tl.floor(turns + 0.5)) * 6.283185307179586).to(tl.float32)
        at = t[:, None] * (2 * HALF) + i[None, :]
        c, s = tl.cos(a).to(cos.dtype.element_ty), tl.sin(a).to(sin.dtype.element_ty)
        tl.store(cos + at, c, mask=ok)
        tl.store(cos + at + HALF, c, mask=ok)
        tl.store(sin + at, s, mask=ok)
        tl.store(sin + at + HALF, s, mask=ok)

    @triton.jit(do_not_specialize=["T"])
    def _rotate_kernel(x, cos, sin, out, T, HALF, SXH, SXT, ROW, BT: tl.constexpr, BH: tl.constexpr):
        h, t = tl.program_id(0), tl.program_id(1) * BT + tl.arange(0, BT)
        i = tl.arange(0, BH)
        ok = (t[:, None] < T) & (i[None, :] < HALF)
        src = x + h * SXH + t[:, None] * SXT + i[None, :]
        x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=ok, other=0.0).to(tl.float32)
        a = t[:, None] * ROW + i[None, :]
        c = tl.load(cos + a, mask=ok, other=0.0).to(tl.float32)
        s = tl.load(sin + a, mask=ok, other=0.0).to(tl.float32)
        dst = out + h * T * 2 * HALF + t[:, None] * 2 * HALF + i[None, :]
        tl.store(dst, (x1 * c - x2 * s).to(out.dtype.element_ty), mask=ok)
        tl.store(dst + HALF, (x2 * c + x1 * s).to(out.dtype.element_ty), mask=ok)

    @triton.jit
    def _rms_norm_kernel(x, h, total, weight, out, D, SX, SH, eps, ADD: tl.constexpr, BD: tl.constexpr):
        r, d = tl.program_id(0), tl.arange(0, BD)
        xf = tl.load(x + r * SX + d, mask=d < D, other=0.0)
        if ADD:  # the residual sum first, rounded to x's dtype as x + h is, and kept
            xf = (xf.to(tl.float32) + tl.load(h + r * SH + d, mask=d < D, other=0.0).to(tl.float32)).to(x.dtype.element_ty)
            tl.store(total + r * D + d, xf, mask=d < D)
        xf = xf.to(tl.float32)
        normed = (xf * tl.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)).to(x.dtype.element_ty)
        w = tl.load(weight + d, mask=d < D, other=0.0)
        tl.store(out + r * D + d, (normed.to(tl.float32) * w.to(tl.float32)).to(out.dtype.element_ty), mask=d < D)

    @triton.jit
    def _silu_mul_kernel(gate_up, out, F, BLOCK: tl.constexpr):
        r, j = tl.program_id(0).to(tl.int64), tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        g = tl.load(gate_up + r * 2 * F + j, mask=j < F, other=0.0).to(tl.float32)
        silu = (g / (1.0 + tl.exp(-g))).to(out.dtype.element_ty)
        u = tl.load(gate_up + r * 2 * F + F + j, mask=j < F, other=0.0).to(tl.float32)
        tl.store(out + r * F + j, (silu.to(tl.float32) * u).to(out.dtype.element_ty), mask=j < F)
