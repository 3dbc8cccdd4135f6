"""Flash-attention benchmark cases: the five attention shapes of Qwen3-Omni (bf16).

- audio windows: 20 heads, d 64, bidirectional inside 104-token windows (cu_seqlens), 1k-30k tokens;
- vision frames: 16 heads, d 72, full attention per frame of 1k-4k tokens;
- thinker causal prefill: 32 q / 4 kv heads, d 128, one sequence of 1k-32k tokens;
- thinker chunked prefill: 512-2048 new tokens against 8k-32k cached (KV-cache op, causal bottom-right);
- thinker decode: batch 1-64, one token against 1k-32k cached tokens (split-KV at small batch);
- Code2Wav pre-transformer: 16 heads, d 64, causal sliding window 72.

Providers (each left out where it cannot run; a provider that raises is dropped by the harness):
``eager`` the masked PyTorch reference (only where its dense per-sequence scores fit in memory),
``sdpa_<backend>`` PyTorch SDPA forced to one backend (math, efficient, flash, cudnn) with the equivalent mask
(``is_causal`` when that is exact, else a dense bool mask), ``flex`` FlexAttention (compiled) with a block mask,
``omni_fast`` the Triton kernels; for the encoder shapes also ``omni_fast_nomax`` (``max_seqlen=None``: the packed
grid the patched encoders launch) and ``omni_fast_per_window`` (one launch per window/frame, what transformers'
non-flash encoder path makes of an attention function).

flops = 4 * D * Hq * (number of visible query-key pairs): only unmasked work counts. bytes = q, k, v read once and
the output written once (for decode: the cache dominates, so % of HBM bandwidth is the figure of merit).
"""

from __future__ import annotations

import torch

from omni_fast.bench.case import Case, Unavailable, dtype_name
from omni_fast.bench.cases._compile import compiled

AUDIO = dict(hq=20, hk=20, d=64, window=104)
VISION = dict(hq=16, hk=16, d=72)
THINKER = dict(hq=32, hk=4, d=128)
CODE2WAV = dict(hq=16, hk=16, d=64, window=72)
REAL = dict(audio=AUDIO, vision=VISION, thinker=THINKER, code2wav=CODE2WAV, dtype=torch.bfloat16)
# "smoke": the same five shapes' structure (windows, GQA, a head_dim that is not a power of two for vision) at tiny
# sizes, fp32 (bf16 math is wrong on the interpreter).
TINY = dict(audio=dict(hq=2, hk=2, d=16, window=8), vision=dict(hq=2, hk=2, d=24), thinker=dict(hq=4, hk=1, d=32),
            code2wav=dict(hq=2, hk=2, d=16, window=6), dtype=torch.float32)
DIMS = {"quick": REAL, "full": REAL, "smoke": TINY}

SHAPES = {
    "quick": {
        "audio": (4160,), "vision": ((4, 1024),), "prefill": (4096,), "chunked": ((1024, 8192),),
        "decode": ((1, 8192), (32, 8192)), "code2wav": (2048,),
    },
    "full": {
        "audio": (1040, 4160, 16640, 29952), "vision": ((8, 1024), (4, 2048), (2, 4096)),
        "prefill": (1024, 4096, 16384, 32768), "chunked": ((512, 8192), (2048, 8192), (512, 32768), (2048, 32768)),
        "decode": ((1, 1024), (1, 8192), (1, 32768), (8, 8192), (8, 32768), (64, 1024), (64, 8192), (64, 32768)),
        "code2wav": (512, 2048, 8192),
    },
    "smoke": {
        "audio": (20,), "vision": ((2, 12),), "prefill": (24,), "chunked": ((5, 20),), "decode": ((1, 20), (3, 20)),
        "code2wav": (20,),
    },
}
EAGER_LIMIT = 4 << 30  # bytes of fp32 scores one eager sequence may materialise
MASK_LIMIT = 2 << 30  # bytes of a dense bool mask for SDPA
SDPA_BACKENDS = ("math", "efficient", "flash", "cudnn")


# --- work counts --------------------------------------------------------------------------------------------


def visible_pairs(Lq: int, Lk: int, left: int = -1, right: int = -1) -> int:
    """Number of visible (query, key) pairs of one sequence (bottom-right aligned window, -1 unbounded)."""
    total = 0
    off = Lk - Lq
    for i in range(Lq):
        lo = 0 if left < 0 else max(0, i + off - left)
        hi = Lk - 1 if right < 0 else min(Lk - 1, i + off + right)
        total += max(0, hi - lo + 1)
    return total


# --- providers ------------------------------------------------------------------------------------------------


