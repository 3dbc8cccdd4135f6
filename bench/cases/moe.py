"""Fused-MoE benchmark cases: Qwen3-Omni thinker and talker experts (and the talker's whole sparse block).

Shapes (Qwen3-Omni-30B-A3B): thinker E=128, top-8, H=2048, I=768; talker E=128, top-6, H=1024, I=384, plus a
sigmoid-gated shared expert of intermediate 768. T in {1, 2, 4, ..., 256, 1024, 4096, 16384} ("full").

Providers (bf16, inference mode):

- ``hf_eager``: transformers' own experts module (the per-expert Python loop), ``hf_grouped_mm`` /
  ``hf_batched_mm``: the same module with transformers' grouped_mm / batched_mm experts implementations (left
  out when they cannot run on the device);
- ``compile``: ``torch.compile`` of a sort + grouped-GEMM formulation of the experts (:func:`grouped_experts`:
  pairs sorted by expert, ``grouped_mm`` over expert offsets computed on device, weighted sum over the k slots).
  Not of the reference itself: its loop over ``torch.unique(ids).tolist()`` syncs with the host and makes dynamo
  specialise (and recompile) on every set of hit experts, which measures the compiler, not a compiled MoE.
  Left out where torch has no ``grouped_mm``;
- ``liger``: liger-kernel's Triton fused MoE (experts cases; when its wheel was carried, see :mod:`omni_fast.bench.peers`);
- ``omni_fast``: :func:`omni_fast.ops.moe_experts` / :func:`omni_fast.ops.moe_block` on the Triton kernels;
- ``omni_fast_fp8`` / ``omni_fast_int4`` (experts cases): the same experts quantized once (FP8 block-scaled W8A8,
  128x128 blocks; INT4 W4A16 group 128, asymmetric) through :func:`omni_fast.ops.moe_experts` with a
  ``QuantizedExperts``; their decode bytes are in the case's params (``bytes_fp8``, ``bytes_int4``);
- ``omni_fast_tma`` (experts cases): the same kernels and launch config with the weight tiles read through TMA
  tensor descriptors (``USE_TMA`` forced on in both GEMMs), so a run shows what the TMA path gives at every T before
  (or without) tuning; where a tuned file already turns it on, the two rows coincide.

Roofline: ``bytes`` = the touched experts' weights (exact count of distinct experts in the benchmark's fixed
routing; for the block, the routing its router gives on its fixed inputs) + activations in and out; ``flops`` =
``2 * T * k * 3 * H * I`` (+ the shared expert and router for the block). ``bound`` follows the issue's
definitions (:func:`bound_for`): ``"memory"`` (bytes / HBM bandwidth) for decode, T <= 64; ``"compute"`` (FLOPs /
bf16 matmul rate) for prefill, T >= 4096, even where the byte floor is the larger one (the thinker at T=4096 on an
H100-like roofline); ``"auto"`` in between (the larger of the two floors on the measured device).

The block case's ``liger`` provider is liger-kernel's fused experts inside the same block: liger has no router or
shared-expert op, so router (logits in the model dtype, fp32 softmax top-k, renormalised, cast back) and shared
expert run as in transformers, around ``LigerFusedMoEFunction``.
"""

from __future__ import annotations

import functools

import torch

from omni_fast.bench import peers
from omni_fast.bench.case import Case, Unavailable, dtype_name
from omni_fast.bench.cases._compile import compiled

MODELS = {
    # name: (E, top_k, H, I, shared I)
    "thinker": (128, 8, 2048, 768, 0),
    "talker": (128, 6, 1024, 384, 768),
}
# "smoke": the same structure (top-k of many experts, a shared expert on the talker) at tiny sizes; H and I multiples
# of 4 so fp32 rows meet grouped_mm's 16-byte stride rule on a CPU.
TINY_MODELS = {"thinker": (8, 2, 64, 32, 0), "talker": (8, 3, 32, 16, 24)}
PRESET_MODELS = {"quick": MODELS, "full": MODELS, "smoke": TINY_MODELS}
TOKENS = {
    "quick": (1, 64, 4096),
    "full": (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, 16384),
    "smoke": (1, 5, 33),
}
# The talker's whole block (with the shared expert): every T of the issue in "full".
BLOCK_TOKENS = {"quick": (1,), "full": TOKENS["full"], "smoke": (3,)}
# The roofline definitions: decode (T <= 64) = touched expert weight bytes / HBM bandwidth, prefill
# (T >= 4096) = FLOPs / bf16 matmul rate. Between them neither is defined: "auto" (the larger floor).
DECODE_MAX_T = 64
PREFILL_MIN_T = 4096
DTYPE = torch.bfloat16
DTYPES = {"quick": DTYPE, "full": DTYPE, "smoke": torch.float32}  # bf16 math is wrong on the interpreter
ELEM = 2  # bytes per bf16 element


