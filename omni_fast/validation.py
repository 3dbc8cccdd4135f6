"""The one validation helper: clear ``TypeError``/``ValueError`` messages that name the offending argument.

Public ops validate their inputs here before dispatching, so kernels can assume well-formed inputs and never
read out of bounds. Checks that would need a host sync (index ranges of device tensors) are done only when
the tensor lives on the CPU or when ``check_values=True``; they are skipped while ``torch.compile`` traces or a
CUDA graph captures.
"""

from __future__ import annotations

import math
import numbers
from typing import Iterable, Sequence

import torch

from ._device import capturing

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REAL_DTYPES = FLOAT_DTYPES + (torch.float64,)  # model-level inputs (the kernels themselves take FLOAT_DTYPES)
INT_DTYPES = (torch.int32, torch.int64)
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    t,
    *,
    dtypes: Sequence[torch.dtype] | None = None,
    ndim: int | Sequence[int] | None = None,
    shape: Sequence[int | None] | None = None,
    device: torch.device | str | None = None,
    contiguous: bool = False,
    last_dim_contiguous: bool = False,
) -> torch.Tensor:
    """Check one tensor argument and return it.

    ``shape`` entries may be ``None`` (any size). ``device`` is the device the tensor must share (usually the
    first tensor argument's). Raises ``TypeError`` for a non-tensor or a wrong dtype, ``ValueError`` otherwise.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in ({_dtype_names(dtypes)}), got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dimensions, got shape {tuple(t.shape)}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != a for s, a in zip(shape, t.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name} must be on device {torch.device(device)}, got {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous())")
    if last_dim_contiguous and t.dim() > 0 and t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{name} must have a unit stride in its last dimension, got strides {t.stride()}")
    return t


def check_same_dtype(**tensors: torch.Tensor) -> torch.dtype:
    """All named tensors share one dtype; returns it."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{name} must have the same dtype as {first_name} ({first.dtype}), got {t.dtype}")
    return first.dtype


def _is_numpy_bool(value) -> bool:
    # numpy's bool scalar is ``numpy.bool_`` (numpy 1) or ``numpy.bool`` (numpy 2); numpy is not imported here.
    return type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool")


def as_int(name: str, value) -> int:
    """The one rule for integer arguments: a Python int, a numpy integer or a 0-d integer tensor, returned as a
    Python int. Bools, floats, strings and other tensors raise a ``TypeError`` naming ``name``."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            raise TypeError(f"{name} must be an int (or a 0-d integer tensor), got a {value.dtype} tensor of shape "
                            f"{tuple(value.shape)}")
        return int(value)
    if isinstance(value, bool) or _is_numpy_bool(value) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    return int(value)


def check_positive_int(name: str, value, *, minimum: int = 1, maximum: int | None = None) -> int:
    """An integer argument (see :func:`as_int`) within [minimum, maximum]; returns it as a Python int."""
    value = as_int(name, value)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def check_float(name: str, value, *, minimum: float | None = None, maximum: float | None = None,
                min_open: bool = False, allow_inf: bool = False) -> float:
    """A real-number argument: int, float, numpy scalar or 0-d real tensor (not bool, not str), finite unless
    ``allow_inf`` (NaN never), within ``[minimum, maximum]`` (``(minimum, ...`` with ``min_open``); returns a
    Python float."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a float (or a 0-d real tensor), got a {value.dtype} tensor of shape "
                            f"{tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or _is_numpy_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} ({value!r})")
    value = float(value)
    # comparisons, not math.isnan: under torch.compile(dynamic=True) a default float is a SymFloat, which they guard on
    if value != value or (value in (math.inf, -math.inf) and not allow_inf):
        raise ValueError(f"{name} must be a finite number, got {value}")
    low_bad = minimum is not None and (value <= minimum if min_open else value < minimum)
    if low_bad or (maximum is not None and value > maximum):
        lo = "" if minimum is None else f"{'(' if min_open else '['}{minimum}, "
        bound = f"in {lo}{maximum}]" if maximum is not None and minimum is not None else (
            f"{'>' if min_open else '>='} {minimum}" if maximum is None else f"<= {maximum}")
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    """A flag: a Python bool, a numpy bool or a 0-d bool tensor (not an int, not a string)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype == torch.bool:
        return bool(value)
    if isinstance(value, bool) or _is_numpy_bool(value):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")


def check_seed(name: str, value) -> int:
    """A seed / RNG offset: an integer (see :func:`as_int`) that fits int64."""
    value = as_int(name, value)
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{name} must fit int64 (in [-2**63, 2**63 - 1]), got {value}")
    return value


def check_device(name: str, device) -> torch.device:
    """A model's device: None (CUDA when available, else the CPU), a string / ``torch.device`` / CUDA index that
    torch parses, and CUDA only where CUDA is available: checked before anything is built or loaded."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, bool) or not isinstance(device, (str, torch.device, int)):
        raise TypeError(f"{name} must be a torch device (e.g. 'cpu', 'cuda', 'cuda:1'), got {type(device).__name__} "
                        f"({device!r})")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"{name} must be a torch device (e.g. 'cpu', 'cuda', 'cuda:1'), got {device!r}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name} {device!r}: CUDA is not available here (use device='cpu')")
    return parsed