def _flex():
    """``(flex_attention, create_block_mask)``, or None where this torch has no FlexAttention."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception:
        return None
    return flex_attention, create_block_mask


def sdpa_cuda_refusal(name: str, q4, k4, v4, mask, is_causal: bool, gqa: bool) -> str | None:
    """Why SDPA's ``name`` backend (flash, efficient, cudnn) would refuse these CUDA inputs, or None when it takes
    them: PyTorch's own dispatch checks (``torch.backends.cuda.can_use_*_attention``, debug on: their warnings give
    the reason), so a GPU run reports e.g. "flash takes no attn_mask" as a skip rather than as an error. None too
    when the check cannot run (another torch) or refuses without a reason: the provider then runs and says for
    itself."""
    import warnings

    try:
        from torch.backends.cuda import SDPAParams

        check = {"flash": torch.backends.cuda.can_use_flash_attention,
                 "efficient": torch.backends.cuda.can_use_efficient_attention,
                 "cudnn": torch.backends.cuda.can_use_cudnn_attention}[name]
        if mask is not None and mask.dtype == torch.bool:  # as SDPA does before it picks a backend
            mask = torch.zeros(mask.shape, dtype=q4.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ok = check(SDPAParams(q4, k4, v4, mask, 0.0, is_causal, gqa), True)
    except Exception:  # noqa: BLE001 - no verdict: let the provider run
        return None
    reasons = [str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()]
    if ok or not reasons:  # no stated reason: no verdict either (the run will say)
        return None
    return "; ".join(dict.fromkeys(reasons))[:200]


def _sdpa(q4, k4, v4, *, mask=None, is_causal=False, scale=None):
    """SDPA providers, one per backend: q4 ``[B, Hq, Lq, D]``, k4/v4 ``[B, Hk, Lk, D]``. Backends that cannot take
    these inputs are ``Unavailable``: efficient and cudnn on a CPU; on CUDA, whatever PyTorch's dispatch checks
    refuse (:func:`sdpa_cuda_refusal`: fp32 for flash, an explicit mask for flash, ...)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gqa = q4.shape[1] != k4.shape[1]
    fns = {}
    cuda = q4.device.type == "cuda"
    for name in SDPA_BACKENDS:
        if name in ("efficient", "cudnn") and not cuda:
            fns[f"sdpa_{name}"] = Unavailable("needs CUDA")
            continue
        refusal = sdpa_cuda_refusal(name, q4, k4, v4, mask, is_causal, gqa) if cuda and name != "math" else None
        if refusal is not None:
            fns[f"sdpa_{name}"] = Unavailable(refusal)
            continue
        backend = {"math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                   "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[name]

        def run(backend=backend):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, is_causal=is_causal,
                                                                        scale=scale, enable_gqa=gqa)

        fns[f"sdpa_{name}"] = run
    if mask is not None and q4.shape[1] * mask.shape[-2] * mask.shape[-1] * 4 > EAGER_LIMIT:
        # the math backend materialises fp32 scores per head
        fns["sdpa_math"] = Unavailable("its dense fp32 scores would not fit")
    return fns


def _flex_provider(q4, k4, v4, mask_mod, Lq, Lk):
    """FlexAttention, compiled (on a CPU through dynamo with the aot_eager backend, see ``_compile``)."""
    got = _flex()
    if got is None:
        return {"flex": Unavailable("this torch has no FlexAttention")}
    flex_attention, create_block_mask = got
    flex = compiled(flex_attention, q4.device)
    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=Lq, KV_LEN=Lk, device=q4.device)
    gqa = q4.shape[1] != k4.shape[1]
    return {"flex": lambda: flex(q4, k4, v4, block_mask=block_mask, enable_gqa=gqa)}


def _rand(device, dtype, *shape):
    return torch.randn(*shape, device=device, dtype=dtype)


