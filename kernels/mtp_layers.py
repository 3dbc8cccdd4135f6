"""Small fused kernels of the MTP code predictor's decoder layer (decode-sized: a few tokens per sequence).

- :func:`add_rms_norm_`: ``h += delta`` (rounded to the model dtype, in place) then Qwen3 RMSNorm of ``h`` -> y;
  one program per token.
- :func:`silu_mul`: ``silu(gate) * up`` from the fused ``[N, 2I]`` gate/up projection; one program per token and
  block of I.
- :func:`cached_attention`: writes the new k/v of T tokens into the static ``[B, Hk, L, d]`` cache at ``start``
  and attends the T queries (GQA group of one kv head, causal) over the ``start + T <= L`` cached keys, in one
  program per (sequence, kv head). With L <= 16 the whole key/value tile sits in registers.

Every rounding step is the one transformers takes (the residual add and the normalised activations are rounded to
the model dtype before the weight multiply; silu is rounded before the multiply by up); attention accumulates in
fp32 and rounds once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch, static_case


@triton.jit
def add_rms_norm_kernel(h_ptr, d_ptr, w_ptr, y_ptr, H, stride_h, stride_d, stride_y, eps,
                        HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    x_raw = tl.load(h_ptr + row * stride_h + offs, mask=mask, other=0.0)
    dt = x_raw.dtype
    x = x_raw.to(tl.float32)
    if HAS_DELTA:
        x = (x + tl.load(d_ptr + row * stride_d + offs, mask=mask, other=0.0).to(tl.float32)).to(dt)
        tl.store(h_ptr + row * stride_h + offs, x, mask=mask)
        x = x.to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, 0) / H + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = ((x * r).to(dt).to(tl.float32) * w).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + row * stride_y + offs, y, mask=mask)


@triton.jit
def silu_mul_kernel(gu_ptr, out_ptr, I, stride_gu, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    g_raw = tl.load(gu_ptr + row * stride_gu + offs, mask=mask, other=0.0)
    g = g_raw.to(tl.float32)
    u = tl.load(gu_ptr + row * stride_gu + I + offs, mask=mask, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(g_raw.dtype).to(tl.float32)  # F.silu in the model dtype
    tl.store(out_ptr + row * stride_out + offs, (s * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def cached_attention_kernel(
    q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, o_ptr,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_cb, stride_ch, stride_cl, stride_ob, stride_ot, stride_oh,
    start, T, n_kv, scale,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_L: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    end = start + T
    old = offs_l < start
    new = (offs_l >= start) & (offs_l < end)
    t_new = tl.where(new, offs_l - start, 0)
    cache_off = b * stride_cb + h * stride_ch + offs_l[:, None] * stride_cl + offs_d[None, :]
    k_new = tl.load(k_ptr + b * stride_kb + t_new[:, None] * stride_kt + h * stride_kh + offs_d[None, :],
                    mask=new[:, None] & mask_d[None, :], other=0.0)
    v_new = tl.load(v_ptr + b * stride_vb + t_new[:, None] * stride_vt + h * stride_vh + offs_d[None, :],
                    mask=new[:, None] & mask_d[None, :], other=0.0)
    tl.store(kc_ptr + cache_off, k_new, mask=new[:, None] & mask_d[None, :])
    tl.store(vc_ptr + cache_off, v_new, mask=new[:, None] & mask_d[None, :])
    # The key tile: old entries from the cache, new ones straight from registers (no read-after-write).
    old_mask = old[:, None] & mask_d[None, :]
    k = tl.where(new[:, None], k_new, tl.load(kc_ptr + cache_off, mask=old_mask, other=0.0)).to(tl.float32)
    v = tl.where(new[:, None], v_new, tl.load(vc_ptr + cache_off, mask=old_mask, other=0.0)).to(tl.float32)
    # Query rows: r = t * GROUP + g, head h * GROUP + g of token t.
    offs_r = tl.arange(0, BLOCK_Q)
    t_q = offs_r // GROUP
    g_q = offs_r % GROUP
    valid_q = t_q < T
    q_rows = b * stride_qb + t_q * stride_qt + (h * GROUP + g_q) * stride_qh
    q_mask = valid_q[:, None] & mask_d[None, :]
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=q_mask, other=0.0).to(tl.float32)
    s = tl.sum(q[:, None, :] * k[None, :, :], 2) * scale  # [BLOCK_Q, BLOCK_L]
    visible = (offs_l[None, :] <= (start + t_q)[:, None]) & (offs_l[None, :] < end)
    s = tl.where(visible, s, float("-inf"))
    p = tl.exp(s - tl.max(s, 1)[:, None])
    p = p / tl.sum(p, 1)[:, None]
    o = tl.sum(p[:, :, None] * v[None, :, :], 1)  # [BLOCK_Q, D]
    o_rows = b * stride_ob + t_q * stride_ot + (h * GROUP + g_q) * stride_oh
    tl.store(o_ptr + o_rows[:, None] + offs_d[None, :], o.to(o_ptr.dtype.element_ty),
             mask=valid_q[:, None] & mask_d[None, :])


def add_rms_norm_(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``h`` ``[N, H]``: ``h += delta`` in place (when given); returns ``rms_norm(h) * weight`` ``[N, H]``."""
    N, H = h.shape
    y = torch.empty_like(h)
    launch(add_rms_norm_kernel, (N,), h, delta if delta is not None else h, weight, y, H, h.stride(0),
           delta.stride(0) if delta is not None else 0, y.stride(0), float(eps), HAS_DELTA=delta is not None,
           BLOCK=triton.next_power_of_2(H), num_warps=4, device=h.device)
    return y


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """``gu`` ``[N, 2I]`` (gate then up) -> ``silu(gate) * up`` ``[N, I]``."""
    N, I2 = gu.shape
    inter = I2 // 2
    out = gu.new_empty(N, inter)
    block = min(triton.next_power_of_2(max(inter, 16)), 1024)
    launch(silu_mul_kernel, (N, triton.cdiv(inter, block)), gu, out, inter, gu.stride(0), out.stride(0),
           BLOCK=block, num_warps=4, device=gu.device)
    return out


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """q ``[B, T, Hq, d]``, k/v ``[B, T, Hk, d]`` (unit stride in d), caches ``[B, Hk, L, d]`` (contiguous d);
    writes k/v at ``start`` and returns the causal attention output ``[B, T, Hq, d]``."""
    B, T, Hq, D = q.shape
    Hk = k.shape[2]
    L = k_cache.shape[2]
    group = Hq // Hk
    out = q.new_empty(B, T, Hq, D)
    launch(
        cached_attention_kernel, (B, Hk),
        q, k, v, k_cache, v_cache, out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0), out.stride(1), out.stride(2),
        int(start), T, Hk, float(scale),
        GROUP=group, BLOCK_Q=triton.next_power_of_2(T * group), BLOCK_L=triton.next_power_of_2(max(L, 2)), D=D,
        BLOCK_D=triton.next_power_of_2(D),
        num_warps=4, device=q.device,
    )
    return out