def check_inference_only(op_name: str, **tensors: torch.Tensor | None) -> None:
    """Raise when autograd would record a call of an op that has no backward (it would silently give wrong grads)."""
    if not torch.is_grad_enabled():
        return
    needing = [name for name, t in tensors.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    if needing:
        raise ValueError(
            f"{op_name} is inference-only (no backward), but {', '.join(needing)} require grad: call it under "
            f"torch.no_grad() / torch.inference_mode(), or use the differentiable omni_fast.reference version"
        )


def records_grad(*tensors: torch.Tensor, module: torch.nn.Module | None = None) -> bool:
    """Whether autograd would record a call on ``tensors`` (and ``module``'s parameters): the kernels have no
    backward, so such a call takes a differentiable path (transformers' forward, or a PyTorch recompute)."""
    if not torch.is_grad_enabled():
        return False
    return any(t.requires_grad for t in tensors) or (
        module is not None and any(p.requires_grad for p in module.parameters()))


def check_no_internal_overlap(name: str, t: torch.Tensor) -> None:
    """An output written in place must not have elements that alias each other (e.g. an expanded view)."""
    if _is_tracing(t.device):
        return
    # (by strides only: a meta tensor, whose every address is 0, overlaps itself only when expanded)
    if (t.device.type != "meta" and torch._debug_has_internal_overlap(t) == 1) or not _non_overlapping(t):
        raise ValueError(f"{name} has internally overlapping memory (an expanded view?): it cannot be written in "
                         f"place; pass a contiguous copy")


def _non_overlapping(t: torch.Tensor) -> bool:
    """Sufficient condition for distinct elements at distinct addresses: with the dimensions sorted by stride,
    each stride exceeds the span of all smaller-stride dimensions (true of every dense or sliced layout)."""
    dims = sorted((abs(s), n) for n, s in zip(t.shape, t.stride()) if n > 1)
    span = 0  # highest offset reachable with the dims seen so far
    for stride, n in dims:
        if stride <= span:
            return False
        span += (n - 1) * stride
    return True


def check_output(name: str, out: torch.Tensor, **inputs) -> None:
    """An in-place / ``out=`` tensor: writable here (not an inference tensor outside ``torch.inference_mode()``), no
    internally overlapping elements, and no memory shared with any of the named ``inputs`` (None entries are
    skipped)."""
    if not _is_tracing(out.device) and out.is_inference() and not torch.is_inference_mode_enabled():  # (dynamo: no is_inference)
        # (torch refuses the write in the reference backend; a kernel's raw pointer would write it anyway)
        raise ValueError(f"{name} is an inference tensor (made under torch.inference_mode()) and cannot be written "
                         f"outside it: call this under torch.inference_mode(), or pass a tensor made outside it "
                         f"(e.g. {name}.clone() outside inference mode)")
    check_no_internal_overlap(name, out)
    for other, t in inputs.items():
        if isinstance(t, torch.Tensor):
            check_disjoint(name, out, other, t)


def check_disjoint(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """An in-place output ``a`` must not share memory with an input ``b`` that other programs still read while it is
    written (the result would depend on the launch order).

    Exact for disjoint storages, disjoint address ranges and side-by-side column blocks of one row-major buffer
    (same row stride, unit column stride: e.g. ``buf[:, :8]`` and ``buf[:, 8:]``); other interleavings whose ranges
    intersect are refused (conservative; pass a copy)."""
    if _is_tracing(a.device) or a.numel() == 0 or b.numel() == 0:
        return
    if a.device != b.device or a.device.type == "meta":  # no memory in common (meta tensors have none: all at 0)
        return
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return

    def span(t: torch.Tensor) -> tuple[int, int]:
        extent = sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) + 1
        return t.data_ptr(), t.data_ptr() + extent * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    if a0 < b1 and b0 < a1 and not _column_blocks_apart(a, b):
        raise ValueError(f"{name_a} must not overlap {name_b} in memory (it is written while {name_b} is read); "
                         f"pass a copy")


def _as_rows(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` ``[R, ...]`` as a 2-D ``[R, C]`` view when each row ``t[r]`` is dense (e.g. the heads of a fused qkv
    projection, ``qkv[:, :, :nq]``), else None."""
    if t.dim() < 2:
        return None
    if t.dim() == 2:
        return t
    if t.shape[0] == 0 or not t[0].is_contiguous():
        return None
    return t.as_strided((t.shape[0], t[0].numel()), (t.stride(0), 1))


def _column_blocks_apart(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` are views ``[R, ...]`` with dense rows, the same row stride and unit column stride
    whose columns, within that row stride, do not intersect (so no element is shared whatever their rows)."""
    if a.element_size() != b.element_size():
        return False
    a, b = _as_rows(a), _as_rows(b)
    if a is None or b is None:
        return False
    row = a.stride(0)
    if b.stride(0) != row or a.stride(1) != 1 or b.stride(1) != 1 or row < max(a.shape[1], b.shape[1]):
        return False
    ca, cb = a.storage_offset() % row, b.storage_offset() % row
    if ca + a.shape[1] > row or cb + b.shape[1] > row:  # a row wraps into the next: not a plain column block
        return False
    return ca + a.shape[1] <= cb or cb + b.shape[1] <= ca


def values_checkable(t: torch.Tensor, check_values: bool | None = None) -> bool:
    """Whether a data-dependent check (which syncs the host on CUDA) may run on ``t`` now."""
    if _is_tracing(t.device):
        return False
    if check_values is not None:
        return check_values
    return t.device.type == "cpu"


def _is_tracing(device=None) -> bool:
    """torch.compile traces, or ``device``'s current stream (the current device's when None) is captured."""
    if torch.compiler.is_compiling():
        return True
    if device is not None:  # asked of the tensors' device: a capture on cuda:1 is not seen from cuda:0
        return capturing(device)
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def host_copies(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """CPU copies (same shapes and dtypes) of integer tensors, moved with ONE device-to-host transfer.

    For value checks of several device tensors at the price of a single host sync (``check_values=True``);
    tensors already on the CPU are returned as they are.
    """
    if all(t.device.type == "cpu" for t in tensors):
        return list(tensors)
    flat = torch.cat([t.reshape(-1).to(torch.int64) for t in tensors]).cpu()
    parts = flat.split([t.numel() for t in tensors])
    return [p.to(t.dtype).reshape(t.shape) for p, t in zip(parts, tensors)]


def check_index_range(name: str, t: torch.Tensor, low: int, high: int, *, check_values: bool | None = None) -> None:
    """Every element of the integer tensor ``t`` lies in ``[low, high)`` (skipped when not checkable)."""
    if t.numel() == 0 or not values_checkable(t, check_values):
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < low or hi >= high:
        raise ValueError(f"{name} must lie in [{low}, {high}), got values in [{lo}, {hi}]")


def check_varlen_keys(cu_k: torch.Tensor, table: torch.Tensor | None, used: torch.Tensor | None, num_blocks: int,
                      page: int) -> None:
    """Host copies of a varlen attention's key indices (``flash_attn_varlen``): ``block_table`` (``table``, paged
    keys ``[num_blocks, page, Hk, D]``) in ``[0, num_blocks)``, and every sequence's key count (``seqused_k``, or
    else a paged ``cu_seqlens_k`` span) in ``[0, room]``: a block-table row's ``max_blocks * page`` rows, or for
    packed keys the rows from ``cu_seqlens_k[b]`` on. The kernels clamp counts beyond that (attending to fewer keys
    than asked, silently), so they are refused here."""
    if table is not None:
        check_index_range("block_table", table, 0, num_blocks, check_values=True)
    counts, name = (used, "seqused_k") if used is not None else (cu_k[1:] - cu_k[:-1], "cu_seqlens_k's span")
    if table is None and used is None:
        return  # packed spans: check_cu_seqlens has checked them
    room = torch.full_like(counts, table.shape[1] * page) if table is not None else cu_k[-1] - cu_k[:-1]
    bad = (counts < 0) | (counts > room)
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}[{b}] = {int(counts[b])} must lie in [0, {int(room[b])}] (the keys sequence {b} "
                         f"has: {'its block_table row' if table is not None else 'k rows from cu_seqlens_k[b] on'})")


def check_cu_seqlens(
    name: str, cu: torch.Tensor, total: int, *, device=None, check_values: bool | None = None
) -> int:
    """``cu`` is an int32 ``[B + 1]`` prefix sum starting at 0, non-decreasing, ending at ``total``.

    Returns B. Value checks run when checkable (see :func:`values_checkable`).
    """
    check_tensor(name, cu, dtypes=(torch.int32,), ndim=1, device=device, contiguous=True)
    if cu.numel() < 1:
        raise ValueError(f"{name} must have at least one entry (the leading 0)")
    if values_checkable(cu, check_values):
        c = cu.to("cpu", torch.int64)
        if int(c[0]) != 0:
            raise ValueError(f"{name}[0] must be 0, got {int(c[0])}")
        if bool((c[1:] < c[:-1]).any()):
            raise ValueError(f"{name} must be non-decreasing, got {c.tolist()}")
        if int(c[-1]) != total:
            raise ValueError(f"{name}[-1] must equal the total number of tokens ({total}), got {int(c[-1])}")
    return cu.numel() - 1
