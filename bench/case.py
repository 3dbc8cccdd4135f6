"""What a benchmark case is. Each ``bench/cases/<op>.py`` defines ``cases(preset: str) -> list[Case]``.

A case builds its inputs once on a device and returns, per provider, a zero-argument callable that runs the op
once (inputs already bound). The harness times each callable with CUDA events (rotating through several input
copies so the L2 cache does not flatter), and divides ``flops`` and ``bytes`` by the time for TFLOP/s, GB/s and
% of the measured roofline. ``check`` (optional) runs on a CPU under the Triton interpreter with small shapes,
to prove the kernel correct once when no GPU is present. ``units`` (optional) names the work one call does (codes,
frames, audio seconds) so the report also gives time per unit, and for audio the real-time factor and throughput.

Presets: ``"quick"`` (a few real shapes), ``"full"`` (every shape of the issue) and ``"smoke"`` (the quick cases
and providers at tiny shapes, fp32: ``python -m omni_fast.bench --preset smoke`` calls every provider once, on a CPU under
the Triton interpreter, so a provider bug shows before GPU time is spent; never timed). Each module keeps its
shapes and dtypes in a table per preset and builds every preset's cases through one code path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Case:
    """One benchmark case (see the module doc): an op family and name, its shape ``params``, ``setup(device)``
    building ``{provider: zero-arg callable}`` on bound inputs, the useful ``flops`` and fewest HBM ``bytes`` of one
    call (for TFLOP/s, GB/s and % of roofline), the roofline it is held to, an optional CPU ``check``, tags and
    work ``units``."""

    op: str  # op family, e.g. "rope"; the CLI selects by it
    name: str  # e.g. "thinker T=1024"
    params: dict  # shape parameters, written to the JSON
    # setup(device) -> {provider name: zero-arg callable running the op once}. A provider that cannot run there
    # (a peer not installed, a CUDA-only path on a CPU) is given as ``Unavailable(reason)`` instead (or left out),
    # so reports say why it is missing. Called once per copy when the harness rotates inputs.
    setup: Callable[[torch.device], dict[str, Callable[[], object]]]
    flops: float = 0.0  # useful floating-point operations of one call
    bytes: float = 0.0  # fewest bytes one call must move through HBM (inputs read once, outputs written once)
    # Which roofline the % refers to: "memory", "compute", or "auto" (the one whose floor, bytes / copy bandwidth
    # or flops / matmul rate on the measured device, is larger: for shapes that cross over between the two).
    bound: str = "memory"
    check: Callable[[], None] | None = None  # small CPU/interpreter correctness check; raises on mismatch
    tags: tuple[str, ...] = field(default_factory=tuple)  # e.g. ("decode",), ("prefill",)
    # Work units one call processes, e.g. ``{"code": 10}`` (codes decoded), ``{"frame": B}`` (MTP frames): the
    # harness adds ``ms_per_<unit>`` per entry. The unit ``"audio_s"`` (seconds of audio produced) adds ``rtf``
    # (real-time factor = time / audio seconds) and ``audio_s_per_s`` (throughput) instead.
    units: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Unavailable:
    """A provider that cannot run on this device / dtype / install, in place of its callable in ``setup``'s dict
    (e.g. ``Unavailable("needs CUDA")``); the harness reports it as skipped with ``reason``, never calls it."""

    reason: str


def runnable(providers: dict) -> dict[str, Callable[[], object]]:
    """The providers of a ``setup`` dict that can run (the ``Unavailable`` ones dropped)."""
    return {name: fn for name, fn in providers.items() if not isinstance(fn, Unavailable)}


def dtype_name(dtype: torch.dtype) -> str:
    """Short dtype names for case params: ``bf16``, ``fp16``, ``fp32``."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))
