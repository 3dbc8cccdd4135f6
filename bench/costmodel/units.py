"""The units of work the cost model reports, each as (a) a tiny-config call for launch counting (the real layer
counts, tiny widths: launches do not depend on widths) and (b) where cheap enough, a real-shape (or exactly scaled)
call whose loads / stores / dots the instrumented interpreter counts.

Scaling rules (exact; tested in tests/test_cost_model.py):

- ``heads``: attention programs are independent per (query head, KV head group), so dividing Hq and Hk by ``s``
  (GQA ratio kept) divides every kernel's CTAs, bytes and FLOPs by exactly ``s``.
- ``inter``: the MoE GEMMs tile the expert intermediate I (gate/up: N = 2I in BLOCK_N-wide column tiles, each
  program's loads independent of I; down: K = I in BLOCK_K steps, plus per-program routing metadata that does
  not depend on I). With I/s a multiple of every block size, each count (bytes, FLOPs, each launch's CTAs) is
  affine in I, so two traces, at I/s and 2I/s, give the full shape exactly: ``f(I) = f(I/s) + (f(2I/s) -
  f(I/s)) * (s - 1)``. The shared expert's intermediate scales with the same ``s``. Routing, align and combine
  kernels do not depend on I. The launch config is pinned to the real shape's: ``moe_gemm.default_config``
  does not depend on I, but its decode-tier grid fill (``moe_gemm.fill_grid``) does, so the scaled calls look
  their config up at the real I (:func:`_real_shape_config`). ``s`` may be odd: the second point is then at
  divisor ``s / 2`` (the talker's I = 384: 128 and 256 at ``s`` = 3).

Scaled traces have no distinct-byte counts (the distinct bytes of a GEMM are not linear in I): their HBM bytes are
the unit's minimum (``min_bytes``), see :mod:`.predict`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

BF16 = torch.bfloat16


@dataclass
class Unit:
    """One unit of work of the cost model (module doc): how to count its launches (``launch``, tiny config), how
    to trace its bytes (``trace`` and the scaling rule ``scale``), and its analytic ``min_bytes`` / ``flops`` at the
    real shape."""

    name: str
    group: str  # moe, attention, rope, sampler, mtp, step, code2wav
    mode: str  # "graph" (runs inside a CUDA graph) or "eager"
    launch: Callable[[], Callable[[], object]]  # builds the tiny-config call (cheap)
    min_bytes: float  # fewest HBM bytes at the real shape (weights / inputs once, outputs once)
    flops: float  # useful FLOPs at the real shape
    # builds the real / scaled call (expensive); for the "inter" rule it takes the divisor (s, then s // 2)
    trace: Callable[..., Callable[[], object]] | None = None
    scale: dict = field(default_factory=dict)  # {"rule": "heads"|"inter", "s": s, "kernels": [...scaled]}
    unique: bool = True  # count distinct bytes in the trace (memory ~ 8 B per access)
    params: dict = field(default_factory=dict)
    # {kernel fn name: substring of the static case (omni_fast.kernels.launch.static_case) matching this launch}
    statics: dict = field(default_factory=dict)
    warmup: bool = False  # count the second call (a CUDA-graph path captures on its first; the CPU emulates it)
    # count launches without running the Triton kernels (counter.trace(execute=False)): only for units whose
    # Python never branches on a kernel's output, checked against the executed count in tests/test_cost_model.py
    cheap_count: bool = False
    # the GEMMs' math: "bf16" (tensor cores, the default), "fp32" (IEEE fp32, torch's default matmul without TF32:
    # the FMA units, rate x fma_fraction; the Qwen2.5-Omni Token2Wav runs so, as transformers does) or "tf32"
    # (rate x tf32_fraction): the floor's compute rate
    math: str = "bf16"


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype=BF16, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=_g(seed)) * scale).to(dtype)


def _weights(*shape, dtype=BF16, seed=0, scale=1.0, real: bool = False):
    """Weights of a byte trace: values do not change what is loaded (routing comes from x and the router), so
    the real shapes get constant weights (cheap to make); tiny ones stay random."""
    if real:
        return torch.full(shape, scale, dtype=dtype)
    return _randn(*shape, dtype=dtype, seed=seed, scale=scale)


# --- MoE ------------------------------------------------------------------------------------------------------
MOE = {"thinker": (128, 8, 2048, 768, 0), "talker": (128, 6, 1024, 384, 768)}  # E, k, H, I, shared I
MOE_TINY = {"thinker": (8, 2, 64, 32, 0), "talker": (8, 3, 32, 16, 24)}
# I / s and 2I / s = 128 and 256: multiples of every BLOCK_N / BLOCK_K of every default_config tier (the prefill
# tier's gate/up BLOCK_N is 128, so 64 would leave a partial tile whose CTAs and dot FLOPs are not affine in I).
MOE_SCALE = {"thinker": 6, "talker": 3}


def _divide(n: int, s: float) -> int:
    """``n / s`` where it is a whole number (the scaling rules need exact widths)."""
    q = n / s
    if q != int(q):
        raise ValueError(f"{n} / {s} is not a whole number")
    return int(q)


@contextlib.contextmanager
def _real_shape_config(s: float):
    """The float MoE's launch configs looked up at ``s`` times the intermediate size of each call (the real shape
    of a scaled trace; routed and shared experts are scaled alike), so the tiles do not change with the scale."""
    from omni_fast.kernels import moe_gemm

    if s == 1:
        yield
        return
    get_config = moe_gemm.get_config

    def scaled(num_tokens, num_experts, top_k, hidden, inter, *args, **kwargs):
        real = inter * s
        if real != round(real):
            raise ValueError(f"{inter} * {s} is not a whole number")
        return get_config(num_tokens, num_experts, top_k, hidden, int(round(real)), *args, **kwargs)

    moe_gemm.get_config = scaled
    try:
        yield
    finally:
        moe_gemm.get_config = get_config


def _moe_call(model: str, T: int, dims, dtype, s: float = 1):
    from omni_fast import ops

    E, k, H, I, Is = dims
    I, Is = _divide(I, s), _divide(Is, s)
    x = _randn(T, H, dtype=dtype, seed=T)
    g = _randn(E, H, dtype=dtype, seed=1, scale=H ** -0.5)
    real = E * I * H > 1 << 24
    w13 = _weights(E, 2 * I, H, dtype=dtype, seed=2, scale=0.02, real=real)
    w2 = _weights(E, H, I, dtype=dtype, seed=3, scale=0.02, real=real)
    shared = {}
    if Is:
        shared = dict(shared_w13=_randn(2 * Is, H, dtype=dtype, seed=4, scale=0.02),
                      shared_w2=_randn(H, Is, dtype=dtype, seed=5, scale=0.02),
                      shared_gate_weight=_randn(1, H, dtype=dtype, seed=6, scale=0.02))

    def call():
        with _real_shape_config(s):
            return ops.moe_block(x, g, w13, w2, k, **shared)

    return call


def _moe_min(model: str, T: int, expert_bytes: float = 2.0) -> tuple[float, float]:
    """(bytes, FLOPs) at the real shape; ``expert_bytes`` per routed-expert weight (bf16 2; quantized formats:
    :data:`QUANT_BYTES`), everything else bf16."""
    E, k, H, I, Is = MOE[model]
    touched = E * (1 - (1 - k / E) ** T)  # expected distinct experts of T random top-k picks
    nbytes = expert_bytes * touched * 3 * I * H + 2 * (E * H + 3 * Is * H + 2 * T * H)
    flops = 2 * T * (k * 3 * I * H + E * H + 3 * Is * H)
    return nbytes, flops


def _moe_tier(model: str, T: int) -> str:
    """The static case of the unit's gate/up launches: prefill, decode, or at T=1 the grid-fill tiles
    (``moe_gemm.fill_grid``: 16 columns on the talker, 32 on the thinker)."""
    if T >= 4096:
        return "prefill"
    return {"talker": "decode-fill n16", "thinker": "decode-fill n32"}[model] if T == 1 else "decode"


def moe_units() -> list[Unit]:
    """The fused-MoE units: thinker and talker experts at T = 1, 8, 64 and 4096 tokens (bf16), traced at the real
    shape or by the exact ``inter`` rule."""
    out = []
    for model in ("thinker", "talker"):
        for T in (1, 8, 64, 4096):
            nbytes, flops = _moe_min(model, T)
            big = T >= 4096
            # traced at the real shape: T=1 and the talker's decode; the rest by the exact "inter" rule (at the
            # real shape the thinker's T=8 / 64 take 30-60 min each on the interpreter)
            s = MOE_SCALE[model] if big or (model == "thinker" and T > 1) else 1
            out.append(Unit(
                f"moe-{model}-T{T}", "moe", "eager" if big else "graph",
                # launches at T=4096 counted at T=600: the same default_config tier (rows per expert > 128 on
                # the tiny 8 experts, top-2/3) and alignment path, a seventh of the interpreter's time
                launch=lambda m=model, T=T: _moe_call(m, min(T, 600), MOE_TINY[m], torch.float32), cheap_count=big,
                trace=lambda s2=s, m=model, T=T: _moe_call(m, T, MOE[m], BF16, s2),
                scale=dict(rule="inter", s=s, kernels=["triton:moe_gemm_kernel"]) if s > 1 else {},
                statics={"moe_gemm_kernel": "bf16,E128 N768/384/192," + _moe_tier(model, T) + ",gate_up,ptr"},
                unique=T == 1 or (model == "talker" and T <= 8), min_bytes=nbytes, flops=flops, params=dict(T=T, E=MOE[model][0], k=MOE[model][1])))
    return out


# The published formats: fp8 block 128x128 (Qwen's FP8 checkpoints: e4m3 + one fp32 scale per block), fp8 per
# channel (compressed-tensors' float-quantized "channel" strategy: one fp32 scale per output row, activations
# dynamic per token), int4 g128 asymmetric (AWQ-style: half a byte + a bf16 scale and an int8 zero point per 128
# weights).
QUANT_FORMATS = {"fp8": dict(format="fp8_block", block=(128, 128)),
                 "fp8_channel": dict(format="fp8_channel"),
                 "int4": dict(format="int4_w4a16", group_size=128, symmetric=False, scale_dtype=BF16)}
QUANT_BYTES = {"fp8": 1 + 4 / (128 * 128), "int4": 0.5 + (2 + 1) / 128}
QUANT_LABELS = {"fp8": "fp8_block,bf16,block128x128", "fp8_channel": "fp8_channel,bf16,channel,dynamic",
                "int4": "int4_w4a16,bf16,g128,asym"}


def quant_bytes(fmt: str, model: str) -> float:
    """Bytes per routed-expert weight of ``fmt``: fp8_channel's fp32 row scales are ``2I + H`` per expert over its
    ``3IH`` weights (0.3 % on the thinker), the others per group / block (:data:`QUANT_BYTES`)."""
    if fmt == "fp8_channel":
        _, _, H, I, _ = MOE[model]
        return 1 + 4 * (2 * I + H) / (3 * I * H)
    return QUANT_BYTES[fmt]


def _quant_experts(fmt: str, E: int, I: int, H: int, real: bool):
    """A QuantizedExperts of ``fmt`` (tiny: quantized random weights; real: constant tensors of the format's
    dtypes and shapes built directly, since values do not change what is loaded)."""
    from omni_fast.ops import QuantizedExperts
    from omni_fast.reference import moe_quant as rq

    kw = dict(QUANT_FORMATS[fmt])
    if not real:  # tiny widths: groups of 16 (launches do not depend on the group size)
        kw.update(group_size=16) if fmt == "int4" else None
        return rq.quantize_experts(_randn(E, 2 * I, H, dtype=torch.float32, seed=2, scale=0.02),
                                   _randn(E, H, I, dtype=torch.float32, seed=3, scale=0.02), kw.pop("format"), **kw)
    if fmt in ("fp8", "fp8_channel"):
        w = [torch.full((E, n, k), 0.5).to(torch.float8_e4m3fn) for n, k in ((2 * I, H), (H, I))]
        if fmt == "fp8_channel":
            return QuantizedExperts.fp8_channel(w[0], w[1], torch.full((E, 2 * I, 1), 1e-3),
                                                torch.full((E, H, 1), 1e-3))
        s = [torch.full((E, -(-n // 128), -(-k // 128)), 1e-3) for n, k in ((2 * I, H), (H, I))]
        return QuantizedExperts.fp8_block(w[0], w[1], s[0].contiguous(), s[1], (128, 128))
    w = [torch.full((E, n, k // 8), 0x12345678, dtype=torch.int32) for n, k in ((2 * I, H), (H, I))]
    s = [torch.full((E, n, k // 128), 1e-3, dtype=BF16) for n, k in ((2 * I, H), (H, I))]
    z = [torch.zeros(E, n, k // 128, dtype=torch.int8) for n, k in ((2 * I, H), (H, I))]
    return QuantizedExperts.int4(w[0], w[1], s[0], s[1], 128, z[0], z[1], symmetric=False)


# The thinker's quantized traces at T > 1 run at I / 6 = 128 and 2I / 6 = 256 (the "inter" rule, routed GEMMs only:
# the multiples of 128 keep the 128-wide K tiles, fp8 blocks and int4 groups whole, so every count is affine in I);
# in full they take 30-60 min each on the interpreter. The talker's I = 384 has no such pair below itself.
QUANT_SCALE = {"thinker": 6, "talker": 1}


def _quant_moe_call(fmt: str, T: int, dims, dtype, s: int = 1):
    from omni_fast import ops

    E, k, H, I, Is = dims
    I = I // s  # the routed experts only; the talker's bf16 shared expert keeps its width
    x = _randn(T, H, dtype=dtype, seed=T)
    g = _randn(E, H, dtype=dtype, seed=1, scale=H ** -0.5)
    experts = _quant_experts(fmt, E, I, H, real=E * I * H > 1 << 24)
    shared = {}
    if Is:  # the talker's shared expert stays in the model dtype
        shared = dict(shared_w13=_randn(2 * Is, H, dtype=dtype, seed=4, scale=0.02),
                      shared_w2=_randn(H, Is, dtype=dtype, seed=5, scale=0.02),
                      shared_gate_weight=_randn(1, H, dtype=dtype, seed=6, scale=0.02))
    return lambda: ops.moe_block(x, g, experts, None, k, **shared)


def quant_moe_units() -> list[Unit]:
    """Quantized routed experts (fp8 block W8A8, fp8 per-channel W8A8, int4 g128 W4A16) at decode T = 1 / 8 / 64,
    byte-traced at the real shape (distinct bytes where T <= 8), the thinker's T > 1 by the exact "inter" rule
    (:data:`QUANT_SCALE`)."""
    out = []
    for fmt in QUANT_FORMATS:
        for model in ("thinker", "talker"):
            for T in (1, 8, 64):
                nbytes, flops = _moe_min(model, T, quant_bytes(fmt, model))
                s = QUANT_SCALE[model] if T > 1 else 1
                out.append(Unit(
                    f"moe-{model}-{fmt}-T{T}", "moe", "graph",
                    launch=lambda f=fmt, m=model, T=T: _quant_moe_call(f, T, MOE_TINY[m], torch.float32),
                    trace=lambda s2=s, f=fmt, m=model, T=T: _quant_moe_call(f, T, MOE[m], BF16, s2),
                    scale=dict(rule="inter", s=s, kernels=["triton:moe_gemm_quant_kernel"]) if s > 1 else {},
                    statics={"moe_gemm_quant_kernel": f"{QUANT_LABELS[fmt]},decode,gate_up"},
                    unique=T <= 8 and s == 1, min_bytes=nbytes, flops=flops,
                    params=dict(T=T, E=MOE[model][0], k=MOE[model][1], format=QUANT_FORMATS[fmt]["format"])))
    return out


# --- attention ------------------------------------------------------------------------------------------------
def _varlen_call(lens, hq, hk, d, causal, dtype=BF16):
    from omni_fast import ops

    total = sum(lens)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    q, k, v = (_randn(total, h, d, dtype=dtype, seed=i) for i, h in enumerate((hq, hk, hk)))
    return lambda: ops.flash_attn_varlen(q, k, v, cu, cu, max(lens), max(lens), causal=causal)


def _kvcache_call(B, cached, hq, hk, d, dtype=BF16):
    from omni_fast import ops

    q = _randn(B, 1, hq, d, dtype=dtype, seed=1)
    kc, vc = _randn(B, cached + 1, hk, d, dtype=dtype, seed=2), _randn(B, cached + 1, hk, d, dtype=dtype, seed=3)
    kn, vn = _randn(B, 1, hk, d, dtype=dtype, seed=4), _randn(B, 1, hk, d, dtype=dtype, seed=5)
    lens = torch.full((B,), cached, dtype=torch.int32)
    return lambda: ops.flash_attn_with_kvcache(q, kc, vc, k=kn, v=vn, cache_seqlens=lens, causal=True)


def _attn_flops(lens, hq, d, causal) -> float:
    pairs = sum(n * (n + 1) // 2 if causal else n * n for n in lens)
    return 4.0 * pairs * hq * d


def attention_units() -> list[Unit]:
    """The flash-attention units (bf16): thinker causal prefill at 4096 tokens, decode against a cached KV, and the
    encoders' windowed / per-frame attention; traced at the real shape or with heads divided (the ``heads`` rule)."""
    out = []
    T, hq, hk, d = 4096, 32, 4, 128
    out.append(Unit("attn-prefill-4096", "attention", "eager",
                    launch=lambda: _varlen_call([33], 4, 2, 16, True, torch.float32),
                    trace=lambda: _varlen_call([T], hq // 4, hk // 4, d, True),
                    scale=dict(rule="heads", s=4, kernels="all"), unique=False,
                    statics={"attn_fwd_kernel": "bf16,thinker 32/4 d128 prefill]"},
                    min_bytes=2 * T * (2 * hq + 2 * hk) * d, flops=_attn_flops([T], hq, d, True),
                    params=dict(T=T, hq=hq, hk=hk, d=d)))
    # thinker (32 q / 4 kv heads) at 4k and 32k caches; the talker (16 q / 2 kv heads, the same head dim and kernel
    # specialisation) at 4k: half the KV bytes per row, so its grid fill at B=1 is the harder case
    for who, qh, kh, caches in (("", hq, hk, (4096, 32768)), ("talker-", 16, 2, (4096,))):
        for B in (1, 8):
            for cached in caches:
                big = B * cached > 4096 * 8
                out.append(Unit(f"attn-decode-{who}B{B}-{cached // 1024}k", "attention", "graph",
                                # the real cache length: the split-KV choice (as on an H100) depends on it
                                launch=lambda B=B, c=cached: _kvcache_call(B, c, 4, 2, 16, torch.float32),
                                trace=lambda B=B, c=cached, qh=qh, kh=kh: _kvcache_call(B, c, qh, kh, d),
                                unique=not big, statics={"attn_fwd_kernel": "bf16,thinker 32/4 d128 decode"},
                                min_bytes=2 * B * (2 * cached * kh * d + 2 * qh * d + 2 * kh * d),
                                flops=4.0 * B * (cached + 1) * qh * d, params=dict(B=B, cache=cached, hq=qh, hk=kh)))
    audio = [104] * 7 + [52]  # 60 s of audio: 13 tokens a second, 780 in 104-token windows (the last one partial)
    vision = [1024, 1024]  # two temporal patches of a 512x512 frame pair (32x32 patches each)
    for name, lens, h, dd in (("audio", audio, 20, 64), ("vision", vision, 16, 72)):
        out.append(Unit(f"attn-encoder-{name}", "attention", "eager",
                        launch=lambda: _varlen_call([7, 5], 2, 2, 16, False, torch.float32),
                        trace=lambda lens=lens, h=h, dd=dd: _varlen_call(lens, h, h, dd, False), unique=True,
                        statics={"attn_fwd_kernel": f"bf16,{name} d{dd}"},
                        min_bytes=2 * 4 * sum(lens) * h * dd, flops=_attn_flops(lens, h, dd, False),
                        params=dict(lens=f"{len(lens)}x~{max(lens)}", heads=h, d=dd)))
    return out


# --- RoPE, sampler ----------------------------------------------------------------------------------------------
def _rope_call(T, hq, hk, d, dtype=BF16, section=(24, 20, 20)):
    from omni_fast import ops

    q, k = _randn(T, hq, d, dtype=dtype, seed=1), _randn(T, hk, d, dtype=dtype, seed=2)
    qw, kw = _randn(d, dtype=dtype, seed=3), _randn(d, dtype=dtype, seed=4)
    pos = torch.arange(T).expand(3, T).contiguous()
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))  # precomputed, as the models do
    return lambda: ops.qk_norm_mrope(q, k, qw, kw, pos, mrope_section=section, inv_freq=inv_freq)


