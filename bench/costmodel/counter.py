"""Count what a call would launch on a GPU, by running it on the CPU under the Triton interpreter.

Public API (used by other benchmarks and tests)::

    from omni_fast.bench.costmodel.counter import count_launches, trace
    counts = count_launches(fn, *args)      # {"triton:<kernel fn>": n, "aten:<op>": n, ...}
    t = trace(fn, *args, bytes=True)        # a Trace: per-kernel launches, CTAs, bytes, FLOPs

What counts as a launch:

- every Triton kernel launch (``InterpretedFunction.run``: one per ``kernel[grid](...)`` with a non-empty grid;
  :func:`omni_fast.kernels.launch.launch` skips empty grids before that), named ``triton:<jit function name>``;
- every torch operator that runs a device kernel, seen by a ``TorchDispatchMode`` at the aten level, named
  ``aten:<op>``: view / alias ops (their schema returns an alias), allocations (``empty*``), and
  ``_local_scalar_dense`` (``.item()``) launch nothing. Host syncs (``.item()``, ``nonzero``, ``x[mask]``, ...: the
  ops :func:`omni_fast.testing.host_sync_name` names) are counted in ``syncs``. A copy that an aten op makes
  inside itself (a strided input to an op that needs it contiguous, :data:`HIDDEN_COPY_INPUTS`) counts as an
  ``aten:copy_[<op>]`` launch, with its bytes under ``bytes=True``. Custom ops
  (``omni_fast::*``) are not launches themselves: the mode re-enters so the ops inside them are seen. Torch ops that
  the interpreter runs to move a Triton kernel's arguments are not counted.

Under ``trace(..., bytes=True)`` the interpreter's loads, stores, atomics and dots are instrumented: per kernel,
bytes loaded and stored (masked-off lanes excluded; an atomic counts as a load and a store), FLOPs of ``tl.dot``
(2*M*N*K), and with ``unique=True`` the distinct bytes each launch touches (what HBM must move if L2 caught every
reuse within the launch). Requires ``TRITON_INTERPRET=1`` before the first kernel import (as on a CPU-only machine).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from omni_fast.testing import cuda_like_value_checks, host_sync_name

_NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "set_", "resize_",
              "lift_fresh", "_to_copy_noop", "is_nonzero", "sym_size", "sym_stride", "sym_numel", "dim", "size",
              "stride", "is_same_size", "_has_compatible_shallow_copy_type", "record_stream", "_assert_async"}


@dataclass
class KernelStats:
    """What one kernel (by name) did over a traced call."""

    launches: int = 0
    ctas: list[int] = field(default_factory=list)  # grid size of each launch
    loaded: int = 0  # bytes read by loads (and atomics), all launches
    stored: int = 0  # bytes written
    unique_loaded: int = 0  # distinct bytes read, summed over launches (unique=True only)
    unique_stored: int = 0
    flops: int = 0  # 2*M*N*K of every tl.dot

    def as_dict(self) -> dict:
        return {"launches": self.launches, "ctas": self.ctas, "loaded": self.loaded, "stored": self.stored,
                "unique_loaded": self.unique_loaded, "unique_stored": self.unique_stored, "flops": self.flops}


@dataclass
class Trace:
    """Per-kernel statistics of one traced call, in first-launch order (``kernels``), plus host syncs."""

    kernels: dict[str, KernelStats] = field(default_factory=dict)
    syncs: int = 0

    def launches(self) -> dict[str, int]:
        return {k: s.launches for k, s in self.kernels.items()}

    @property
    def total_launches(self) -> int:
        return sum(s.launches for s in self.kernels.values())

    def stats(self, name: str) -> KernelStats:
        return self.kernels.setdefault(name, KernelStats())


# Hidden copies: aten ops whose CUDA kernel needs a contiguous input and makes one itself (``expect_contiguous`` /
# ``.contiguous()`` inside the op, below the dispatcher: no mode sees it, yet the GPU runs a copy kernel and moves
# the tensor twice). Per op, the positions of the inputs it copies when they are not contiguous; the counter adds
# one ``aten:copy_[<op>]`` launch per copied input, with its bytes (read + write) under ``bytes=True``. The strided
# inputs the units pass to other aten ops need no copy (checked on code2wav-push, thinker/talker-step: elementwise
# ops through TensorIterator, mm / addmm through cuBLAS's transposes, gather / copy_ take any strides).
# - native_layer_norm: ``X->expect_contiguous()`` (aten/src/ATen/native/cuda/layer_norm_kernel.cu, and the CPU
#   kernel too); Code2Wav's ConvNeXt LayerNorm on the channels-first depthwise conv's permuted output did this.
# - _softmax / _log_softmax: ``input_.contiguous()`` in the CUDA host_softmax (aten/src/ATen/native/cuda/SoftMax.cu);
#   no unit passes them a strided input today (the samplers are Triton), listed so a new caller is seen.
HIDDEN_COPY_INPUTS: dict[str, tuple[int, ...]] = {
    "native_layer_norm": (0,),
    "_softmax": (0,),
    "_log_softmax": (0,),
}


def hidden_copies(name: str, args) -> list[torch.Tensor]:
    """The inputs of aten op ``name`` (``args`` as dispatched) that its kernel copies to contiguous first."""
    picked = (args[i] for i in HIDDEN_COPY_INPUTS.get(name, ()) if i < len(args))
    return [a for a in picked if isinstance(a, torch.Tensor) and a.numel() and not a.is_contiguous()]


def _is_view(func) -> bool:
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


class _TorchCounter(TorchDispatchMode):
    def __init__(self, tr: Trace, state: dict):
        super().__init__()
        self.tr, self.state = tr, state

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ns = func.namespace
        if ns not in ("aten", "prims"):  # a custom op called past DispatchedOp: its insides stay unseen
            self.tr.stats(f"op:{func._schema.name}").launches += 1
            return func(*args, **kwargs)
        if not self.state["in_triton"]:
            name = func._schema.name.split("::")[-1]
            if host_sync_name(name, func._overloadname, args, kwargs) is not None:  # omni_fast.testing.HostSyncs' rule
                self.tr.syncs += 1
            if name != "_local_scalar_dense" and name not in _NO_KERNEL and not _is_view(func):
                self.tr.stats(f"aten:{name}").launches += 1
            for t in hidden_copies(name, args):  # (HIDDEN_COPY_INPUTS)
                st = self.tr.stats(f"aten:copy_[{name}]")
                st.launches += 1
                if self.state.get("bytes"):
                    n = t.numel() * t.element_size()
                    st.loaded, st.stored = st.loaded + n, st.stored + n
                    if self.state.get("unique"):
                        st.unique_loaded, st.unique_stored = st.unique_loaded + n, st.unique_stored + n
        return func(*args, **kwargs)


def _as_h100() -> list:
    """Make device-dependent launch choices as on an H100 (132 SMs) and return what to restore.

    Split-KV decode attention (``flash_attn_kvcache.choose_splits``) splits only on CUDA, by the SM count; under
    the interpreter it would never split, and the counts (grid, the combine kernel) would not be the GPU's.
    """
    import importlib

    mod = importlib.import_module("omni_fast.kernels.flash_attn_kvcache")
    orig = getattr(mod, "choose_splits", None)
    if orig is None:
        return []

    def choose_splits(device, programs, capacity, **kw):
        saved = mod._sm_count, mod.interpreting
        mod._sm_count, mod.interpreting = (lambda index: 132), (lambda: False)
        try:
            return orig(torch.device("cuda", 0), programs, capacity, **kw)
        finally:
            mod._sm_count, mod.interpreting = saved

    mod.choose_splits = choose_splits
    return [(mod, "choose_splits", orig)]


def _masked_ptrs(ptrs, mask) -> np.ndarray:
    data = ptrs.data
    m = np.broadcast_to(mask.data, data.shape) if mask is not None else None
    return data[m] if m is not None else data.reshape(-1)


def _launch_hook(tr: Trace, state: dict, cur: dict, unique: bool, run0):
    """The interpreter's launch entry: counts the launch on its kernel's stats (``cur`` holds them while it runs)
    and, with ``unique``, the distinct addresses the launch loaded and stored."""

    def run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return run0(self, *args, grid=grid, warmup=warmup, **kwargs)
        st = tr.stats(f"triton:{self.fn.__name__}")
        cur.update(stats=st, ld=[], st=[])
        st.launches += 1
        state["in_triton"] = True
        try:
            return run0(self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            state["in_triton"] = False
            if unique:
                for key, attr in (("ld", "unique_loaded"), ("st", "unique_stored")):
                    for size in {sz for _, sz in cur[key]}:  # distinct addresses per element size
                        arrays = [a for a, sz in cur[key] if sz == size]
                        setattr(st, attr, getattr(st, attr) + int(np.unique(np.concatenate(arrays)).size) * size)
            cur.update(stats=None, ld=[], st=[])

    return run


def _builder_hooks(cur: dict, unique: bool, saved: dict) -> dict:
    """Interpreter builder methods (by name) that count the running launch's CTAs, bytes loaded / stored (atomics
    both) and dot flops into ``cur["stats"]``, then call the ``saved`` originals."""

    def set_grid_dim(nx, ny, nz):
        if cur["stats"] is not None:
            cur["stats"].ctas.append(int(nx) * int(ny) * int(nz))
        return saved["set_grid_dim"](nx, ny, nz)

    def account(key, ptrs, mask):
        st = cur["stats"]
        if st is None:
            return
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        p = _masked_ptrs(ptrs, mask)
        if key == "ld":
            st.loaded += p.size * size
        else:
            st.stored += p.size * size
        if unique:
            cur[key].append((p.astype(np.uint64, copy=True), size))

    def load(ptrs, mask, other, cache_policy, is_volatile):
        account("ld", ptrs, mask)
        return saved["create_masked_load"](ptrs, mask, other, cache_policy, is_volatile)

    def store(ptrs, value, mask, cache_policy):
        account("st", ptrs, mask)
        return saved["create_masked_store"](ptrs, value, mask, cache_policy)

    def dot(a, b, d, *rest):
        if cur["stats"] is not None:
            m, k = a.data.shape[-2:]
            n = b.data.shape[-1]
            batch = int(np.prod(a.data.shape[:-2])) if a.data.ndim > 2 else 1
            cur["stats"].flops += 2 * batch * int(m) * int(n) * int(k)
        return saved["create_dot"](a, b, d, *rest)

    def rmw(op, ptr, val, mask, *rest):
        account("ld", ptr, mask)
        account("st", ptr, mask)
        return saved["create_atomic_rmw"](op, ptr, val, mask, *rest)

    def cas(ptr, cmp, val, *rest):
        account("ld", ptr, None)
        account("st", ptr, None)
        return saved["create_atomic_cas"](ptr, cmp, val, *rest)

    return {"set_grid_dim": set_grid_dim, "create_masked_load": load, "create_masked_store": store,
            "create_dot": dot, "create_atomic_rmw": rmw, "create_atomic_cas": cas}


@contextlib.contextmanager
def _instrument(tr: Trace, state: dict, count_bytes: bool, unique: bool):
    """Patch the interpreter's launch entry and (optionally) its memory ops and dots for the duration."""
    from triton.runtime import interpreter as ip

    from omni_fast.ops._dispatch import DispatchedOp

    run0 = ip.InterpretedFunction.run
    builder = ip.interpreter_builder
    saved = {n: getattr(builder, n) for n in ("create_masked_load", "create_masked_store", "create_dot",
                                              "create_atomic_rmw", "create_atomic_cas", "set_grid_dim")}
    cur: dict = {"stats": None, "ld": [], "st": []}
    hooks = _builder_hooks(cur, unique, saved)
    ip.InterpretedFunction.run = _launch_hook(tr, state, cur, unique, run0)
    # Data-dependent input checks run only on CPU tensors (omni_fast.validation.values_checkable): count as on CUDA.
    checks = cuda_like_value_checks()
    checks.__enter__()
    h100 = _as_h100()
    # omni_fast's custom ops call their backend's implementation directly, so the mode sees the ops inside.
    call0 = DispatchedOp.__call__
    DispatchedOp.__call__ = lambda self, *args: self._impls[args[-1]](*args[:-1])
    builder.set_grid_dim = hooks["set_grid_dim"]
    if count_bytes:
        for n in ("create_masked_load", "create_masked_store", "create_dot", "create_atomic_rmw", "create_atomic_cas"):
            setattr(builder, n, hooks[n])
    try:
        yield
    finally:
        ip.InterpretedFunction.run = run0
        checks.__exit__(None, None, None)
        for m, name, fn in h100:
            setattr(m, name, fn)
        DispatchedOp.__call__ = call0
        for n in saved:  # drop the instance attributes: the class methods show through again
            builder.__dict__.pop(n, None)


