"""The one dispatch mechanism: a ``torch.library`` custom op whose body calls the chosen backend.

Each public op is declared once with :func:`dispatched_op` on a *prototype*: a function whose annotated signature
is the op's schema and whose last parameter is ``backend: str``. Implementations register per backend with
``@op.impl("triton")`` (and ``"cuda"``, ``"reference"``). The public entry point in ``omni_fast.ops`` validates
its arguments, resolves the backend with :func:`omni_fast.backend.resolve_backend` and calls the op; because the
backend travels as a schema argument, the choice is baked into ``torch.compile`` graphs and CUDA-graph captures,
and the op is opaque to the compiler (a fake implementation gives output shapes without running anything).
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Sequence

import torch

from ..backend import resolve_backend

LIBRARY = "omni_fast"


class DispatchedOp:
    """A custom op ``omni_fast::<name>`` with one implementation per backend."""

    def __init__(self, name: str, prototype: Callable, mutates_args: Sequence[str], fake: Callable | None):
        params = list(inspect.signature(prototype).parameters)
        if not params or params[-1] != "backend":
            raise TypeError(f"prototype of {name} must end with a 'backend: str' parameter")
        self.name = name
        self._impls: dict[str, Callable] = {}

        @functools.wraps(prototype)
        def body(*args, **kwargs):
            bound = inspect.signature(prototype).bind(*args, **kwargs)
            backend = bound.arguments.pop("backend")
            return self._impls[backend](*bound.arguments.values())

        self._op = torch.library.custom_op(f"{LIBRARY}::{name}", body, mutates_args=tuple(mutates_args))
        self._op.register_fake(fake if fake is not None else _fake_returning_none)

    def impl(self, backend: str) -> Callable[[Callable], Callable]:
        """Decorator: register ``fn`` (same parameters as the prototype, without ``backend``) for ``backend``."""

        def register(fn: Callable) -> Callable:
            self._impls[backend] = fn
            return fn

        return register

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(self._impls)

    def resolve(self, tensors, backend: str | None) -> str:
        """The backend one call runs on (see :func:`omni_fast.backend.resolve_backend`)."""
        return resolve_backend(self.name, tensors, self.backends, backend)

    def __call__(self, *args):
        """Call with the prototype's positional arguments, ``backend`` last (already resolved)."""
        return self._op(*args)


def _fake_returning_none(*args, **kwargs):
    return None


def dispatched_op(name: str, *, mutates_args: Sequence[str] = (), fake: Callable | None = None):
    """Declare ``omni_fast::<name>`` from an annotated prototype (see module docstring)."""

    def wrap(prototype: Callable) -> DispatchedOp:
        return DispatchedOp(name, prototype, mutates_args, fake)

    return wrap
