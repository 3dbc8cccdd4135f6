"""Backend selection: which implementation of an op runs.

Every public op in :mod:`omni_fast.ops` has up to three implementations:

- ``"triton"``: the Triton kernels in :mod:`omni_fast.kernels` (CUDA tensors, or CPU tensors under the Triton
  interpreter, ``TRITON_INTERPRET=1``);
- ``"cuda"``: hand-written CUDA C++ from ``kernels/cuda/`` loaded through CuPy (CUDA tensors, where it exists);
- ``"reference"``: the pure-PyTorch modules in :mod:`omni_fast.reference` (any device), the ground truth.

The choice, first match wins: the call's ``backend=`` argument, then the innermost
``with omni_fast.use_backend(...)`` block, then the ``OMNI_FAST_BACKEND`` environment variable, then ``"auto"``.
``"auto"`` picks triton for CUDA tensors, triton for CPU tensors under the interpreter, else reference.

Fallback: only some ops have a CUDA C++ implementation (RoPE, MoE routing and alignment, sampling). ``"cuda"``
means "the CUDA C++ twin where the op has one, triton elsewhere", wherever it comes from (an op call's
``backend=``, a model's or ``omni_fast.patch``'s ``backend=``, a ``use_backend`` block, the environment). One rule,
so that a model pinned to ``"cuda"`` runs (its attention and GEMMs are Triton-only) and no context has to be set
inside traced code. ``DispatchedOp.backends`` lists what an op implements.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterable

import torch

BACKENDS = ("triton", "cuda", "reference")
_CHOICES = BACKENDS + ("auto",)
_ENV = "OMNI_FAST_BACKEND"

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("omni_fast_backend", default=None)
# The tokens of the eager use_backend blocks open in this context, innermost last: per context, not per object, so
# one use_backend object may be open several times at once (nested, recursive, several threads or tasks)
_tokens: contextvars.ContextVar[tuple] = contextvars.ContextVar("omni_fast_backend_tokens", default=())


def triton_interpreter_enabled() -> bool:
    """True when Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _check_name(name: str, where: str) -> str:
    if not isinstance(name, str):  # a wrong type is a TypeError naming the argument (the project's rule)
        raise TypeError(f"{where} must be a str, one of {_CHOICES}, got {type(name).__name__}")
    if name.lower() not in _CHOICES:
        raise ValueError(f"{where} must be one of {_CHOICES}, got {name!r}")
    return name.lower()


# The use_backend blocks opened inside the region torch.compile is tracing, innermost last. Only a trace writes it:
# dynamo records the appends / pops as side effects of the trace (a trace given up leaves it untouched, and a
# finished graph leaves it as it found it, blocks being balanced), and reads it at trace time, so a block's choice
# is a constant of the graph. Eager code never writes it (there, the ContextVar below). One exception: a graph break
# inside a block (no fullgraph) applies the append when the graph before the break returns, so the eager code up to
# the resumed graph sees the block (right for this thread) -- and so would another thread's ops in that window:
# module state, not thread-local, because dynamo cannot guard a threading.local (an internal "Guard failed on the
# same frame" assertion in torch 2.13).
_TRACED_BLOCKS: list[str] = []


class use_backend(contextlib.ContextDecorator):  # noqa: N801 (a function in form: ``with use_backend("reference"):``)
    """Run the ops called inside the block on backend ``name`` (``triton``, ``cuda``, ``reference`` or ``auto``).

    Also a decorator (``@use_backend("reference")``), as it was when it was a ``contextlib.contextmanager``: each
    call of the decorated function opens a block of its own (recursive and concurrent calls included). One object
    may be entered again while open (nested, or by several threads at once): each entry is a block of its own.

    Also inside a function compiled by ``torch.compile`` (``fullgraph=True`` included): there the block's choice
    is fixed when the function is traced (the ops' backend is an argument of the graph's op calls); eager blocks
    are a ContextVar (thread- and task-local), which dynamo cannot trace, so a traced block keeps its own stack.
    """

    def __init__(self, name: str):
        self.name = _check_name(name, "use_backend(name)")  # the only state: entering again is safe (_tokens)

    def __enter__(self) -> None:
        if torch.compiler.is_compiling():
            _TRACED_BLOCKS.append(self.name)
        else:
            _tokens.set(_tokens.get() + (_current.set(self.name),))

    def __exit__(self, *exc) -> None:
        if torch.compiler.is_compiling():
            _TRACED_BLOCKS.pop()
        else:
            tokens = _tokens.get()  # blocks close innermost first in a context: the last token is this block's
            _tokens.set(tokens[:-1])
            _current.reset(tokens[-1])