@contextlib.contextmanager
def skip_kernels(skip: bool = True):
    """With ``skip``: Triton launches reach ``InterpretedFunction.run`` (where they are counted) but no program
    runs; their outputs keep whatever the allocation held. Build a cheap-count unit's call under it too (its set-up,
    e.g. a stream's warm-up push, runs kernels)."""
    from triton.runtime import interpreter as ip

    run0 = ip.InterpretedFunction.run
    if skip:
        ip.InterpretedFunction.run = lambda self, *args, grid, warmup, **kwargs: None
    try:
        yield
    finally:
        ip.InterpretedFunction.run = run0


def trace(fn: Callable, *args, bytes: bool = False, unique: bool = False, torch_ops: bool = True,
          warmup: bool = False, execute: bool = True, **kwargs) -> Trace:
    """Run ``fn(*args, **kwargs)`` once and return its :class:`Trace` (see the module docstring).

    ``warmup``: call it once untraced first (a CUDA-graph path captures on its first call, and on a CPU its
    emulation runs the body twice then). Value checks of inputs count as on CUDA tensors (skipped unless a call
    passes ``check_values=True``).

    ``bytes``: instrument loads / stores / dots (slower); ``unique``: also count distinct bytes per launch
    (slower still, memory ~ 8 bytes per access); ``torch_ops``: count aten ops too.

    ``execute=False`` (launch counts only, the cheap count): Triton kernels are counted where they are launched
    but not run (torch ops still run, on whatever the skipped kernels left in their outputs). The counts are the
    same as executing whenever the Python between launches does not branch on a Triton kernel's output: no host
    sync reads one and no shape is computed from one (syncs on inputs, e.g. a CPU-side value check, are fine).
    That holds for graph-captured and streaming code (sizes depend on shapes only, no host sync on results: the
    CUDA-graph-safety rule); it is not checked here, so a unit opts in (``Unit.cheap_count``) only once
    tests/test_cost_model.py has compared the two counts on it or on the same code at fewer steps.
    """
    if not execute and (bytes or unique):
        raise ValueError("execute=False counts launches only: bytes / unique need the kernels to run")
    from omni_fast.backend import triton_interpreter_enabled

    if not triton_interpreter_enabled():
        raise RuntimeError("trace() instruments the Triton interpreter: set TRITON_INTERPRET=1 before importing "
                           "omni_fast kernels (as a CPU-only machine does)")
    tr = Trace()
    with skip_kernels(not execute):
        if warmup:  # skipping kernels, the value checks (of garbage) are skipped as on CUDA here too
            scratch = _instrument(Trace(), {"in_triton": False}, False, False) if not execute else \
                contextlib.nullcontext()
            with torch.no_grad(), scratch:
                fn(*args, **kwargs)
        state = {"in_triton": False, "bytes": bytes, "unique": unique}
        mode = _TorchCounter(tr, state) if torch_ops else contextlib.nullcontext()
        with torch.no_grad(), _instrument(tr, state, bytes, unique), mode:
            fn(*args, **kwargs)
    return tr