for _dt in ("bf16", "fp16"):
    # H1024: the MTP and the talker; H2048: the thinker (omni_fast.models.text_decoder); no delta: a first layer's norm
    for _H, _delta in ((1024, True), (1024, False), (2048, True), (2048, False)):
        static_case(f"add_rms_norm_kernel[{_dt},H{_H}{'' if _delta else ',no delta'}]", add_rms_norm_kernel,
                    signature={"h_ptr": f"*{_dt}", "d_ptr": f"*{_dt}", "w_ptr": f"*{_dt}", "y_ptr": f"*{_dt}",
                               "H": "i32", "stride_h": "i32", "stride_d": "i32", "stride_y": "i32", "eps": "fp32",
                               "HAS_DELTA": "constexpr", "BLOCK": "constexpr"},
                    constexprs={"HAS_DELTA": _delta, "BLOCK": _H})
    static_case(f"silu_mul_kernel[{_dt},I3072]", silu_mul_kernel,
                signature={"gu_ptr": f"*{_dt}", "out_ptr": f"*{_dt}", "I": "i32", "stride_gu": "i32",
                           "stride_out": "i32", "BLOCK": "constexpr"},
                constexprs={"BLOCK": 1024})
    for _t in (1, 2):
        _sig = {n: f"*{_dt}" for n in ("q_ptr", "k_ptr", "v_ptr", "kc_ptr", "vc_ptr", "o_ptr")}
        _sig.update({n: "i32" for n in ("stride_qb", "stride_qt", "stride_qh", "stride_kb", "stride_kt", "stride_kh",
                                         "stride_vb", "stride_vt", "stride_vh", "stride_cb", "stride_ch", "stride_cl",
                                         "stride_ob", "stride_ot", "stride_oh", "start", "T", "n_kv")})
        _sig.update({"scale": "fp32", "GROUP": "constexpr", "BLOCK_Q": "constexpr", "BLOCK_L": "constexpr",
                     "D": "constexpr", "BLOCK_D": "constexpr"})
        static_case(f"cached_attention_kernel[{_dt},T{_t},G2,L16,D128]", cached_attention_kernel, signature=_sig,
                    constexprs={"GROUP": 2, "BLOCK_Q": 2 * _t, "BLOCK_L": 16, "D": 128, "BLOCK_D": 128})
