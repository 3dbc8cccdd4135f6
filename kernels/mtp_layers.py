"""Small fused kernels of the MTP code predictor's decoder layer (decode-sized: a few tokens per sequence).

- :func:`add_rms_norm_`: ``h += delta`` (rounded to the model dtype, in place) then Qwen3 RMSNorm of ``h`` -> y;
  one program per token.
- :func:`silu_mul`: ``silu(gate) * up`` from the fused ``[N, 2I]`` gate/up projection; one program per token and
  block of I.
- :func:`cached_attention`: writes the new k/v of T tokens into the static ``[B, Hk, L, d]`` cache at ``start``
  and attends the T queries (GQA group of one kv head, causal) over the ``start + T <= L`` cached keys, in one
  program per (sequence, kv head). With L <= 16 the whole key/value tile sits in registers. Optionally the q rows
  and the new k rows first get Qwen3's per-head RMSNorm and 1-D RoPE (position = cache slot), which removes the
  separate ``qk_norm_mrope`` launch from a decode step; head rows are loaded as two halves so rotate-half pairs
  lane j with lane j (shared helpers of :mod:`.rope`).

Every rounding step is the one transformers takes (the residual add and the normalised activations are rounded to
the model dtype before the weight multiply; silu is rounded before the multiply by up); attention accumulates in
fp32 and rounds once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch, static_case
from .mtp_gemv import silu_mul_rounded
from .rope import norm_rope_halves


@triton.jit
def add_rms_norm_kernel(h_ptr, d_ptr, w_ptr, y_ptr, H, stride_h, stride_d, stride_y, eps,
                        HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    """Grid ``(N,)``: one program per token row of :func:`add_rms_norm_`. ``h_ptr`` / ``d_ptr`` / ``y_ptr`` ``[N, H]``
    (fp16/bf16, unit stride in H; ``d_ptr`` unused without ``HAS_DELTA``), ``w_ptr`` ``[H]``; with ``HAS_DELTA``
    ``h += delta`` is rounded to h's dtype and stored back before the norm. ``BLOCK`` >= H (the whole row)."""
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
    """Grid ``(N, cdiv(I, BLOCK))``: one program per (token row, block of ``BLOCK`` of I) of :func:`silu_mul`.
    ``gu_ptr`` ``[N, 2I]`` (gate columns then up columns), ``out_ptr`` ``[N, I]`` (fp16/bf16, unit stride in I)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    g_raw = tl.load(gu_ptr + row * stride_gu + offs, mask=mask, other=0.0)
    u = tl.load(gu_ptr + row * stride_gu + I + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, silu_mul_rounded(g_raw.to(tl.float32), u, g_raw.dtype), mask=mask)


@triton.jit
def _load_halves(ptr, rows, mask_rows, offs_j, HALF: tl.constexpr, D: tl.constexpr):
    """Elements [0, HALF) and [HALF, D) of each row (``ptr + rows`` points at element 0) as two ``[R, BLOCK]``
    tiles, so rotate-half RoPE pairs lane j of one with lane j of the other (no register shuffle)."""
    p = ptr + rows[:, None] + offs_j[None, :]
    x1 = tl.load(p, mask=mask_rows[:, None] & (offs_j < HALF)[None, :], other=0.0)
    x2 = tl.load(p + HALF, mask=mask_rows[:, None] & (offs_j < D - HALF)[None, :], other=0.0)
    return x1, x2


@triton.jit
def _store_halves(ptr, rows, mask_rows, offs_j, x1, x2, HALF: tl.constexpr, D: tl.constexpr):
    p = ptr + rows[:, None] + offs_j[None, :]
    tl.store(p, x1, mask=mask_rows[:, None] & (offs_j < HALF)[None, :])
    tl.store(p + HALF, x2, mask=mask_rows[:, None] & (offs_j < D - HALF)[None, :])


@triton.jit
def _norm_rope_rows(x1, x2, w_ptr, cos_ptr, sin_ptr, stride_cs, pos, mask_rows, offs_j, eps, HALF: tl.constexpr,
                    D: tl.constexpr):
    """Per-head RMSNorm (weight ``w_ptr`` ``[D]``) + 1-D RoPE of head rows given as halves, token row r at position
    ``pos[r]``: cos/sin are rows of the ``[P, D/2]`` tables (model dtype, as transformers' ``cos.to(x.dtype)``; no
    trigonometry in the kernel). Returns the halves rounded to their dtype."""
    w1 = tl.load(w_ptr + offs_j, mask=offs_j < HALF, other=0.0).to(tl.float32)
    w2 = tl.load(w_ptr + HALF + offs_j, mask=offs_j < HALF, other=0.0).to(tl.float32)
    cs = pos[:, None] * stride_cs + offs_j[None, :]
    m = mask_rows[:, None] & (offs_j < HALF)[None, :]
    cos = tl.load(cos_ptr + cs, mask=m, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + cs, mask=m, other=0.0).to(tl.float32)
    o1, o2 = norm_rope_halves(x1, x2, w1, w2, cos, sin, eps, D, True)
    return o1.to(x1.dtype), o2.to(x2.dtype)


@triton.jit
def cached_attention_kernel(
    q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, o_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_cb, stride_ch, stride_cl, stride_ob, stride_ot, stride_oh, stride_cs,
    start, T, n_kv, scale, eps,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_L: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr, NORM_ROPE: tl.constexpr,
):
    """One program per (sequence, kv head). Head rows are handled as two halves (``HALF = ceil(D / 2)``); with
    ``NORM_ROPE`` the new k and the q rows get the per-head RMSNorm and the 1-D RoPE at position = cache slot
    (token t of this call sits at slot and position ``start + t``) before the cache write / the scores.

    cos/sin come from small tables (``[P, D/2]``, P >= L) rather than ``tl.cos``/``tl.sin``: the libdevice
    slow path of the trigonometry (a local array) made this kernel spill on sm_90a."""
    attention_tile(tl.program_id(0), tl.program_id(1), q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, o_ptr, qw_ptr, kw_ptr,
                   cos_ptr, sin_ptr, stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb,
                   stride_vt, stride_vh, stride_cb, stride_ch, stride_cl, stride_ob, stride_ot, stride_oh, stride_cs,
                   start, T, scale, eps, GROUP, BLOCK_Q, BLOCK_L, D, HALF, BLOCK_HALF, NORM_ROPE)


@triton.jit
def attention_tile(
    b, h, q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, o_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_cb, stride_ch, stride_cl, stride_ob, stride_ot, stride_oh, stride_cs,
    start, T, scale, eps,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_L: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr, NORM_ROPE: tl.constexpr,
):
    """Sequence ``b``, kv head ``h`` of :func:`cached_attention_kernel` (shared with the persistent frame kernel,
    :mod:`.mtp_persistent`)."""
    b = b.to(tl.int64)
    h = h.to(tl.int64)
    offs_l = tl.arange(0, BLOCK_L)
    offs_j = tl.arange(0, BLOCK_HALF)
    end = start + T
    old = offs_l < start
    new = (offs_l >= start) & (offs_l < end)
    t_new = tl.where(new, offs_l - start, 0)
    k1, k2 = _load_halves(k_ptr + b * stride_kb + h * stride_kh, t_new * stride_kt, new, offs_j, HALF, D)
    v1, v2 = _load_halves(v_ptr + b * stride_vb + h * stride_vh, t_new * stride_vt, new, offs_j, HALF, D)
    if NORM_ROPE:
        k1, k2 = _norm_rope_rows(k1, k2, kw_ptr, cos_ptr, sin_ptr, stride_cs, offs_l, new, offs_j, eps, HALF, D)
    cache = b * stride_cb + h * stride_ch
    slots = offs_l * stride_cl
    _store_halves(kc_ptr + cache, slots, new, offs_j, k1, k2, HALF, D)
    _store_halves(vc_ptr + cache, slots, new, offs_j, v1, v2, HALF, D)
    # The key tile: old entries from the cache, new ones straight from registers (no read-after-write).
    kc1, kc2 = _load_halves(kc_ptr + cache, slots, old, offs_j, HALF, D)
    vc1, vc2 = _load_halves(vc_ptr + cache, slots, old, offs_j, HALF, D)
    k1 = tl.where(new[:, None], k1, kc1).to(tl.float32)
    k2 = tl.where(new[:, None], k2, kc2).to(tl.float32)
    v1 = tl.where(new[:, None], v1, vc1).to(tl.float32)
    v2 = tl.where(new[:, None], v2, vc2).to(tl.float32)
    # Query rows: r = t * GROUP + g, head h * GROUP + g of token t.
    offs_r = tl.arange(0, BLOCK_Q)
    t_q = offs_r // GROUP
    g_q = offs_r % GROUP
    valid_q = t_q < T
    q1, q2 = _load_halves(q_ptr + b * stride_qb, t_q * stride_qt + (h * GROUP + g_q) * stride_qh, valid_q, offs_j,
                          HALF, D)
    if NORM_ROPE:
        q1, q2 = _norm_rope_rows(q1, q2, qw_ptr, cos_ptr, sin_ptr, stride_cs, start + t_q, valid_q, offs_j, eps,
                                 HALF, D)
    q1 = q1.to(tl.float32)
    q2 = q2.to(tl.float32)
    s = (tl.sum(q1[:, None, :] * k1[None, :, :], 2) + tl.sum(q2[:, None, :] * k2[None, :, :], 2)) * scale
    visible = (offs_l[None, :] <= (start + t_q)[:, None]) & (offs_l[None, :] < end)
    s = tl.where(visible, s, float("-inf"))
    p = tl.exp(s - tl.max(s, 1)[:, None])
    p = p / tl.sum(p, 1)[:, None]
    o1 = tl.sum(p[:, :, None] * v1[None, :, :], 1)  # [BLOCK_Q, BLOCK_HALF]
    o2 = tl.sum(p[:, :, None] * v2[None, :, :], 1)
    o_dt = o_ptr.dtype.element_ty
    _store_halves(o_ptr + b * stride_ob, t_q * stride_ot + (h * GROUP + g_q) * stride_oh, valid_q, offs_j,
                  o1.to(o_dt), o2.to(o_dt), HALF, D)


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
                     v_cache: torch.Tensor, start: int, scale: float, q_norm: torch.Tensor | None = None,
                     k_norm: torch.Tensor | None = None, cos: torch.Tensor | None = None,
                     sin: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
    """q ``[B, T, Hq, d]``, k/v ``[B, T, Hk, d]`` (unit stride in d), caches ``[B, Hk, L, d]`` (contiguous d);
    with ``q_norm`` / ``k_norm`` ``[d]`` and RoPE tables ``cos`` / ``sin`` ``[P, d/2]`` (row = position, unit
    stride), q and the new k first get the per-head RMSNorm and 1-D RoPE at positions ``start + t``. Writes k/v at ``start`` and returns the causal attention output
    ``[B, T, Hq, d]``."""
    B, T, Hq, D = q.shape
    Hk = k.shape[2]
    L = k_cache.shape[2]
    group = Hq // Hk
    out = q.new_empty(B, T, Hq, D)
    if T == 0:  # nothing to attend or write (the query tile would be empty)
        return out
    norm_rope = q_norm is not None
    launch(
        cached_attention_kernel, (B, Hk),
        q, k, v, k_cache, v_cache, out, q_norm if norm_rope else q, k_norm if norm_rope else k,
        cos if norm_rope else q, sin if norm_rope else q,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0), out.stride(1), out.stride(2),
        cos.stride(0) if norm_rope else 0, int(start), T, Hk, float(scale), float(eps),
        GROUP=group, BLOCK_Q=triton.next_power_of_2(T * group), BLOCK_L=triton.next_power_of_2(max(L, 2)), D=D,
        HALF=(D + 1) // 2, BLOCK_HALF=triton.next_power_of_2((D + 1) // 2), NORM_ROPE=norm_rope,
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
        for _nr in (False, True):
            _sig = {n: f"*{_dt}" for n in ("q_ptr", "k_ptr", "v_ptr", "kc_ptr", "vc_ptr", "o_ptr", "qw_ptr",
                                           "kw_ptr", "cos_ptr", "sin_ptr")}
            _sig.update({n: "i32" for n in ("stride_qb", "stride_qt", "stride_qh", "stride_kb", "stride_kt",
                                             "stride_kh", "stride_vb", "stride_vt", "stride_vh", "stride_cb",
                                             "stride_ch", "stride_cl", "stride_ob", "stride_ot", "stride_oh",
                                             "stride_cs", "start", "T", "n_kv")})
            _sig.update({"scale": "fp32", "eps": "fp32", "GROUP": "constexpr", "BLOCK_Q": "constexpr",
                         "BLOCK_L": "constexpr", "D": "constexpr", "HALF": "constexpr", "BLOCK_HALF": "constexpr",
                         "NORM_ROPE": "constexpr"})
            static_case(f"cached_attention_kernel[{_dt},T{_t},G2,L16,D128,norm_rope={_nr}]",
                        cached_attention_kernel, signature=_sig,
                        constexprs={"GROUP": 2, "BLOCK_Q": 2 * _t, "BLOCK_L": 16, "D": 128, "HALF": 64, "BLOCK_HALF": 64,
                                    "NORM_ROPE": _nr},
                        aligned=("stride_qb", "stride_qt", "stride_qh", "stride_kb", "stride_kt", "stride_kh",
                                 "stride_vb", "stride_vt", "stride_vh", "stride_cb", "stride_ch", "stride_cl",
                                 "stride_ob", "stride_ot", "stride_oh", "stride_cs"))
