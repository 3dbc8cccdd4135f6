"""A method bound to one instance that pickles: what :func:`omni_fast.patch` swaps into modules.

``types.MethodType(fn, module)`` pickles as ``getattr(module, fn.__name__)``: a name the module does not have (the
swapped-in function lives in omni-fast), so a patched model saved with ``torch.save`` could not be loaded back.
:class:`BoundMethod` pickles as (the module-level function, the instance) instead, and :func:`original_method`
captures what an attribute was before a swap in the same picklable form. The swap helpers :func:`omni_fast.patch`
uses (:func:`swap_attr`, :func:`swap_forward`, :func:`swap_sample`) live here too, with what ``unpatch`` restores.
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


class _Missing:
    """Marks an instance attribute that did not exist before the patch; survives deepcopy and pickling."""

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return "_MISSING"


_MISSING = _Missing()


def remember(module, name: str) -> None:
    """Save the instance attribute ``name`` (or its absence) for :func:`unpatch`."""
    module.__dict__.setdefault("_omni_fast_saved_attrs", {}).setdefault(name, module.__dict__.get(name, _MISSING))


def swap_attr(module, name: str, value) -> None:
    """Set the instance attribute ``name`` of ``module`` to ``value`` (bypassing ``nn.Module.__setattr__``), having
    saved what was there (:func:`remember`) so that ``unpatch`` restores it."""
    remember(module, name)
    object.__setattr__(module, name, value)


def swap_forward(module, new_forward) -> None:
    """``module``'s forward -> ``new_forward`` (bound to it); what ran before stays callable as
    ``module._omni_fast_forward`` (transformers' code, for the swapped forward's fallbacks).

    A module with accelerate's hook (transformers' ``device_map="auto"``, CPU / disk offload: ``add_hook_to_module``
    makes ``forward`` a wrapper that moves the inputs to the module's execution device, loads offloaded weights,
    then calls ``_old_forward``) keeps its hook: the inner ``_old_forward`` is swapped, so the hook still runs
    around omni-fast's forward. Swapping ``forward`` itself dropped the hook: inputs arrived on another device
    than the weights (a model split over two GPUs failed, or an offloaded module ran on unloaded weights)."""
    if "_omni_fast_forward" in module.__dict__:  # already swapped by an enclosing patch: never wrap twice
        return
    hooked = "_hf_hook" in module.__dict__ and "_old_forward" in module.__dict__
    name = "_old_forward" if hooked else "forward"
    # what the swapped forward calls to run transformers' code; picklable (see omni_fast._bound)
    module.__dict__["_omni_fast_forward"] = original_method(module, name)
    ours = BoundMethod(new_forward, module)
    module.__dict__["_omni_fast_swapped"] = (name, ours)  # for unswap_forward: where it went, and what
    swap_attr(module, name, ours)


def unswap_forward(module) -> None:
    """Run by ``unpatch`` before it restores the saved attributes: when accelerate's hook was added or removed
    since :func:`swap_forward`, omni-fast's forward is no longer where it was put, and transformers' forward goes
    where it is now. ``remove_hook_from_module`` made ``forward`` the swapped ``_old_forward`` (omni-fast's) and
    deleted ``_old_forward``: ``forward`` becomes transformers' again (what the removal does to an unpatched module),
    no ``_old_forward`` comes back. ``add_hook_to_module`` kept the swapped ``forward`` as its ``_old_forward`` and
    made ``forward`` its wrapper: ``_old_forward`` becomes transformers', the hook stays. The attribute accelerate
    rewrote is accelerate's: not restored."""
    name, ours = module.__dict__.get("_omni_fast_swapped", (None, None))
    if name is None or module.__dict__.get(name) is ours:
        return  # where swap_forward put it: the saved attributes restore it
    module.__dict__.get("_omni_fast_saved_attrs", {}).pop(name, None)
    other = "forward" if name == "_old_forward" else "_old_forward"
    if module.__dict__.get(other) is ours:
        module.__dict__[other] = module.__dict__["_omni_fast_forward"]


def swap_sample(module, new_sample) -> None:
    """The Token2Wav DiT's ``sample`` (its whole ODE solve) -> ``new_sample``; transformers' stays callable as
    ``module._omni_fast_sample``."""
    if "_omni_fast_sample" in module.__dict__:
        return
    module.__dict__["_omni_fast_sample"] = original_method(module, "sample")
    swap_attr(module, "sample", BoundMethod(new_sample, module))