def _sample_call(B, V, dtype=torch.float32, chunk: int | None = None):
    """``chunk``: run the two-stage sampler (kernels/sampling_chunked.py) on chunks of this many ids (the tiny
    launch config of a large vocabulary: the same kernels as at 4096-id chunks, a fraction of the interpreter's
    time)."""
    import contextlib

    from omni_fast import ops
    from omni_fast.kernels import sampling_chunked

    logits = _randn(B, V, dtype=dtype, seed=7)

    @contextlib.contextmanager
    def chunks():
        saved = sampling_chunked.CHUNK
        sampling_chunked.CHUNK = chunk or saved
        try:
            yield
        finally:
            sampling_chunked.CHUNK = saved

    def call():
        with chunks():
            return ops.sample(logits, top_k=50, top_p=0.8, seed=1)

    return call


def small_units() -> list[Unit]:
    """The small ops: thinker TM-RoPE + q/k norm at T = 1 / 4096, and the sampler (thinker B = 1, V = 152064;
    MTP B = 64, V = 2048)."""
    out = []
    for T in (1, 4096):
        out.append(Unit(f"rope-thinker-T{T}", "rope", "graph" if T == 1 else "eager",
                        launch=lambda T=T: _rope_call(min(T, 9), 4, 2, 16, torch.float32, (4, 2, 2)),
                        trace=lambda T=T: _rope_call(T, 32, 4, 128), unique=True,
                        statics={"mrope_kernel": "bf16,D128,norm=True"},
                        min_bytes=2 * 2 * T * 36 * 128 + 3 * 8 * T, flops=0.0, params=dict(T=T)))
    for name, B, V in (("thinker-B1", 1, 152064), ("mtp-B64", 64, 2048)):
        chunk = 128 if V > 4096 else None  # the two-stage sampler (kernels/sampling_chunked.py), at 128-id chunks
        # warmup: the first call in a process makes the cached default-offset zero (ops.sampling._device_zero),
        # which a graph-captured call never launches; counting the second call keeps the count order-independent
        out.append(Unit(f"sampler-{name}", "sampler", "graph", warmup=True,
                        launch=lambda V=V, B=B, c=chunk: _sample_call(min(B, 3), min(V, 300), chunk=c),
                        trace=lambda B=B, V=V: _sample_call(B, V), unique=True,
                        statics={"sample_kernel": "fp32,V2048,topk,topp",
                                 "sample_chunk_topk_kernel": "chunk_topk[fp32,V152064,topk,topp]",
                                 "sample_combine_kernel": "combine[fp32,V152064,topk,topp]"},
                        min_bytes=4 * B * V + 8 * B, flops=0.0, params=dict(B=B, V=V)))
    return out
