"""Healing after a :class:`~omni_fast.models.persistent.PersistentError`: where a user's object keeps its persistent
MTP frames, and the one call that resets them all.

A frame whose watchdog tripped leaves its counters and error flag set (on purpose: the next call refuses instead of
returning meaningless codes). The frames live inside a :class:`~omni_fast.models.CodePredictor`, which a user holds
directly, through the pipeline (:class:`omni_fast.models.Qwen3Omni`), or not at all (``omni_fast.patch`` keeps it
in the patched talker). :func:`reset_persistent` takes any of the three.
"""

from __future__ import annotations

from typing import Any


def _code_predictors(obj: Any) -> list:
    """Every :class:`CodePredictor` ``obj`` holds: itself, the pipeline's MTP stage, or the ones ``patch`` /
    ``install_on_talker`` keep in a transformers module's ``__dict__`` (searched over its sub-modules)."""
    import torch

    from ..code_predictor import CodePredictor

    if isinstance(obj, CodePredictor):
        return [obj]
    found = []
    stage = getattr(obj, "code_predictor", None)  # the pipeline's OmniCodePredictor (HFCodePredictor: none)
    if isinstance(getattr(stage, "cp", None), CodePredictor):
        found.append(stage.cp)
    model = obj if isinstance(obj, torch.nn.Module) else getattr(obj, "model", None)
    if isinstance(model, torch.nn.Module):
        for module in model.modules():
            cached = module.__dict__.get("_omni_fast_cp_cache")
            for cp in (module.__dict__.get("_omni_fast_cp_fixed"), cached[1] if cached else None):
                if isinstance(cp, CodePredictor) and all(cp is not f for f in found):
                    found.append(cp)
    return found


def reset_persistent(obj: Any) -> int:
    """Zero the counters and error flags of every persistent MTP frame ``obj`` holds (after a ``PersistentError``;
    stream-ordered, no host sync) and forget their recorded flags: the next frame runs its whole schedule again.

    ``obj``: a :class:`~omni_fast.models.CodePredictor`, a :class:`~omni_fast.models.Qwen3Omni` pipeline, or a
    transformers Qwen3-Omni model / talker patched by :func:`omni_fast.patch`. Returns the number of frames reset
    (0: none was built yet). A ``TypeError`` names ``obj`` when it holds no omni-fast code predictor at all."""
    cps = _code_predictors(obj)
    if not cps:
        raise TypeError(f"reset_persistent: obj must be a CodePredictor, a Qwen3Omni pipeline or a model patched by "
                        f"omni_fast.patch whose talker ran an omni-fast code predictor, got {type(obj).__name__}")
    return sum(cp.reset_persistent() for cp in cps)


__all__ = ["reset_persistent"]