PIN_ATTR = "_omni_fast_backend"  # where omni_fast.patch(model, backend=...) pins its backend on a module


def pinned_backend(module) -> str | None:
    """The backend :func:`omni_fast.patch` pinned on ``module`` (``patch(model, backend=...)``), else None: the
    ambient choice (``use_backend`` block, ``OMNI_FAST_BACKEND``, auto)."""
    return getattr(module, "__dict__", {}).get(PIN_ATTR)


def _context_backend() -> str | None:
    # The innermost use_backend block. torch.compile cannot trace ContextVar.get, and the choice is fixed for a
    # compiled region anyway, so dynamo takes the value as a constant of the graph (see below).
    return _current.get()


# What ``@torch.compiler.assume_constant_result`` does, without its cost: the decorator imports torch._dynamo
# (about 6 of a 10 s ``import omni_fast`` on a 2-core CPU machine) only to set this attribute, which dynamo reads
# when it traces a call. tests/test_packaging.py checks that the decorator still sets exactly this attribute.
DYNAMO_CONSTANT_ATTR = "_dynamo_marked_constant"
setattr(_context_backend, DYNAMO_CONSTANT_ATTR, True)


def requested_backend(explicit: str | None = None) -> str:
    """The backend asked for by the call, the context or the environment (``"auto"`` when none)."""
    if explicit is not None:
        return _check_name(explicit, "backend")
    if _TRACED_BLOCKS:  # a use_backend block inside the region torch.compile traces (never true in eager code)
        return _TRACED_BLOCKS[-1]
    ctx = _context_backend()
    if ctx is not None:
        return ctx
    env = os.environ.get(_ENV)
    if env:
        return _check_name(env, f"environment variable {_ENV}")
    return "auto"


def graph_capturable(explicit: str | None = None) -> bool:
    """Whether ops run under this backend choice can be captured in a CUDA graph: every backend but
    ``"reference"``, whose pure-PyTorch ops read lengths and indices on the host (a sync, which a capture
    forbids). Model modules use it to pick their CUDA-graph default."""
    return requested_backend(explicit) != "reference"


def resolve_backend(
    op_name: str, tensors: Iterable[torch.Tensor], available: Iterable[str], explicit: str | None = None
) -> str:
    """Pick the backend for one call of ``op_name``.

    ``tensors`` are the call's tensor inputs (their device decides ``auto``); ``available`` lists the backends the
    op implements. Raises ``ValueError`` when the requested backend cannot run these tensors. ``"cuda"`` falls
    back to ``"triton"`` for an op without a CUDA C++ implementation (module doc).
    """
    available = tuple(available)
    want = asked = requested_backend(explicit)
    if want == "cuda" and "cuda" not in available and "triton" in available:
        want = "triton"
    devices = {t.device.type for t in tensors if isinstance(t, torch.Tensor)}
    on_cuda = "cuda" in devices
    if want == "auto":
        if on_cuda or triton_interpreter_enabled():
            want = "triton" if "triton" in available else "reference"
        else:
            want = "reference"
    if want not in available:
        raise ValueError(f"{op_name}: backend {want!r} is not implemented (available: {available})")
    if want == "triton" and not on_cuda and not triton_interpreter_enabled():
        via = " ('cuda' runs triton for this op: it has no CUDA C++ version)" if asked == "cuda" else ""
        raise ValueError(f"{op_name}: backend 'triton'{via} needs CUDA tensors, or TRITON_INTERPRET=1 to run on the "
                         "CPU interpreter")
    if want == "cuda" and not on_cuda:
        raise ValueError(f"{op_name}: backend 'cuda' needs CUDA tensors (got devices {sorted(devices)})")
    return want
