"""Skinny-M linear layers of the MTP code predictor with fused prologues and epilogues (decode GEMV / small GEMM).

One kernel, :func:`gemv_kernel`, computes ``x @ W^T`` for ``M = B*T <= 128`` activation rows and a ``[N, K]``
weight (``K`` = 1024..3072), with

- an optional RMSNorm prologue: each program computes the per-row ``rsqrt(mean(x^2) + eps)`` of its ``BLOCK_M`` rows
  (the rows are tiny and stay in L1/L2: re-reading them per N block costs nothing against the weights) and feeds
  ``rms_norm(x) * w_norm`` (rounded like transformers' ``Qwen3OmniMoeRMSNorm``) to the product;
- an optional embedding gather (``GATHER``): x is a table and input row m is ``x[idx[m]]``, so a decode step's
  first GEMV reads the sampled code's embedding itself (and, ``STORE_ROWS``, writes it out as the residual stream);
- an epilogue: ``PLAIN`` (store ``y``), ``SWIGLU`` (the program owns output columns ``j`` of the gate AND the up
  projection, i.e. rows ``j`` and ``N + j`` of the fused ``[2N, K]`` gate/up weight, and stores
  ``silu(gate) * up``), or ``RESIDUAL`` (``out += y`` in place: o-proj / down-proj plus the residual add).

Roundings are transformers': the linear output is accumulated in fp32 and rounded once to the model dtype; silu is
rounded before the multiply by up; the residual add is rounded after the rounded linear output is added.

Decode is memory-bound (every weight byte is read once per step), so the grid is many programs over N (small
``BLOCK_N``) to spread the weight stream over all SMs. Every M goes through ``tl.dot`` on 16-row M tiles with fp32
accumulation, and the block sizes depend on K and N only (:func:`gemv_blocks`): a row's reduction order (the K
blocks, the order inside one ``tl.dot`` tile) is therefore the same whatever the number of rows, so a frame's
outputs do not depend on the batch it shares a launch with (BATCH INVARIANCE, tested bit-exactly). On sm_90 a
16-row ``tl.dot`` lowers to ``mma.sync`` m16n8k16, the same instruction sequence per 16-row tile whatever M is.
The grid is ``(M tiles, N blocks)`` with the M tiles fastest, so the programs that share a weight tile run side by
side and all but the first read it from L2. Nothing is tuned at run time, so every launch can be captured in a
CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import fast_paths
from .launch import interpreting, launch, static_case
from .tile_counters import tile_counters

PLAIN, SWIGLU, RESIDUAL = 0, 1, 2


@triton.jit
def silu_mul_rounded(g, u, dt: tl.constexpr):
    """``silu(g) * u`` for fp32 values already rounded to ``dt``: silu rounded to ``dt`` first (``F.silu`` on a
    ``dt`` tensor), then the product rounded once (transformers' ``act_fn(gate) * up``). Returns ``dt``."""
    s = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    return (s * u).to(dt)


@triton.jit
def _row_rstd(x_ptr, offs_m, mask_m, stride_xm, K, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 ``rsqrt(mean(x^2) + eps)`` of the rows ``offs_m`` of ``x`` ``[M, K]`` -> ``[BLOCK_M]``."""
    ss = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0).to(tl.float32)
        ss += x * x
    return tl.rsqrt(tl.sum(ss, 1) / K + eps)


@triton.jit
def _mac(acc, x, w, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``acc [BM, BN] += x [BM, BK] @ w [BN, BK]^T`` with fp32 accumulation, always ``tl.dot`` (BM = 16): the one
    reduction order for every M (batch invariance, see the module doc)."""
    if UPCAST:  # the CPU interpreter's fp16/bf16 dot is not trustworthy; compiled kernels never set this
        x = x.to(tl.float32)
        w = w.to(tl.float32)
    return tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)


@triton.jit
def gemv_kernel(
    x_ptr, nw_ptr, w_ptr, out_ptr, idx_ptr, xg_ptr,
    M, N, K, stride_xm, stride_wn, stride_om, stride_gm, eps,
    HAS_NORM: tl.constexpr, EPILOGUE: tl.constexpr, GATHER: tl.constexpr, STORE_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """x ``[M, K]`` (unit stride in K), W ``[N, K]`` (``[2N, K]`` for SWIGLU), out ``[M, N]``; see the module doc.

    ``GATHER``: x is a table and input row m is ``x[idx[m]]`` (an embedding lookup folded into the prologue); with
    ``STORE_ROWS`` the programs of the first N block also store the gathered rows into ``xg`` ``[M, K]`` (the
    residual stream). One program computes one ``(M tile, N block)`` tile (:func:`gemv_tile`)."""
    # M tiles fastest: programs sharing a weight tile run together (L2 hits)
    gemv_tile(tl.program_id(0), tl.program_id(1), x_ptr, nw_ptr, w_ptr, out_ptr, idx_ptr, xg_ptr,
              M, N, K, stride_xm, stride_wn, stride_om, stride_gm, eps, HAS_NORM, EPILOGUE, GATHER, STORE_ROWS,
              BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, DOT_PRECISION)


@triton.jit
def gemv_tile(
    pid_m, pid_n, x_ptr, nw_ptr, w_ptr, out_ptr, idx_ptr, xg_ptr,
    M, N, K, stride_xm, stride_wn, stride_om, stride_gm, eps,
    HAS_NORM: tl.constexpr, EPILOGUE: tl.constexpr, GATHER: tl.constexpr, STORE_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The ``(pid_m, pid_n)`` output tile of :func:`gemv_kernel` (rows ``pid_m * BLOCK_M ...``, columns
    ``pid_n * BLOCK_N ...``): shared by the one-tile-per-program launch and the persistent frame kernel
    (:mod:`.mtp_persistent`), so both compute every tile with the same instructions."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    dt = out_ptr.dtype.element_ty
    rows = offs_m.to(tl.int64)
    src = rows  # the x row each output row reads
    if GATHER:
        src = tl.load(idx_ptr + rows, mask=mask_m, other=0).to(tl.int64)
    w_rows = offs_n.to(tl.int64) * stride_wn
    rstd = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if HAS_NORM:
        rstd = _row_rstd(x_ptr, src, mask_m, stride_xm, K, eps, BLOCK_M, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x_mask = mask_m[:, None] & mask_k[None, :]
        x = tl.load(x_ptr + src[:, None] * stride_xm + offs_k[None, :], mask=x_mask, other=0.0)
        if STORE_ROWS:
            if pid_n == 0:  # one copy of the gathered rows (every N block reads the same ones)
                tl.store(xg_ptr + rows[:, None] * stride_gm + offs_k[None, :], x, mask=x_mask)
        if HAS_NORM:
            # Qwen3 RMSNorm: normalise in fp32, round to the model dtype, multiply by the weight, round again.
            nw = tl.load(nw_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            x = ((x.to(tl.float32) * rstd[:, None]).to(dt).to(tl.float32) * nw[None, :]).to(dt)
        w_mask = mask_n[:, None] & mask_k[None, :]
        w = tl.load(w_ptr + w_rows[:, None] + offs_k[None, :], mask=w_mask, other=0.0)
        acc = _mac(acc, x, w, UPCAST, DOT_PRECISION)
        if EPILOGUE == 1:  # SWIGLU: the matching up rows N + j of the fused gate/up weight
            w_up = tl.load(w_ptr + N * stride_wn + w_rows[:, None] + offs_k[None, :], mask=w_mask, other=0.0)
            acc_up = _mac(acc_up, x, w_up, UPCAST, DOT_PRECISION)
    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    y = acc.to(dt)  # F.linear's one rounding of the fp32 accumulator
    if EPILOGUE == 1:
        y = silu_mul_rounded(y.to(tl.float32), acc_up.to(dt).to(tl.float32), dt)
    elif EPILOGUE == 2:
        resid = tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
        y = (resid + y.to(tl.float32)).to(dt)
    tl.store(out_ptrs, y, mask=out_mask)


@triton.jit
def gemv_residual_splitk_kernel(
    x_ptr, w_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, k_split, stride_xm, stride_wn, stride_om,
    SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """``out += round(x @ W^T)`` (the ``RESIDUAL`` form) with K split over ``SPLITS`` programs per output tile.

    Grid ``(M tiles, N blocks, SPLITS)``. Program ``s`` accumulates the K range ``[s*k_split, (s+1)*k_split)`` in
    fp32 (``tl.dot`` over ``BLOCK_K`` steps, as :func:`gemv_tile`) and stores it to ``ws[s]`` (fp32 ``[SPLITS, M,
    N]``); then (CTA barrier, one acq_rel gpu-scope ticket on the tile's counter) the program that draws the last
    ticket sums ``ws[0..SPLITS-1]`` in that fixed order, rounds once, adds the residual (rounded again, as the
    unsplit kernel) and resets the counter to 0 for the next launch. Which program finishes last does not change
    the sum's order: the result is deterministic, and the split depends on N and K only (batch invariant).
    """
    pid_m, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    rows = offs_m.to(tl.int64)
    w_rows = offs_n.to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_s * k_split
    k_hi = tl.minimum(k_lo + k_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_hi
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)
        w = tl.load(w_ptr + w_rows[:, None] + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc = _mac(acc, x, w, UPCAST, DOT_PRECISION)
    tile_mask = mask_m[:, None] & mask_n[None, :]
    ws_tile = rows[:, None] * N + offs_n[None, :]
    tl.store(ws_ptr + pid_s * M * N + ws_tile, acc, mask=tile_mask)
    # every thread's partial is stored before the ticket (CTA barrier, then a gpu-scope acq_rel atomic by the
    # signalling thread: cumulative over what the barrier ordered; the last ticket's acquire sees every partial)
    tl.debug_barrier()
    tile = pid_m * tl.num_programs(1) + pid_n
    ticket = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
    if ticket == SPLITS - 1:
        total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s in tl.static_range(SPLITS):  # fixed order: bitwise the same whoever finishes last
            total += tl.load(ws_ptr + s * M * N + ws_tile, mask=tile_mask, other=0.0, cache_modifier=".cg")
        dt = out_ptr.dtype.element_ty
        out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :]
        resid = tl.load(out_ptrs, mask=tile_mask, other=0.0).to(tl.float32)
        tl.store(out_ptrs, (resid + total.to(dt).to(tl.float32)).to(dt), mask=tile_mask)
        tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")


# Split-K of the residual GEMVs (o-proj, down-proj: N = 1024 -> 64 programs of 16 columns on 132 SMs). Opt-in until
# a GPU run passes test_mtp_gemv_splitk.py's gpu-marked split-K test (project rule for new fast paths): the fast
# path "gemv_splitk" of omni_fast.fast_paths (OMNI_FAST_GEMV_SPLITK=1, or fast_paths.enable("gemv_splitk")). Off,
# the launches are exactly today's.
TARGET_CTAS = 132  # one program per SM of an H100 SXM
MAX_SPLITS = 8


def gemv_splits(N: int, K: int, blocks: dict | None = None) -> tuple[int, int]:
    """(splits, K per split) for a residual GEMV of ``N`` outputs and ``K`` inputs: the fewest splits that give
    :data:`TARGET_CTAS` programs at one M tile (``N`` blocks x splits), each split a whole number of ``BLOCK_K``
    steps, no empty split; (1, K) when the N blocks alone fill the SMs. From N and K only (batch invariance).
    At the real MTP shapes (predicted): o-proj K 2048 -> 3 splits of 768, down K 3072 -> 3 of 1024 (192
    programs each instead of 64)."""
    blocks = blocks or gemv_blocks(1, N, K)
    n_blocks = triton.cdiv(N, blocks["BLOCK_N"])
    k_blocks = triton.cdiv(K, blocks["BLOCK_K"])
    want = min(MAX_SPLITS, k_blocks, triton.cdiv(TARGET_CTAS, max(n_blocks, 1)))
    if want <= 1:
        return 1, K
    per = triton.cdiv(k_blocks, want)
    return triton.cdiv(k_blocks, per), per * blocks["BLOCK_K"]


def _launch_splitk(x, weight, resid, splits: int, k_split: int, blocks: dict) -> None:
    M, N = resid.shape
    grid = (triton.cdiv(M, blocks["BLOCK_M"]), triton.cdiv(N, blocks["BLOCK_N"]), splits)
    ws = torch.empty(splits, M, N, dtype=torch.float32, device=x.device)
    launch(gemv_residual_splitk_kernel, grid, x, weight, resid, ws, tile_counters(x.device, grid[0] * grid[1]),
           M, N, x.shape[1], k_split, x.stride(0), weight.stride(0), resid.stride(0), SPLITS=splits,
           BLOCK_M=blocks["BLOCK_M"], BLOCK_N=blocks["BLOCK_N"], BLOCK_K=blocks["BLOCK_K"],
           num_warps=blocks["num_warps"], UPCAST=interpreting(),
           DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", device=x.device)


def gemv_blocks(M: int, N: int, K: int) -> dict:
    """Fixed launch config for ``N`` output columns and ``K`` inputs: the SAME for every ``M`` (batch invariance:
    a row's reduction order depends on K only; ``M`` is accepted for the callers' convenience and ignored).

    ``BLOCK_M`` 16 (the smallest ``tl.dot`` tile; rows beyond M are masked), ``BLOCK_N`` 16 (the smallest dot width:
    the most programs over N, i.e. the weight stream spread over the most SMs), ``BLOCK_K`` 256 (a 16 x 256 weight
    tile, 8 KB in bf16, per iteration; the dot loop is software-pipelined over ``num_stages``), 4 warps. At M = 1
    15 of the 16 tile rows are padding: tensor-core work is free against the weight bytes, but the old M = 1
    path (8192-element tiles, 8 warps, no padding) had more bytes in flight per program (docs/mtp.md: the
    unmeasured speed risk).
    """
    del M
    bk = max(16, min(256, triton.next_power_of_2(max(K, 1))))
    return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=bk, num_warps=4)


def _launch(x, norm_weight, weight, out, n_out, eps, epilogue, rows=None, gathered=None):
    M, K = out.shape[0], x.shape[1]
    blocks = gemv_blocks(M, n_out, K)
    grid = (triton.cdiv(M, blocks["BLOCK_M"]), triton.cdiv(n_out, blocks["BLOCK_N"]))  # M tiles fastest
    gather, store = rows is not None, gathered is not None
    launch(gemv_kernel, grid, x, norm_weight if norm_weight is not None else weight, weight, out,
           rows if gather else out, gathered if store else out,
           M, n_out, K, x.stride(0), weight.stride(0), out.stride(0), gathered.stride(0) if store else 0, float(eps),
           HAS_NORM=norm_weight is not None, EPILOGUE=epilogue, GATHER=gather, STORE_ROWS=store,
           UPCAST=interpreting(),
           DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", device=x.device, **blocks)


def norm_linear(x: torch.Tensor, norm_weight: torch.Tensor | None, weight: torch.Tensor, eps: float,
                swiglu: bool, rows: torch.Tensor | None = None, gathered: torch.Tensor | None = None) -> torch.Tensor:
    """``y = rms_norm(x) * norm_weight @ weight^T`` (no norm when ``norm_weight`` is None).

    x ``[M, K]`` (unit stride in K, any row stride), weight ``[N, K]`` (unit stride in K). Returns ``[M, N]``, or
    with ``swiglu`` (weight = ``[gate; up]``, ``[2I, K]``) ``silu(gate) * up`` ``[M, I]``. With ``rows`` (int
    ``[M]``), x is a ``[V, K]`` table and row m of the input is ``x[rows[m]]``; the gathered rows are also written
    to ``gathered`` ``[M, K]``.
    """
    M = x.shape[0] if rows is None else rows.shape[0]
    n_out = weight.shape[0] // 2 if swiglu else weight.shape[0]
    out = x.new_empty(M, n_out)
    _launch(x, norm_weight, weight, out, n_out, eps, SWIGLU if swiglu else PLAIN, rows, gathered)
    return out


def linear_residual_(resid: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, split_k: bool | None = None
                     ) -> None:
    """``resid += x @ weight^T`` in place; resid ``[M, N]``, x ``[M, K]``, weight ``[N, K]`` (unit stride in the last
    dims). The product is rounded to the model dtype before the add, the sum rounded again (transformers).
    ``split_k`` (default: the ``gemv_splitk`` fast path): K split over several programs per tile when the N blocks
    alone leave SMs idle (:func:`gemv_splits`, :func:`gemv_residual_splitk_kernel`): deterministic and batch
    invariant, but not bitwise today's one-program sum (fp32 partials added in another order)."""
    N, K = weight.shape
    if split_k if split_k is not None else fast_paths.enabled("gemv_splitk"):
        blocks = gemv_blocks(resid.shape[0], N, K)
        splits, k_split = gemv_splits(N, K, blocks)
        if splits > 1:
            if resid.shape[0] and N:
                _launch_splitk(x, weight, resid, splits, k_split, blocks)
            return
    _launch(x, None, weight, resid, N, 0.0, RESIDUAL)


# --- sm_90a static compile cases: the real MTP shapes (hidden 1024, q/k/v 4096, SwiGLU 3072, lm_head 2048) --------

_SHAPES = {  # name: (N outputs, K, epilogue, norm prologue, embedding gather)
    "qkv": (4096, 1024, PLAIN, True, False),
    "qkv+embed": (4096, 1024, PLAIN, True, True),  # a decode step's first layer gathers the codebook embedding
    "gate_up": (3072, 1024, SWIGLU, True, False),
    "o": (1024, 2048, RESIDUAL, False, False),
    "down": (1024, 3072, RESIDUAL, False, False),
    "lm_head": (2048, 1024, PLAIN, True, False),
}

for _dt in ("bf16", "fp16"):
    for _m in (1,):  # one config for every M (batch invariance): M is a run-time argument only
        for _name, (_n, _k, _epi, _norm, _gather) in _SHAPES.items():
            _b = gemv_blocks(_m, _n, _k)
            _warps = _b.pop("num_warps")
            static_case(
                f"gemv_kernel[{_dt},{_name}]", gemv_kernel,
                signature={"x_ptr": f"*{_dt}", "nw_ptr": f"*{_dt}", "w_ptr": f"*{_dt}", "out_ptr": f"*{_dt}",
                           "idx_ptr": "*i64", "xg_ptr": f"*{_dt}",
                           "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_wn": "i32",
                           "stride_om": "i32", "stride_gm": "i32", "eps": "fp32", "HAS_NORM": "constexpr",
                           "EPILOGUE": "constexpr", "GATHER": "constexpr", "STORE_ROWS": "constexpr",
                           "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
                           "UPCAST": "constexpr", "DOT_PRECISION": "constexpr"},
                constexprs={"HAS_NORM": _norm, "EPILOGUE": _epi, "GATHER": _gather, "STORE_ROWS": _gather, "UPCAST": False,
                            "DOT_PRECISION": "tf32", **_b},
                num_warps=_warps, aligned=("K", "stride_xm", "stride_wn", "stride_om", "stride_gm"),
            )
    for _name in ("o", "down"):  # the split-K residual GEMV (opt-in) at the shapes it splits
        _n, _k = _SHAPES[_name][:2]
        _b = gemv_blocks(1, _n, _k)
        _warps = _b.pop("num_warps")
        static_case(
            f"gemv_residual_splitk_kernel[{_dt},{_name},splits={gemv_splits(_n, _k)[0]}]", gemv_residual_splitk_kernel,
            signature={"x_ptr": f"*{_dt}", "w_ptr": f"*{_dt}", "out_ptr": f"*{_dt}", "ws_ptr": "*fp32",
                       "cnt_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "k_split": "i32", "stride_xm": "i32",
                       "stride_wn": "i32", "stride_om": "i32", "SPLITS": "constexpr", "BLOCK_M": "constexpr",
                       "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "UPCAST": "constexpr",
                       "DOT_PRECISION": "constexpr"},
            constexprs={"SPLITS": gemv_splits(_n, _k)[0], "UPCAST": False, "DOT_PRECISION": "tf32", **_b},
            num_warps=_warps, aligned=("N", "K", "k_split", "stride_xm", "stride_wn", "stride_om"),
        )