def _varlen_setup(lens: list[int], hq: int, hk: int, d: int, causal: bool, window: tuple[int, int],
                  dtype: torch.dtype = torch.bfloat16):
    """Packed block-diagonal attention (equal q/k lengths per sequence)."""

    def setup(device):
        from omni_fast import ops
        from omni_fast.reference import attention as ref

        T = sum(lens)
        q, k, v = _rand(device, dtype, T, hq, d), _rand(device, dtype, T, hk, d), _rand(device, dtype, T, hk, d)
        cu = torch.tensor([0] + lens, device=device).cumsum(0).to(torch.int32)
        mx = max(lens)
        fns = {"omni_fast": lambda: ops.flash_attn_varlen(q, k, v, cu, cu, mx, mx, causal=causal, window_size=window,
                                                          backend="triton")}
        if len(lens) > 1:
            # what the patched encoders launch (no max_seqlen: grid sized by the token count, no host sync), and
            # transformers' non-flash encoder path under "omni_fast" before the patch: one launch per window
            fns["omni_fast_nomax"] = lambda: ops.flash_attn_varlen(q, k, v, cu, cu, None, None, causal=causal,
                                                                   window_size=window, backend="triton")
            one = torch.tensor([0], device=device, dtype=torch.int32)
            splits = [(q[a:a + n], k[a:a + n], v[a:a + n], torch.cat([one, one + n]))
                      for a, n in zip(cu[:-1].tolist(), lens)]
            fns["omni_fast_per_window"] = lambda: [
                ops.flash_attn_varlen(qw, kw, vw, c, c, qw.shape[0], qw.shape[0], causal=causal, window_size=window,
                                      backend="triton") for qw, kw, vw, c in splits]
        fns["eager"] = ((lambda: ref.flash_attn_varlen(q, k, v, cu, cu, mx, mx, causal=causal, window_size=window))
                        if hq * mx * mx * 4 <= EAGER_LIMIT else Unavailable("its dense fp32 scores would not fit"))
        q4, k4, v4 = (t.transpose(0, 1)[None] for t in (q, k, v))
        if len(lens) == 1 and window == (-1, -1):
            fns.update(_sdpa(q4, k4, v4, is_causal=causal))
        elif T * T <= MASK_LIMIT:
            mask = ref.varlen_mask(cu, cu, causal=causal, window_size=window)
            fns.update(_sdpa(q4, k4, v4, mask=mask))
        else:
            fns.update({f"sdpa_{b}": Unavailable("its dense mask would not fit") for b in SDPA_BACKENDS})
        doc = torch.repeat_interleave(torch.arange(len(lens), device=device), torch.tensor(lens, device=device))
        left, right = ref.normalize_window(causal, window)

        def mask_mod(b, h, qi, ki):
            ok = doc[qi] == doc[ki]
            if left >= 0:
                ok = ok & (ki >= qi - left)
            if right >= 0:
                ok = ok & (ki <= qi + right)
            return ok

        fns.update(_flex_provider(q4, k4, v4, mask_mod, T, T))
        return fns

    return setup


def _kvcache_setup(B: int, new: int, cached: int, hq: int, hk: int, d: int, dtype: torch.dtype = torch.bfloat16):
    """Thinker chunked prefill / decode: ``new`` queries per sequence against ``cached`` + ``new`` keys."""

    def setup(device):
        from omni_fast import ops
        from omni_fast.reference import attention as ref

        S = cached + new
        kc, vc = _rand(device, dtype, B, S, hk, d), _rand(device, dtype, B, S, hk, d)
        q = _rand(device, dtype, B, new, hq, d)
        lens = torch.full((B,), S, dtype=torch.int32, device=device)  # keys already in place: time attention alone
        fns = {"omni_fast": lambda: ops.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, causal=True,
                                                                backend="triton")}
        fns["eager"] = ((lambda: ref.flash_attn_with_kvcache(q, kc, vc, lens, causal=True))
                        if hq * new * S * 4 * B <= EAGER_LIMIT else Unavailable("its dense fp32 scores would not fit"))
        q4, k4, v4 = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
        if new == 1:
            fns.update(_sdpa(q4, k4, v4))  # one query sees every key: no mask
        elif new * S <= MASK_LIMIT:
            fns.update(_sdpa(q4, k4, v4, mask=ref.visible(new, S, -1, 0, device)))
        else:
            fns.update({f"sdpa_{b}": Unavailable("its dense mask would not fit") for b in SDPA_BACKENDS})
        off = S - new

        def mask_mod(b, h, qi, ki):
            return ki <= qi + off

        fns.update(_flex_provider(q4, k4, v4, mask_mod, new, S))
        return fns

    return setup


# --- cases ----------------------------------------------------------------------------------------------------


def _check_varlen(lens, hq, hk, d, causal, window):
    def check():
        from omni_fast import ops
        from omni_fast.reference import attention as ref

        cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
        T = sum(lens)
        q, k, v = torch.randn(T, hq, d), torch.randn(T, hk, d), torch.randn(T, hk, d)
        mx = max(lens)
        exp = ref.flash_attn_varlen(q, k, v, cu, cu, mx, mx, causal=causal, window_size=window)
        for m in (mx, None):  # None: the packed grid (no max_seqlen)
            out = ops.flash_attn_varlen(q, k, v, cu, cu, m, m, causal=causal, window_size=window, backend="triton")
            torch.testing.assert_close(out, exp, rtol=1e-4, atol=1e-4)

    return check


def _check_kvcache(B, new, cached, hq, hk, d):
    def check():
        from omni_fast import ops
        from omni_fast.reference import attention as ref

        kc, vc = torch.randn(B, cached + new, hk, d), torch.randn(B, cached + new, hk, d)
        q, kn, vn = torch.randn(B, new, hq, d), torch.randn(B, new, hk, d), torch.randn(B, new, hk, d)
        lens = torch.full((B,), cached, dtype=torch.int32)
        k2, v2 = kc.clone(), vc.clone()
        out = ops.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens, causal=True, num_splits=2,
                                          backend="triton")
        exp = ref.flash_attn_with_kvcache(q, k2, v2, lens, k=kn, v=vn)
        torch.testing.assert_close(out, exp, rtol=1e-4, atol=1e-4)

    return check


