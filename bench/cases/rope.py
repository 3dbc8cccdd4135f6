"""TM-RoPE benchmark cases: Qwen3-Omni thinker, talker and MTP shapes, plain and fused with the q/k RMSNorm.

Providers: ``eager`` (the PyTorch reference, i.e. transformers' math), ``compile`` (``torch.compile`` of it),
``omni_fast`` (the Triton kernel through ``omni_fast.ops``), ``omni_fast_cuda`` (the CUDA C++ kernel, when CuPy is
importable) and, for the fused norm+rope cases, ``separate`` (the reference RMSNorm, then the omni-fast rope: what
fusing saves). Every provider rotates q and k in place, so repeated calls are valid inputs for the next.

bytes = q and k read and written once, plus positions (and the two norm weights): the op is memory bound, so the
report's % is of the measured copy bandwidth.
"""

from __future__ import annotations

import torch

from omni_fast.bench.case import Case, Unavailable, dtype_name
from omni_fast.bench.cases._compile import compiled

# Per preset: model -> (q heads, kv heads, 3-row TM-RoPE positions?), head_dim, mrope section, dtype. The real
# shapes are the Qwen3-Omni-30B-A3B checkpoint's; "smoke" keeps their structure (GQA ratios, 3-row vs 1-D
# positions, a section summing to head_dim / 2) at tiny sizes, fp32 (bf16 math is wrong on the interpreter).
REAL = dict(models={"thinker": (32, 4, True), "talker": (16, 2, True), "mtp": (16, 8, False)}, head_dim=128,
            section=(24, 20, 20), dtype=torch.bfloat16)
TINY = dict(models={"thinker": (4, 2, True), "talker": (2, 1, True), "mtp": (2, 2, False)}, head_dim=32,
            section=(4, 6, 6), dtype=torch.float32)
DIMS = {"quick": REAL, "full": REAL, "smoke": TINY}
MODELS, HEAD_DIM, SECTION = REAL["models"], REAL["head_dim"], REAL["section"]  # the real shapes, for importers
TOKENS = {
    "quick": {"thinker": (1, 4096), "talker": (1,), "mtp": (2,)},
    "full": {"thinker": (1, 16, 128, 1024, 4096, 8192, 32768), "talker": (1, 16, 256, 2048), "mtp": (1, 2, 32)},
    "smoke": {"thinker": (1, 17), "talker": (1,), "mtp": (2,)},
}
NORM_TOKENS = {"quick": {"thinker": (4096,)}, "full": {"thinker": (1, 1024, 8192), "talker": (1, 256), "mtp": (2,)},
               "smoke": {"thinker": (17,)}}


def _has_cupy() -> bool:
    try:
        import cupy  # noqa: F401
    except Exception:
        return False
    return True


def _cuda_provider(device, fn):
    """The CUDA C++ kernel's provider (it needs CUDA tensors and CuPy to build the kernel)."""
    if torch.device(device).type != "cuda":
        return Unavailable("needs CUDA")
    return fn if _has_cupy() else Unavailable("needs CuPy")


def _inputs(device, T, hq, hk, three_rows, d, dtype):
    """Random q ``[T, hq, d]``, k ``[T, hk, d]`` (made on the device: fast for big T) and int64 positions."""
    q = torch.randn(T, hq, d, device=device, dtype=dtype)
    k = torch.randn(T, hk, d, device=device, dtype=dtype)
    pos = torch.randint(0, 32768, (3, T) if three_rows else (T,), device=device)
    return q, k, pos


def _rope_setup(T, hq, hk, three_rows, dims):
    d, section = dims["head_dim"], dims["section"]

    def setup(device):
        from omni_fast import ops
        from omni_fast.reference import rope as ref

        q, k, pos = _inputs(device, T, hq, hk, three_rows, d, dims["dtype"])
        compiled_fn = compiled(ref.mrope, device)
        return {
            "eager": lambda: ref.mrope(q, k, pos, mrope_section=section),
            "compile": lambda: compiled_fn(q, k, pos, mrope_section=section),
            "omni_fast": lambda: ops.mrope(q, k, pos, mrope_section=section, backend="triton"),
            "omni_fast_cuda": _cuda_provider(device, lambda: ops.mrope(q, k, pos, mrope_section=section,
                                                                       backend="cuda")),
        }

    return setup