@functools.lru_cache(maxsize=None)
def _routing(T: int, E: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed routing for a shape (CPU): softmax top-k of seeded random logits; weights fp32, ids int32."""
    from omni_fast.reference import moe as ref

    gen = torch.Generator().manual_seed(1234 + T)
    return ref.topk_softmax(torch.randn(T, E, generator=gen), k)


def _touched(T: int, E: int, k: int) -> int:
    return int(torch.unique(_routing(T, E, k)[1]).numel())


@functools.lru_cache(maxsize=None)
def _block_inputs(T: int, shape: tuple = MODELS["talker"], dtype: torch.dtype = DTYPE
                  ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The block case's fixed x ``[T, H]`` and router weight ``[E, H]`` (``dtype``, CPU) and the number of distinct
    experts its router picks for them (computed on the CPU: the GPU's bf16 logits may differ in the last bit,
    which can move a near-tie, but hardly the byte count). ``shape``: the talker's (E, top_k, H, I, shared I)."""
    from omni_fast.reference import moe as ref

    E, k, H, _, _ = shape
    gen = torch.Generator().manual_seed(4321 + T)
    x = torch.randn(T, H, generator=gen).to(dtype)
    g = (torch.randn(E, H, generator=gen) * H ** -0.5).to(dtype)
    touched = int(torch.unique(ref.router(x, g, k)[1]).numel())
    return x, g, touched


def _grouped_mm():
    """``torch.nn.functional.grouped_mm`` (torch >= 2.10) or ``torch._grouped_mm`` (>= 2.8), else None."""
    return getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                    topk_ids: torch.Tensor) -> torch.Tensor:
    """The routed experts as one sort + two grouped GEMMs, without host syncs (the ``compile`` baseline).

    x ``[T, H]``, w13 ``[E, 2I, H]``, w2 ``[E, H, I]``, topk_weights ``[T, k]`` (model dtype), topk_ids int
    ``[T, k]``. The ``T*k`` pairs are sorted by expert; ``offs`` (each expert's end row, int32) comes from a
    device-side histogram, so the graph has fixed shapes and no data-dependent control flow. Returns ``[T, H]``.
    """
    mm = _grouped_mm()
    T, k = topk_ids.shape
    E = w13.shape[0]
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    gate, up = mm(x[order // k], w13.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
    y = mm(torch.nn.functional.silu(gate) * up, w2.transpose(-2, -1), offs=offs)
    y = y * topk_weights.reshape(-1)[order, None].to(y.dtype)
    return torch.zeros_like(y).index_copy_(0, order, y).view(T, k, -1).sum(dim=1)


def grouped_block(x, g, w13, w2, top_k: int, sw13, sw2, sg) -> torch.Tensor:
    """The talker's sparse block with :func:`grouped_experts` (router and shared expert as the reference)."""
    from omni_fast.reference import moe as ref

    weights, ids = ref.router(x, g, top_k)
    return grouped_experts(x, w13, w2, weights, ids) + ref.shared_expert(x, sw13, sw2, sg)


def _hf_config(E, k, H, I, Is, talker: bool):
    from transformers.models.qwen3_omni_moe import configuration_qwen3_omni_moe as c

    kw = dict(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=k, norm_topk_prob=True)
    if talker:
        return c.Qwen3OmniMoeTalkerTextConfig(shared_expert_intermediate_size=Is, **kw)
    return c.Qwen3OmniMoeTextConfig(**kw)


def _hf_variants(make_module, probe) -> dict:
    """transformers modules per experts implementation (one config each; weights shared); an implementation that
    cannot run here (its probe call raises) is ``Unavailable`` with the reason."""
    out = {}
    try:
        import transformers  # noqa: F401
    except Exception:
        return out
    for impl in ("eager", "grouped_mm", "batched_mm"):
        try:
            module = make_module(impl)
            with torch.inference_mode():
                probe(module)
            out[f"hf_{impl}"] = module
        except Exception as exc:  # noqa: BLE001 - e.g. grouped_mm's dtype / stride rules on this device
            out[f"hf_{impl}"] = Unavailable(f"does not run here: {type(exc).__name__}: "
                                            f"{(str(exc).splitlines() or [''])[0][:120]}")
    return out


def _experts_setup(model: str, T: int, preset: str = "quick"):
    E, k, H, I, _ = PRESET_MODELS[preset][model]
    dtype = DTYPES[preset]

    def setup(device):
        from omni_fast import ops
        from omni_fast.kernels import moe_gemm

        x = torch.randn(T, H, device=device, dtype=dtype)
        w13 = (torch.randn(E, 2 * I, H, device=device, dtype=dtype) * H ** -0.5)
        w2 = (torch.randn(E, H, I, device=device, dtype=dtype) * I ** -0.5)
        w32, ids = (t.to(device) for t in _routing(T, E, k))
        w = w32.to(dtype)  # transformers hands the experts model-dtype routing weights
        ids64 = ids.long()

        def make(impl):
            from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as q3

            cfg = _hf_config(E, k, H, I, 0, talker=False)
            cfg._experts_implementation = impl
            module = q3.Qwen3OmniMoeThinkerTextExperts(cfg)
            module.gate_up_proj = torch.nn.Parameter(w13, requires_grad=False)
            module.down_proj = torch.nn.Parameter(w2, requires_grad=False)
            return module

        hf = _hf_variants(make, lambda m: m(x[:1], ids64[:1], w[:1]))
        fns = {}
        for name, module in hf.items():
            fns[name] = module if isinstance(module, Unavailable) else functools.partial(_inference, module, x,
                                                                                          ids64, w)
        fns["compile"] = _compile_provider(grouped_experts, device, x, w13, w2, w, ids)
        liger = peers.liger_fused_moe()
        fns["liger"] = (functools.partial(liger, x, w13, w2, w, ids) if liger is not None else
                        Unavailable("needs CUDA and the liger-kernel wheel (make peer-wheels)"))
        fns["omni_fast"] = lambda: ops.moe_experts(x, w13, w2, w, ids, backend="triton")
        fns["omni_fast_tma"] = functools.partial(moe_gemm.fused_moe, x, w13, w2, w, ids,
                                                 config=tma_config(T, E, k, H, I, device, dtype))
        fns.update(quantized_providers(x, w13, w2, w, ids))
        return fns

    return setup


def int4_group(H: int, I: int) -> int:
    """The W4A16 group the benchmark uses: 128 (the published one) where it divides H and I, else the largest
    power of two >= 16 that does (tiny smoke shapes)."""
    g = 128
    while g > 16 and (H % g or I % g):
        g //= 2
    return g


def quantized_providers(x, w13, w2, w, ids) -> dict:
    """``omni_fast_fp8`` (FP8 block-scaled W8A8, 128x128 blocks) and ``omni_fast_int4`` (W4A16, group
    :func:`int4_group`, asymmetric: the AWQ-style general case) on the same experts quantized once at setup;
    ``ops.moe_experts`` with a QuantizedExperts. FP8 needs e4m3 tensor cores (sm_89+) on a GPU."""
    from omni_fast import ops
    from omni_fast.reference import moe_quant as rq

    H, I = w2.shape[1], w2.shape[2]
    out = {}
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (8, 9):
        out["omni_fast_fp8"] = Unavailable("FP8 W8A8 needs sm_89+ (e4m3 tensor cores)")
    else:
        fp8 = rq.quantize_experts(w13, w2, "fp8_block", block=(128, 128))
        out["omni_fast_fp8"] = lambda: ops.moe_experts(x, fp8, None, w, ids, backend="triton")
    int4 = rq.quantize_experts(w13, w2, "int4_w4a16", group_size=int4_group(H, I), symmetric=False,
                               scale_dtype=x.dtype)
    out["omni_fast_int4"] = lambda: ops.moe_experts(x, int4, None, w, ids, backend="triton")
    return out


def quantized_bytes(touched: int, T: int, k: int, H: int, I: int, act_elem: float) -> dict:
    """Decode bytes per format (the touched experts' weights, scales, zero points + activations in/out + routing),
    the roofline numerator of the quantized providers (the case's ``bytes`` is the bf16 one)."""
    acts = 2 * T * H * act_elem + T * k * 8
    cdiv = (lambda a, b: -(-a // b))
    fp8_scales = 4 * (2 * cdiv(I, 128) * cdiv(H, 128) + cdiv(H, 128) * cdiv(I, 128))
    g = int4_group(H, I)
    int4_meta = (3 * H * I // g) * (act_elem + 1)  # a 16-bit scale and an int8 zero point per group
    return {"bytes_fp8": float(touched * (3 * H * I + fp8_scales) + acts),
            "bytes_int4": float(touched * (3 * H * I / 2 + int4_meta) + acts)}


def tma_config(T: int, E: int, k: int, H: int, I: int, device: torch.device, dtype: torch.dtype = DTYPE) -> dict:
    """The launch config ``omni_fast`` uses for this shape, with ``USE_TMA`` on in both GEMMs."""
    from omni_fast.kernels import moe_gemm

    cfg = moe_gemm.get_config(T, E, k, H, I, dtype, torch.device(device))
    cfg["USE_TMA"] = True
    cfg["down"] = dict(cfg.get("down", {}), USE_TMA=True)
    return cfg


def _compile_provider(fn, device, *args):
    """The ``compile`` provider: ``fn`` (:func:`grouped_experts` / :func:`grouped_block`) under ``torch.compile``.
    Its ``grouped_mm`` traces in bf16 only, so at other dtypes (the fp32 smoke preset) it runs on bf16 copies of the
    tensor arguments."""
    if _grouped_mm() is None:
        return Unavailable("this torch has no grouped_mm")
    args = tuple(a.to(torch.bfloat16) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    return functools.partial(_inference, compiled(fn, device), *args)


def _inference(fn, *args):
    with torch.inference_mode():
        return fn(*args)


def bound_for(T: int) -> str:
    """The roofline a case's % refers to, as the issue defines it (see the module docstring)."""
    if T <= DECODE_MAX_T:
        return "memory"
    return "compute" if T >= PREFILL_MIN_T else "auto"


def _tags(T: int) -> tuple[str, ...]:
    return ("decode",) if T <= DECODE_MAX_T else ("prefill",) if T >= PREFILL_MIN_T else ()


def liger_block(liger, x, g, w13, w2, top_k: int, sw13, sw2, sg) -> torch.Tensor:
    """The talker block with liger-kernel's fused experts (``liger``: :func:`omni_fast.bench.peers.liger_fused_moe`); router
    and shared expert as transformers computes them (the routing weights in the model dtype)."""
    from omni_fast.reference import moe as ref

    weights, ids = ref.router(x, g, top_k)
    return liger(x, w13, w2, weights.to(x.dtype), ids) + ref.shared_expert(x, sw13, sw2, sg)


def _block_setup(T: int, preset: str = "quick"):
    shape = PRESET_MODELS[preset]["talker"]
    E, k, H, I, Is = shape
    dtype = DTYPES[preset]

    def setup(device):
        from omni_fast import ops

        # fixed inputs: the case's byte count is for their routing
        x, g = (t.to(device) for t in _block_inputs(T, shape, dtype)[:2])
        w13 = torch.randn(E, 2 * I, H, device=device, dtype=dtype) * H ** -0.5
        w2 = torch.randn(E, H, I, device=device, dtype=dtype) * I ** -0.5
        sw13 = torch.randn(2 * Is, H, device=device, dtype=dtype) * H ** -0.5
        sw2 = torch.randn(H, Is, device=device, dtype=dtype) * Is ** -0.5
        sg = torch.randn(1, H, device=device, dtype=dtype) * H ** -0.5

        def make(impl):
            from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as q3

            cfg = _hf_config(E, k, H, I, Is, talker=True)
            cfg._experts_implementation = impl
            block = q3.Qwen3OmniMoeTalkerTextSparseMoeBlock(cfg).to(device=device, dtype=dtype)
            with torch.no_grad():
                block.gate.weight.copy_(g)
                block.experts.gate_up_proj.copy_(w13)
                block.experts.down_proj.copy_(w2)
                block.shared_expert.gate_proj.weight.copy_(sw13[:Is])
                block.shared_expert.up_proj.weight.copy_(sw13[Is:])
                block.shared_expert.down_proj.weight.copy_(sw2)
                block.shared_expert_gate.weight.copy_(sg)
            return block.requires_grad_(False)

        hf = _hf_variants(make, lambda m: m(x[None, :1]))
        fns = {name: m if isinstance(m, Unavailable) else functools.partial(_inference, m, x[None])
               for name, m in hf.items()}
        fns["compile"] = _compile_provider(grouped_block, device, x, g, w13, w2, k, sw13, sw2, sg)
        liger = peers.liger_fused_moe()
        fns["liger"] = (functools.partial(_inference, functools.partial(liger_block, liger), x, g, w13, w2, k, sw13,
                                          sw2, sg) if liger is not None else
                        Unavailable("needs CUDA and the liger-kernel wheel (make peer-wheels)"))
        fns["omni_fast"] = lambda: ops.moe_block(x, g, w13, w2, k, shared_w13=sw13, shared_w2=sw2,
                                                 shared_gate_weight=sg, backend="triton")
        return fns

    return setup


def check_fused_moe() -> None:
    """Kernel vs reference on a tiny shape (fp32, CPU interpreter or GPU), pointer and TMA weight paths."""
    from omni_fast import ops
    from omni_fast.kernels import moe_gemm
    from omni_fast.reference import moe as ref
    from omni_fast.testing import DEVICE, assert_matches_reference

    T, E, k, H, I = 9, 6, 3, 40, 24
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=gen).to(DEVICE)
    w13 = (torch.randn(E, 2 * I, H, generator=gen) * 0.2).to(DEVICE)
    w2 = (torch.randn(E, H, I, generator=gen) * 0.2).to(DEVICE)
    w, ids = ops.route_topk(torch.randn(T, E, generator=gen).to(DEVICE), k, backend="triton")
    exact = ref.fused_moe(x.double(), w13.double(), w2.double(), w.double(), ids)
    same = ref.fused_moe(x, w13, w2, w, ids)
    assert_matches_reference(ops.moe_experts(x, w13, w2, w, ids, backend="triton"), exact, same, name="fused_moe")
    tma = moe_gemm.fused_moe(x, w13, w2, w, ids, config=tma_config(T, E, k, H, I, DEVICE, x.dtype))
    assert_matches_reference(tma, exact, same, name="fused_moe (TMA weights)")


def check_moe_block() -> None:
    """The talker block (with shared expert) vs reference on a tiny shape."""
    from omni_fast import ops
    from omni_fast.reference import moe as ref
    from omni_fast.testing import DEVICE

    T, E, k, H, I, Is = 7, 6, 2, 32, 16, 24
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: (torch.randn(*s, generator=gen) * 0.2).to(DEVICE)  # noqa: E731
    x, g, w13, w2, sw13, sw2, sg = r(T, H), r(E, H), r(E, 2 * I, H), r(E, H, I), r(2 * Is, H), r(H, Is), r(1, H)
    out = ops.moe_block(x, g, w13, w2, k, shared_w13=sw13, shared_w2=sw2, shared_gate_weight=sg, backend="triton")
    torch.testing.assert_close(out, ref.moe_block(x, g, w13, w2, k, True, sw13, sw2, sg), rtol=1e-4, atol=1e-5)


def _experts_case(model: str, T: int, preset: str = "quick") -> Case:
    E, k, H, I, _ = PRESET_MODELS[preset][model]
    elem = float(DTYPES[preset].itemsize)
    touched = _touched(T, E, k)
    return Case(
        op="moe", name=f"{model} experts T={T}",
        params=dict(model=model, T=T, E=E, top_k=k, H=H, I=I, touched_experts=touched,
                    dtype=dtype_name(DTYPES[preset]), **quantized_bytes(touched, T, k, H, I, elem)),
        setup=_experts_setup(model, T, preset),
        flops=2.0 * T * k * 3 * H * I,
        bytes=float(touched * 3 * H * I * elem + 2 * T * H * elem + T * k * 8),
        bound=bound_for(T),
        check=check_fused_moe,
        tags=_tags(T),
    )


def _block_case(T: int, preset: str = "quick") -> Case:
    shape, dtype = PRESET_MODELS[preset]["talker"], DTYPES[preset]
    E, k, H, I, Is = shape
    elem = float(dtype.itemsize)
    touched = _block_inputs(T, shape, dtype)[2]
    return Case(
        op="moe", name=f"talker block T={T}",
        params=dict(model="talker", block=True, T=T, E=E, top_k=k, H=H, I=I, shared_I=Is, touched_experts=touched,
                    dtype=dtype_name(dtype)),
        setup=_block_setup(T, preset),
        flops=2.0 * T * (k * 3 * H * I + 3 * H * Is + (E + 1) * H),
        bytes=float((touched * 3 * H * I + 3 * H * Is + (E + 1) * H) * elem + 2 * T * H * elem),
        bound=bound_for(T),
        check=check_moe_block,
        tags=_tags(T),
    )


def cases(preset: str) -> list[Case]:
    """Thinker and talker experts at every T of the preset, plus the talker's whole block."""
    out = [_experts_case(m, T, preset) for m in PRESET_MODELS[preset] for T in TOKENS[preset]]
    out += [_block_case(T, preset) for T in BLOCK_TOKENS[preset]]
    return out