def _varlen_case(name, lens, hq, hk, d, causal, window, params, tags, dtype=torch.bfloat16):
    left, right = (window[0], 0 if causal else window[1])
    pairs = sum(visible_pairs(L, L, left, right) * lens.count(L) for L in set(lens))
    T = sum(lens)
    params = dict(params, dtype=dtype_name(dtype))
    return Case(op="attention", name=name, params=params, setup=_varlen_setup(lens, hq, hk, d, causal, window, dtype),
                flops=4.0 * d * hq * pairs, bytes=float(dtype.itemsize) * d * (2 * T * hq + 2 * T * hk),
                bound="compute",
                check=_check_varlen([5, 3, 9], 2, 1, d, causal, (min(window[0], 4), window[1])), tags=tags)


def cases(preset: str = "quick") -> list[Case]:
    """The benchmark cases of the attention shapes of the module doc (audio windows, vision frames, thinker prefill /
    chunked prefill / decode, Code2Wav sliding window) at ``preset``'s sizes (bf16; smoke: fp32, tiny)."""
    shapes, dims = SHAPES[preset], DIMS[preset]
    dt = dims["dtype"]
    elem = float(dt.itemsize)
    out: list[Case] = []
    a = dims["audio"]
    for T in shapes["audio"]:
        lens = [a["window"]] * (T // a["window"]) + ([T % a["window"]] if T % a["window"] else [])
        out.append(_varlen_case(f"audio windows T={T}", lens, a["hq"], a["hk"], a["d"], False, (-1, -1),
                                {"tokens": T, "window": a["window"], "heads": a["hq"], "head_dim": a["d"]},
                                ("prefill", "audio"), dt))
    v = dims["vision"]
    for frames, L in shapes["vision"]:
        out.append(_varlen_case(f"vision frames {frames}x{L}", [L] * frames, v["hq"], v["hk"], v["d"], False,
                                (-1, -1), {"frames": frames, "frame_tokens": L, "heads": v["hq"], "head_dim": v["d"]},
                                ("prefill", "vision"), dt))
    t = dims["thinker"]
    for T in shapes["prefill"]:
        out.append(_varlen_case(f"thinker prefill T={T}", [T], t["hq"], t["hk"], t["d"], True, (-1, -1),
                                {"tokens": T, "q_heads": t["hq"], "kv_heads": t["hk"], "head_dim": t["d"]},
                                ("prefill", "thinker"), dt))
    c = dims["code2wav"]
    for T in shapes["code2wav"]:
        out.append(_varlen_case(f"code2wav window{c['window']} T={T}", [T], c["hq"], c["hk"], c["d"], True,
                                (c["window"] - 1, -1), {"tokens": T, "window": c["window"], "heads": c["hq"],
                                                         "head_dim": c["d"]}, ("prefill", "code2wav"), dt))
    for new, cached in shapes["chunked"]:
        S = cached + new
        out.append(Case(op="attention", name=f"thinker chunked {new} new + {cached} cached",
                        params={"new": new, "cached": cached, "q_heads": t["hq"], "kv_heads": t["hk"],
                                "head_dim": t["d"], "dtype": dtype_name(dt)},
                        setup=_kvcache_setup(1, new, cached, t["hq"], t["hk"], t["d"], dt),
                        flops=4.0 * t["d"] * t["hq"] * visible_pairs(new, S, -1, 0),
                        bytes=elem * t["d"] * (2 * new * t["hq"] + 2 * S * t["hk"]), bound="compute",
                        check=_check_kvcache(1, 5, 20, 4, 1, 32), tags=("prefill", "chunked")))
    for B, cached in shapes["decode"]:
        out.append(Case(op="attention", name=f"thinker decode B={B} cache={cached}",
                        params={"batch": B, "cached": cached, "q_heads": t["hq"], "kv_heads": t["hk"],
                                "head_dim": t["d"], "dtype": dtype_name(dt)},
                        setup=_kvcache_setup(B, 1, cached, t["hq"], t["hk"], t["d"], dt),
                        flops=4.0 * t["d"] * t["hq"] * B * (cached + 1),
                        bytes=elem * t["d"] * B * (2 * t["hq"] + 2 * (cached + 1) * t["hk"]), bound="memory",
                        check=_check_kvcache(2, 1, 40, 8, 1, 32), tags=("decode",)))
    return out


__all__ = ["cases", "visible_pairs"]