def _norm_rope_setup(T, hq, hk, three_rows, dims):
    d, section = dims["head_dim"], dims["section"]

    def setup(device):
        from omni_fast import ops
        from omni_fast.reference import rope as ref

        q, k, pos = _inputs(device, T, hq, hk, three_rows, d, dims["dtype"])
        qw = torch.rand(d, device=device).to(q.dtype)
        kw = torch.rand(d, device=device).to(q.dtype)
        compiled_fn = compiled(ref.qk_norm_mrope, device)

        def separate():
            q.copy_(ref.rms_norm(q, qw, 1e-6))
            k.copy_(ref.rms_norm(k, kw, 1e-6))
            ops.mrope(q, k, pos, mrope_section=section, backend="triton")

        return {
            "eager": lambda: ref.qk_norm_mrope(q, k, qw, kw, pos, mrope_section=section),
            "compile": lambda: compiled_fn(q, k, qw, kw, pos, mrope_section=section),
            "separate": separate,
            "omni_fast": lambda: ops.qk_norm_mrope(q, k, qw, kw, pos, mrope_section=section, backend="triton"),
            "omni_fast_cuda": _cuda_provider(device, lambda: ops.qk_norm_mrope(q, k, qw, kw, pos,
                                                                               mrope_section=section,
                                                                               backend="cuda")),
        }

    return setup


def check_mrope() -> None:
    """The Triton kernel against the reference on tiny shapes (fp32, fp16; 3-row and 1-D positions)."""
    _check(norm=False)


def check_qk_norm_mrope() -> None:
    """The fused norm + rope kernel against the reference on tiny shapes."""
    _check(norm=True)


def _check(norm: bool) -> None:
    from omni_fast import ops
    from omni_fast.reference import rope as ref
    from omni_fast.testing import assert_matches_reference

    section = (4, 6, 6)
    for dtype in (torch.float32, torch.float16):
        for three_rows in (True, False):
            g = torch.Generator().manual_seed(1)
            q = torch.randn(5, 3, 32, generator=g).to(dtype)
            k = torch.randn(5, 2, 32, generator=g).to(dtype)
            pos = torch.randint(0, 3000, (3, 5) if three_rows else (5,), generator=g)
            qw, kw = torch.rand(32, generator=g).to(dtype), torch.rand(32, generator=g).to(dtype)
            if norm:
                def run(q_, k_, be=None):
                    return (ops.qk_norm_mrope if be else ref.qk_norm_mrope)(
                        q_, k_, qw.to(q_.dtype), kw.to(q_.dtype), pos, mrope_section=section, inplace=False,
                        **({"backend": be} if be else {}))
            else:
                def run(q_, k_, be=None):
                    return (ops.mrope if be else ref.mrope)(q_, k_, pos, mrope_section=section, inplace=False,
                                                            **({"backend": be} if be else {}))
            out = run(q, k, "triton")
            exact = run(q.double(), k.double())
            same = run(q, k)
            for o, e, s, n in zip(out, exact, same, ("q", "k")):
                assert_matches_reference(o, e, s, name=f"{n} ({dtype}, {'3-row' if three_rows else '1-D'})")


def _bytes(T, hq, hk, three_rows, norm, d=HEAD_DIM, elem=2):
    qk = 2 * T * (hq + hk) * d * elem  # read + write
    return qk + T * 8 * (3 if three_rows else 1) + (2 * d * elem if norm else 0)


def cases(preset: str = "quick") -> list[Case]:
    """The benchmark cases of TM-RoPE, plain and fused with the q/k norm, on thinker / talker / MTP q ``[T, Hq, D]`` and
    k ``[T, Hk, D]`` at ``preset``'s T (bf16; smoke: fp32)."""
    dims = DIMS[preset]
    d, elem = dims["head_dim"], dims["dtype"].itemsize
    out = []
    for norm, table in ((False, TOKENS), (True, NORM_TOKENS)):
        for model, tokens in table[preset].items():
            hq, hk, three_rows = dims["models"][model]
            for T in tokens:
                kind = "qk_norm+rope" if norm else "rope"
                elems = T * (hq + hk) * d
                out.append(Case(
                    op="rope", name=f"{model} {kind} T={T}",
                    params=dict(model=model, T=T, q_heads=hq, kv_heads=hk, head_dim=d, norm=norm,
                                positions="3xT" if three_rows else "T", dtype=dtype_name(dims["dtype"])),
                    setup=(_norm_rope_setup if norm else _rope_setup)(T, hq, hk, three_rows, dims),
                    flops=elems * (3 + (4 if norm else 0)),  # 2 mul + 1 add per element (+ norm)
                    bytes=_bytes(T, hq, hk, three_rows, norm, d, elem),
                    bound="memory",
                    check=check_qk_norm_mrope if norm else check_mrope,
                    tags=("decode",) if T <= 2 else ("prefill",),
                ))
    return out
