"""When Code2Wav's convs activate their input once into a buffer instead of fusing the SnakeBeta into the GEMM.

The implicit-GEMM conv (:mod:`.code2wav`) applies the SnakeBeta to every input tile it loads, once per (row tile,
tap): ``R = taps * ceil(rows / BLOCK_N)`` activations per input element (84 on the k7 convs of decoder block 1,
192 on its transposed conv; docs/code2wav.md, "The fused SnakeBeta's cost model"). Pre-activation runs
:func:`.code2wav.snake_beta` over ``cat(state, x)`` into a ``[B, C_in, ctx + T]`` buffer (one extra elementwise
launch, ``2 * elt`` extra HBM bytes per element: read x, write the buffer, which the conv then reads instead of x),
then the conv without the SnakeBeta. The numerics are the same bit for bit: the elementwise kernel does the fused
path's fp32 SnakeBeta and rounding to the activation dtype.

The choice (:func:`use_preactivation`) compares two predicted times of the conv (a model, not measured; the
constants below are the cost model's, ``omni_fast/bench/costmodel/constants.py``, and the SnakeBeta rate of
``bench/code2wav_snake_cost.py``; tests/test_code2wav_ops.py checks they agree)::

    fused  = max(weight bytes / HBM, MACs / MMA + R * E / ACT)
    preact = NODE + 2 * E * elt / HBM + E / ACT + max(weight bytes / HBM, MACs / MMA)

with ``E = B * C_in * (ctx + T)`` activated elements. At small batch the fused conv is weight-bandwidth-bound
(the SnakeBeta hides under the weight reads) and a second launch only adds its ~1.3 us, so the fused path stays;
as the batch (or the push) grows the conv becomes compute-bound and the recomputed SnakeBeta dominates. The choice
is a batch threshold per conv and push length: for one-frame pushes of the real config (bf16) the model
pre-activates the k7 residual convs from batch 2-4, the transposed convs from batch 4-21, the output conv from 11,
the k1 convs of block 1 from 23 and of block 2 from 64, and never the k1 convs of blocks 3-4 (``R`` of 2-3, under
the break-even ``1 + 2 * elt * ACT / HBM`` = 5 in bf16); batch 1 stays fused everywhere. Longer pushes lower the
thresholds (4 frames: the k7 convs from batch 1-2). ``python -m omni_fast.bench.code2wav_snake_cost --thresholds``
prints the table and the predicted before / after per push.
"""

from __future__ import annotations

import math

# Rates (seconds / elements per second) of the model: the cost model's constants (bench/costmodel/constants.py:
# hbm_bytes_per_s, mma_flops_per_s / 2, graph_node_s) and the activated-element rate of bench/code2wav_snake_cost.py
# (MUFU sin + ~10-15 issue slots per element; docs/code2wav.md).
HBM_BYTES_PER_S = 3.0e12
MMA_MACS_PER_S = 4.0e14
ACT_ELEMS_PER_S = 3.0e12
NODE_S = 1.3e-6
BLOCK_N = 64  # the rows per tile the decision assumes (the default and the streaming tile's)

FORCE: bool | None = None  # tests: True / False forces one path for every SnakeBeta conv


def recompute_factor(taps: int, rows: int) -> int:
    """Activations per input element of the fused GEMM: ``taps * ceil(rows / BLOCK_N)``."""
    return taps * math.ceil(rows / BLOCK_N)


def predicted_times(batch: int, c_in: int, t_window: int, taps: int, rows: int, weight_numel: int, n_cols: int,
                    elt: int) -> tuple[float, float]:
    """Predicted seconds of one conv launch ``(fused, pre-activated)`` (module docstring). ``t_window`` = input
    samples read per row (state + x), ``rows`` = GEMM rows (C_out, or stride * C_out for a transposed conv),
    ``weight_numel`` = MACs per output column per batch row, ``elt`` = activation bytes."""
    e = batch * c_in * t_window
    weights = weight_numel * elt / HBM_BYTES_PER_S
    mma = batch * n_cols * weight_numel / MMA_MACS_PER_S
    fused = max(weights, mma + recompute_factor(taps, rows) * e / ACT_ELEMS_PER_S)
    preact = NODE_S + 2 * e * elt / HBM_BYTES_PER_S + e / ACT_ELEMS_PER_S + max(weights, mma)
    return fused, preact


def use_preactivation(batch: int, c_in: int, t_window: int, taps: int, rows: int, weight_numel: int, n_cols: int,
                      elt: int) -> bool:
    """Whether a SnakeBeta conv of this shape runs pre-activated (:data:`FORCE` overrides the model)."""
    if FORCE is not None:
        return FORCE
    if batch * c_in * t_window == 0:
        return False
    fused, preact = predicted_times(batch, c_in, t_window, taps, rows, weight_numel, n_cols, elt)
    return preact < fused


def batch_threshold(c_in: int, t_window: int, taps: int, rows: int, weight_numel: int, n_cols: int, elt: int,
                    max_batch: int = 1024) -> int | None:
    """Smallest batch at which :func:`use_preactivation` (without :data:`FORCE`) picks pre-activation for a conv
    whose per-row shape is given; None if none up to ``max_batch`` (the conv always stays fused)."""
    for b in range(1, max_batch + 1):
        fused, preact = predicted_times(b, c_in, t_window, taps, rows, weight_numel, n_cols, elt)
        if preact < fused:
            return b
    return None
