"""Which part of a Qwen-Omni model a submodule belongs to, and the :class:`omni_fast.patch.PatchReport` lines built
from :func:`omni_fast.patch`'s tallies (pure functions: no module is changed here)."""

from __future__ import annotations

from torch import nn

# transformers' Qwen-Omni class-name prefixes (Qwen2.5-Omni's AdaLayerNorm classes are spelt Qwen2_5_Omni...)
_FAMILY_PREFIXES = ("Qwen3OmniMoe", "Qwen2_5Omni", "Qwen2_5_Omni")
SUPPORTED_MODELS = ("Qwen3OmniMoeForConditionalGeneration (or its thinker, talker, code predictor, Code2Wav, audio "
                    "or vision encoder alone)", "Qwen2_5OmniForConditionalGeneration (or its thinker, talker, "
                    "Token2Wav, audio or vision encoder alone)")


def is_qwen_omni(model: nn.Module, prefixes: tuple[str, ...] = _FAMILY_PREFIXES) -> bool:
    """Whether the tree holds a transformers Qwen-Omni module (by class name, subclasses and wrappers included;
    ``prefixes``: the families' class-name prefixes to look for)."""
    return any(c.__name__.startswith(prefixes) for m in model.modules() for c in type(m).__mro__)


def is_qwen25(model: nn.Module) -> bool:
    """Whether the tree holds a transformers Qwen2.5-Omni module."""
    return is_qwen_omni(model, _FAMILY_PREFIXES[1:])


def not_supported(model: nn.Module) -> str:
    """Why a model that is no Qwen-Omni model gets nothing: its class, and what :func:`omni_fast.patch` takes."""
    return (f"{type(model).__name__} is not a supported Qwen-Omni model; omni_fast.patch takes transformers' "
            f"{' and '.join(SUPPORTED_MODELS)}")


def root_part(model: nn.Module) -> str:
    """The part the patched module itself is (a whole model counts as its thinker)."""
    name = type(model).__name__
    for key, part in (("CodePredictor", "code_predictor"), ("Code2Wav", "code2wav"), ("Token2Wav", "code2wav"),
                      ("Talker", "talker"), ("Audio", "audio"), ("Vision", "vision")):
        if key in name:
            return part
    return "thinker"


def part_of(root: str, path: str) -> str:
    """Which part of the model the submodule at ``path`` belongs to (the innermost named part wins)."""
    part = root
    for seg in path.split("."):
        part = {"thinker": "thinker", "talker": "talker", "code_predictor": "code_predictor",
                "code2wav": "code2wav", "token2wav": "code2wav", "audio_tower": "audio", "visual": "vision"}.get(
            seg, part)
    return part


def count_line(bucket: dict, left: dict, swapped: bool, key: tuple, n: int = 1) -> None:
    """Add ``n`` to the report line ``key`` in ``bucket`` (swapped) or ``left`` (left as is)."""
    target = bucket if swapped else left
    target[key] = target.get(key, 0) + n


def report_lines(model: nn.Module, root: str, wanted: set, counts: dict, left: dict) -> tuple[list, list]:
    """(replaced, left) report lines from the tallies ``{(part, what): n}``; a selected part with nothing replaced
    that the model has is named as left."""
    replaced = [f"[{part}] {what} (x{n})" for (part, what), n in sorted(counts.items())]
    if not replaced and not left and not is_qwen_omni(model):  # no part to name: the model is another family's
        return replaced, [f"[model] {not_supported(model)}: nothing replaced"]
    kept = [f"[{part}] {what} (x{n}" + ("; part not selected)" if part not in wanted else ")")
            for (part, what), n in sorted(left.items())]
    for part in sorted(wanted - {p for p, _ in counts} - {p for p, _ in left}):  # (the lines above say why)
        if any(part_of(root, p) == part for p, _ in model.named_modules()):
            kept.append(f"[{part}] no omni-fast replacement yet (runs as transformers wrote it)")
    return replaced, kept


def warn_if_nothing_replaced(model: nn.Module, replaced: list, left: list, parts) -> None:
    """A patch that swapped nothing in says so (a model omni-fast does not know, e.g. another family's, an empty
    ``parts``, or only opt-in swaps): its report alone is easy to miss, and the model then runs as before."""
    if replaced:
        return
    import warnings

    # the reasons of the selected parts (a "part not selected" line says nothing about why they were empty)
    known = [line for line in left if "no omni-fast replacement yet" not in line and "part not selected" not in line]
    if not is_qwen_omni(model):
        why = not_supported(model)
    elif parts is not None and not parts:
        why = "parts=[]"
    elif known:
        why = "left as is: " + known[0] + (f"; and {len(known) - 1} more in the report" if len(known) > 1 else "")
    elif parts is not None:
        why = f"parts={sorted(parts)}: nothing there that omni-fast replaces"
    else:
        why = "no module in it that omni-fast replaces"
    warnings.warn(f"omni_fast.patch replaced nothing in {type(model).__name__} ({why}); it runs as before",
                  UserWarning, stacklevel=4)  # the caller of patch()