def count_unit(unit) -> Trace:
    """The launch-count trace of a cost-model unit (:class:`omni_fast.bench.costmodel.units.Unit`): its tiny call
    built and counted with the kernels run, or skipped (set-up included) when ``unit.cheap_count``."""
    with skip_kernels(unit.cheap_count):
        fn = unit.launch()
    return trace(fn, warmup=unit.warmup, execute=not unit.cheap_count)


def count_launches(fn: Callable, *args, torch_ops: bool = True, warmup: bool = True, execute: bool = True,
                   **kwargs) -> dict[str, int]:
    """``{kernel name: launches}`` of one call ``fn(*args, **kwargs)``: ``triton:<fn>`` and ``aten:<op>`` keys.

    Calls ``fn`` once to warm up (``warmup=False``: not), then once counted, under the Triton interpreter (CPU).
    ``torch_ops=False`` counts Triton kernels only. ``fn`` must be repeatable (rewind a KV cache inside it).
    ``execute=False``: the cheap count (see :func:`trace`).
    """
    return trace(fn, *args, torch_ops=torch_ops, warmup=warmup, execute=execute, **kwargs).launches()


def summarize(counts: dict[str, int]) -> dict[str, int]:
    """``{"triton": n, "torch": n, "total": n}`` of a :func:`count_launches` result."""
    tri = sum(v for k, v in counts.items() if k.startswith("triton:"))
    tor = sum(v for k, v in counts.items() if k.startswith("aten:"))
    return {"triton": tri, "torch": tor, "total": tri + tor}


