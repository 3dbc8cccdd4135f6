"""A method bound to one instance that pickles: what :func:`omni_fast.patch` swaps into modules.

``types.MethodType(fn, module)`` pickles as ``getattr(module, fn.__name__)``: a name the module does not have (the
swapped-in function lives in omni-fast), so a patched model saved with ``torch.save`` could not be loaded back.
:class:`BoundMethod` pickles as (the module-level function, the instance) instead, and :func:`original_method`
captures what an attribute was before a swap in the same picklable form.
"""

from __future__ import annotations

import inspect


class BoundMethod:
    """``fn`` bound to ``instance``: calling it calls ``fn(instance, ...)``; pickles and deep-copies by value
    (``fn`` by its qualified name, ``instance`` through the memo, so a copy of the module re-binds to the copy)."""

    __slots__ = ("__func__", "__self__")

    def __init__(self, fn, instance):
        self.__func__, self.__self__ = fn, instance

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *args, **kwargs)

    def __reduce__(self):
        return BoundMethod, (self.__func__, self.__self__)

    # Introspection as a bound method gives it (transformers reads e.g. the parameters of
    # ``prepare_inputs_for_generation`` to decide what generate may pass).
    @property
    def __signature__(self) -> inspect.Signature:
        sig = inspect.signature(self.__func__)
        return sig.replace(parameters=list(sig.parameters.values())[1:])

    @property
    def __name__(self) -> str:
        return self.__func__.__name__

    def __repr__(self) -> str:
        return f"<omni_fast bound method {getattr(self.__func__, '__qualname__', self.__func__)} of " \
               f"{type(self.__self__).__name__}>"


def original_method(instance, name: str):
    """What ``instance.<name>`` is now, in a picklable form: the instance attribute when there is one, else the
    class's function bound with :class:`BoundMethod` (a plain bound method would pickle as a name lookup that,
    once the swap is restored on unpickling, finds the swapped-in method and recurses)."""
    if name in instance.__dict__:
        return instance.__dict__[name]
    return BoundMethod(getattr(type(instance), name), instance)
