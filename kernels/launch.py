"""The one launcher / autotune helper shared by every Triton kernel.

- :func:`launch` starts a kernel on the tensors' device and skips empty grids (T = 0 is a valid call)
  (:mod:`.cuda_cupy` ``run`` is the same device and stream rule for the CuPy launches of the CUDA C++ kernels).
- :func:`autotune` is ``triton.autotune`` on a GPU; under the CPU interpreter (``TRITON_INTERPRET=1``), where
  ``triton.autotune`` cannot time anything, it runs one fixed config (the first, or ``interpreter_config``).
- :func:`static_case` registers a kernel with an example signature so the sm_90a static check
  (``python -m omni_fast.bench.static_check``) can compile it for Hopper on a CPU-only machine.
- :func:`tuned_config` reads per-device tuned configs from ``omni_fast/configs/<family>/*.json``.
- :func:`pdl_enter` / :func:`pdl_meta`: Hopper programmatic dependent launch (PDL) for kernels that opt in.
- :func:`clamp`: the one in-kernel clamp of indices / lengths read from device tensors into their buffer.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .._device import on_device
from ..backend import triton_interpreter_enabled

CONFIG_DIR = Path(__file__).resolve().parent.parent / "omni_fast" / "configs"
if not CONFIG_DIR.is_dir():  # installed layout: omni_fast/kernels -> omni_fast/configs
    CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


# True when ``triton.jit`` functions run on the CPU interpreter (one definition, shared with backend selection).
interpreting = triton_interpreter_enabled


def launch(kernel, grid: Sequence[int] | Callable, *args, device: torch.device | None = None, **meta):
    """Launch ``kernel[grid](*args, **meta)`` on ``device`` (the CUDA device the tensors live on).

    A grid with a zero dimension launches nothing (Triton would raise on it). ``grid`` may be a callable of the
    meta-parameters, as for autotuned kernels. Returns what the launch returns (Triton: the compiled kernel, whose
    registers / shared memory size the persistent kernel's co-residency check reads).
    """
    if not callable(grid):
        grid = tuple(int(g) for g in grid)
        if min(grid) <= 0:
            return
    with on_device(device):  # Triton launches on the current device's current stream: make it the tensors'
        return kernel[grid](*args, **meta)


class _FixedConfigKernel:
    """Stands in for an autotuned kernel under the interpreter: always launches one config."""

    def __init__(self, fn, config: triton.Config):
        functools.update_wrapper(self, fn)
        # After update_wrapper: it copies the interpreted function's own `fn` attribute over ours.
        self.fn = fn
        self.config = config

    def __getitem__(self, grid):
        meta = dict(self.config.kwargs)
        if callable(grid):
            grid = grid(meta)

        def run(*args, **kwargs):
            return self.fn[grid](*args, **kwargs, **meta)

        return run


def autotune(configs: Sequence[triton.Config], key: Sequence[str], *, interpreter_config: triton.Config | None = None,
             **kwargs):
    """``triton.autotune`` on a GPU, one fixed config under the interpreter (see module docstring)."""

    def wrap(fn):
        if interpreting():
            return _FixedConfigKernel(fn, interpreter_config or configs[0])
        return triton.autotune(configs=list(configs), key=list(key), **kwargs)(fn)

    return wrap


@dataclass
class StaticCase:
    """One kernel specialisation to compile for sm_90a in the static check."""

    name: str
    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    # Integer arguments known to be multiples of 16 (strides of contiguous rows, say). Pointer arguments are always
    # taken as 16-byte aligned, as the JIT specialises them for torch allocations at run time; without these hints
    # the compile is more pessimistic than a real launch (no vectorised loads, no cp.async pipelining).
    aligned: tuple[str, ...] = ()

    def attrs(self, arg_names: Sequence[str]) -> dict:
        """``ASTSource`` attributes declaring 16-divisibility, as the JIT would at run time."""
        # (tuple arguments, whose signature is a tuple of types, get no divisibility hints)
        return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(arg_names)
                if str(self.signature.get(name, "")).startswith("*") or name in self.aligned}


STATIC_CASES: list[StaticCase] = []


def static_case(name: str, kernel, signature: dict[str, str], constexprs: dict[str, Any] | None = None, *,
                num_warps: int = 4, num_stages: int = 3, aligned: Sequence[str] = ()) -> None:
    """Register ``kernel`` with an example signature (Triton type strings: ``*fp16``, ``i32``, ``constexpr``).

    ``aligned`` names integer arguments that are multiples of 16 at run time (see :class:`StaticCase`).
    """
    STATIC_CASES.append(StaticCase(name, kernel, signature, dict(constexprs or {}), num_warps, num_stages,
                                   tuple(aligned)))


def device_name(device: torch.device | None = None) -> str:
    """A file-name friendly device name, e.g. ``NVIDIA_H100_80GB_HBM3`` (``cpu`` without CUDA)."""
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return "cpu"
    return file_safe(torch.cuda.get_device_name(device))


def file_safe(text: str) -> str:
    """``text`` with everything but letters, digits, ``-``, ``_`` and ``.`` replaced by ``_`` (for file names)."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)


@functools.lru_cache(maxsize=None)
def _load_config_file(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def tuned_config(family: str, file_stem: str, num_tokens: int) -> dict | None:
    """The tuned launch config for ``num_tokens`` from ``configs/<family>/<file_stem>.json``, or None.

    A file maps token-count buckets (as strings) to config dicts; the bucket nearest ``num_tokens`` wins (the
    vLLM convention). ``None`` when no file matches: the caller falls back to its default heuristic.
    """
    path = CONFIG_DIR / family / f"{file_stem}.json"
    if not path.is_file():
        return None
    table = _load_config_file(str(path))
    buckets = {int(k): v for k, v in table.items() if k.isdigit()}
    if not buckets:
        return None
    best = min(buckets, key=lambda b: abs(b - num_tokens))
    return dict(buckets[best])


# --- shared in-kernel helpers ----------------------------------------------------------------------------------------
@triton.jit
def clamp(x, lo, hi):
    """``x`` clamped into ``[lo, hi]`` elementwise (``hi`` wins where ``lo > hi``), any int or float tensor/scalar:
    indices and lengths read from device tensors whose values the host does not check (block tables, sequence
    lengths, positions) stay inside the buffer they address. Inlined: the same code as the spelled-out
    ``minimum(maximum(x, lo), hi)`` (the kernels' sm_90a facts are unchanged by it)."""
    return tl.minimum(tl.maximum(x, lo), hi)


# --- programmatic dependent launch (Hopper) -------------------------------------------------------------------------
@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """First statement of a kernel launched with :func:`pdl_meta`. With ``PDL``: wait until the previous kernel in
    the stream has completed and its writes are visible (``griddepcontrol.wait``: nothing of this kernel may read
    or write the previous one's data before it), then let the next kernel start launching
    (``griddepcontrol.launch_dependents``), so its CTAs are resident and past their launch when this one ends.
    Waiting first keeps at most two kernels resident at a time. The wait is transitive (the previous kernel passed
    its own wait before it could complete), so a chain of PDL kernels keeps stream order. Without ``PDL`` nothing
    is emitted (the CPU interpreter has no griddepcontrol)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptr, rows, row_bytes, stride_bytes, BLOCK_R: tl.constexpr, LINES: tl.constexpr):
    """Hint the GPU to bring ``rows`` x ``row_bytes`` bytes at ``ptr`` (row stride ``stride_bytes``) into L2: one
    ``prefetch.global.L2`` per 128-byte line, addresses clamped into the region (never out of bounds). No data comes
    back and nothing a kernel computes can change (L2 is the point of coherence, a prefetch is only a hint), so it
    may run before :func:`pdl_enter`'s wait: a PDL kernel streams its weights into L2 while the previous kernel
    drains. Compiled code only (inline PTX): callers guard it with their ``PDL`` constexpr."""
    base = ptr.to(tl.pointer_type(tl.int8))
    for r0 in range(0, rows, BLOCK_R):
        r = tl.minimum(r0 + tl.arange(0, BLOCK_R), rows - 1).to(tl.int64)
        for c0 in range(0, row_bytes, LINES * 128):
            c = tl.minimum(c0 + tl.arange(0, LINES) * 128, row_bytes - 1).to(tl.int64)
            lines = base + r[:, None] * stride_bytes + c[None, :]
            tl.inline_asm_elementwise("prefetch.global.L2 [$1];", "=r,l", [lines], dtype=tl.int32, is_pure=False,
                                      pack=1)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def pdl_meta(enabled: bool, device: torch.device) -> dict:
    """Launch keywords of a kernel that starts with :func:`pdl_enter`: ``PDL`` (its constexpr) and Triton's
    ``launch_pdl`` option when ``enabled`` and the device can (CUDA, sm_90+, not the interpreter); else PDL off, the
    plain launch (the same code as before the option existed)."""
    if not (enabled and device.type == "cuda" and not interpreting()):
        return {"PDL": False}
    index = device.index if device.index is not None else torch.cuda.current_device()
    return {"PDL": True, "launch_pdl": True} if _capability(index)[0] >= 9 else {"PDL": False}
