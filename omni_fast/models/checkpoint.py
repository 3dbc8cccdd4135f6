"""Strict loading of a local transformers Qwen3-Omni checkpoint: nothing loads silently wrong.

transformers' ``from_pretrained`` loads a checkpoint with a missing tensor (randomly initialised), a float tensor
stored as an integer (cast), a config whose layer count no longer matches the weights, or unexpected tensors, and
only logs a load report; bad config values fail much later with messages that name neither the file nor the
setting. :func:`load_strict` checks, before and after transformers loads:

- the config file exists and parses, and its settings make sense (:func:`validate_config`: every error names the
  file and the dotted setting, e.g. ``code2wav_config.sliding_window``);
- every shard the index names exists and has a readable safetensors header (a truncated or corrupt shard is named);
  every key the index lists is in its shard;
- no tensor is stored with a non-floating dtype (unless the config has a ``quantization_config``), no tensor has a
  shape other than the model's, and no key is missing or unexpected: ONE ``ValueError`` lists every problem with
  the shard it is in (or would be in).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# Settings that must be positive integers wherever they appear in a sub-config.
_POSITIVE = ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
             "moe_intermediate_size", "num_experts", "num_local_experts", "num_experts_per_tok", "head_dim",
             "codebook_size", "num_quantizers", "num_code_groups", "sliding_window", "num_hidden_layers",
             "decoder_dim", "d_model", "encoder_layers", "encoder_attention_heads", "num_mel_bins", "depth",
             "num_heads", "patch_size", "max_position_embeddings")
_SUBCONFIGS = ("thinker_config", "talker_config", "code2wav_config", "text_config", "audio_config", "vision_config",
               "code_predictor_config")
_EXPERT_KEY = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded exactly (a ``ValueError``: the message lists every problem found)."""


def _sub_configs(config, prefix: str = ""):
    """(dotted name, config) of ``config`` and every nested sub-config."""
    yield prefix.rstrip("."), config
    for name in _SUBCONFIGS:
        sub = getattr(config, name, None)
        if sub is not None and not isinstance(sub, (int, float, str, list, dict)):
            yield from _sub_configs(sub, f"{prefix}{name}.")


def validate_config(config, file: str) -> None:
    """Raise :class:`CheckpointError` naming ``file`` and the setting for the first nonsensical value found."""

    def bad(where: str, attr: str, rule: str, value) -> CheckpointError:
        name = f"{where}.{attr}" if where else attr
        return CheckpointError(f"{file}: {name} must be {rule}, got {value!r}")

    for where, cfg in _sub_configs(config):
        for attr in _POSITIVE:
            value = getattr(cfg, attr, None)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(where, attr, "a positive integer", value)
        experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
        per_tok = getattr(cfg, "num_experts_per_tok", None)
        if experts and per_tok and per_tok > experts:
            raise bad(where, "num_experts_per_tok", f"<= the number of experts ({experts})", per_tok)
        heads, kv = getattr(cfg, "num_attention_heads", None), getattr(cfg, "num_key_value_heads", None)
        if heads and kv and heads % kv:
            raise bad(where, "num_key_value_heads", f"a divisor of num_attention_heads ({heads})", kv)
        groups = getattr(cfg, "num_code_groups", None)
        if groups is not None and groups < 2:  # codebook 0 from the talker plus at least one from the predictor
            raise bad(where, "num_code_groups", "at least 2", groups)
        for attr in ("upsample_rates", "upsampling_ratios"):
            rates = getattr(cfg, attr, None)
            if rates is None:
                continue
            if not isinstance(rates, (list, tuple)) or not rates or any(
                    isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in rates):
                raise bad(where, attr, "a non-empty list of positive integers", rates)


def checkpoint_dir(path) -> str:
    """``from_pretrained``'s ``path`` as a str: a str / os.PathLike (TypeError otherwise: an int would be taken for a
    file descriptor) naming an existing directory (FileNotFoundError otherwise)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike (a local checkpoint directory), got "
                        f"{type(path).__name__} ({path!r})")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    return os.fspath(path)


def resolve_dtype(dtype, default: torch.dtype, path: str) -> torch.dtype:
    """``from_pretrained``'s ``dtype`` as transformers takes it, resolved once for the float and the quantized
    loaders: None -> ``default``; a floating ``torch.dtype``; its name (``"bfloat16"``); ``"auto"`` -> the dtype
    ``path/config.json`` names (``dtype`` / ``torch_dtype``), else ``default``. TypeError / ValueError naming dtype."""
    if dtype is None:
        return default
    if isinstance(dtype, str):
        name = dtype
        if name == "auto":
            try:
                with open(os.path.join(path, CONFIG_NAME)) as f:
                    raw = json.load(f)
                name = raw.get("dtype") or raw.get("torch_dtype")
            except (OSError, ValueError, AttributeError):
                name = None  # the config's own checks name the file
            if not isinstance(name, str) or not isinstance(getattr(torch, name, None), torch.dtype):
                return default
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype must be a floating torch.dtype or its name ('bfloat16', 'float16', 'float32') "
                             f"or 'auto', got {name!r}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, its name or 'auto', got {type(dtype).__name__} ({dtype!r})")
    if not dtype.is_floating_point or dtype.itemsize < 2:  # (float8: the quantized formats hold their own)
        raise ValueError(f"dtype must be a floating dtype of 16 bits or more for the model, got {dtype}")
    return dtype


def load_config(path: str):
    """The directory's ``config.json`` as a transformers ``Qwen3OmniMoeConfig``, validated."""
    from transformers import Qwen3OmniMoeConfig

    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file}: missing (a checkpoint directory needs its config.json)")
    try:
        with open(file) as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not readable JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: must hold a JSON object, got {type(raw).__name__}")
    model_type = raw.get("model_type")
    if model_type is not None and model_type != "qwen3_omni_moe":  # transformers only warns, then fails deep inside
        hint = (" (Qwen2.5-Omni: load it with omni_fast.models.Qwen25Omni.from_pretrained)"
                if model_type == "qwen2_5_omni" else "")
        raise CheckpointError(f"{file}: model_type {model_type!r} is not a Qwen3-Omni checkpoint ('qwen3_omni_moe' "
                              f"expected){hint}")
    try:
        config = Qwen3OmniMoeConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds: name the file
        raise CheckpointError(f"{file}: not a valid Qwen3-Omni config ({type(e).__name__}: {e})") from None
    validate_config(config, file)
    return config


def scan_shards(path: str) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """key -> (shard file name, safetensors dtype, shape) of every tensor of the checkpoint, from the headers only.

    Raises :class:`CheckpointError` for a missing or unreadable (truncated, corrupt) shard, naming it, and for keys
    the index lists but their shard does not hold (one error listing them)."""
    from safetensors import safe_open

    index_file = os.path.join(path, INDEX_NAME)
    if os.path.isfile(index_file):
        try:
            with open(index_file) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_file}: not a readable safetensors index ({e})") from None
        shards = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(path, SINGLE_NAME)):
        weight_map, shards = None, [SINGLE_NAME]
    else:
        raise FileNotFoundError(f"{path}: no {INDEX_NAME} or {SINGLE_NAME} (no safetensors weights)")
    found: dict[str, tuple[str, str, tuple[int, ...]]] = {}
    for shard in shards:
        file = os.path.join(path, shard)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file}: shard missing (named by {INDEX_NAME})")
        try:
            with safe_open(file, "pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    found[key] = (shard, sl.get_dtype(), tuple(sl.get_shape()))
        except Exception as e:  # noqa: BLE001 - safetensors' own error type: name the shard
            raise CheckpointError(f"{file}: unreadable safetensors shard (truncated or corrupt?): {e}") from None
    if weight_map is not None:
        absent = [f"{k} (listed for {s})" for k, s in sorted(weight_map.items()) if k not in found]
        if absent:
            raise CheckpointError(f"{path}: {len(absent)} key(s) listed in {INDEX_NAME} are not in their shard: "
                                  + ", ".join(absent[:20]) + (" ..." if len(absent) > 20 else ""))
    return found


def _expected(config) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of the model's persistent state, from a meta-device model (no memory)."""
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as q3

    with torch.device("meta"):
        model = q3.Qwen3OmniMoeForConditionalGeneration._from_config(config)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def check_tensors(path: str, config, found: dict[str, tuple[str, str, tuple[int, ...]]]) -> list[str]:
    """Problems of the stored tensors against the model the config builds (dtype, shape, missing per-expert
    tensors); keys transformers converts (per-expert weights fused into ``gate_up_proj``) are matched by their
    expert index."""
    problems: list[str] = []
    expected = _expected(config)
    quantized = getattr(config, "quantization_config", None) is not None
    experts: dict[str, tuple[str, set]] = {}
    for key, (shard, dtype, shape) in sorted(found.items()):
        if not quantized and not dtype.startswith(("F", "BF")):  # F16/F32/F64/BF16/F8_*
            problems.append(f"{key} in {shard}: stored as {dtype}, expected a floating-point dtype")
        if key in expected and expected[key][0] != shape:
            problems.append(f"{key} in {shard}: shape {list(shape)}, the config needs {list(expected[key][0])}")
        m = _EXPERT_KEY.match(key)
        if m:
            experts.setdefault(m.group(1), (shard, set()))[1].add((int(m.group(2)), m.group(3)))
    for prefix, (shard, have) in experts.items():
        fused = expected.get(prefix + ".gate_up_proj")
        if fused is None:
            continue  # unexpected: transformers reports the whole prefix
        want = {(e, p) for e in range(fused[0][0]) for p in ("gate_proj", "up_proj", "down_proj")}
        for e, p in sorted(want - have):
            problems.append(f"{prefix}.{e}.{p}.weight: missing (its expert siblings are in {shard})")
        for e, p in sorted(have - want):
            problems.append(f"{prefix}.{e}.{p}.weight in {shard}: unexpected (the config has {fused[0][0]} "
                            f"experts)")
    return problems


def report(path: str, problems: list[str]) -> None:
    """Raise one :class:`CheckpointError` listing ``problems`` (the first 40, then a count) for the checkpoint at
    ``path``; nothing when the list is empty."""
    if problems:
        shown = problems[:40] + ([f"... and {len(problems) - 40} more"] if len(problems) > 40 else [])
        raise CheckpointError(f"checkpoint {path} does not match its config ({len(problems)} problem(s)):\n  "
                              + "\n  ".join(shown))


def load_strict(path: str, *, dtype: torch.dtype, strict: bool = True) -> Any:
    """``Qwen3OmniMoeForConditionalGeneration`` from a local directory; with ``strict`` every check of the module
    docstring runs and any problem raises one :class:`CheckpointError`."""
    from transformers import Qwen3OmniMoeForConditionalGeneration

    if not strict:
        return Qwen3OmniMoeForConditionalGeneration.from_pretrained(path, local_files_only=True, dtype=dtype)
    config = load_config(path)
    found = scan_shards(path)
    report(path, check_tensors(path, config, found))
    try:
        model, info = Qwen3OmniMoeForConditionalGeneration.from_pretrained(
            path, config=config, local_files_only=True, dtype=dtype, output_loading_info=True)
    except RuntimeError as e:  # transformers' conversion / size reports: what it found is in its log
        raise CheckpointError(f"checkpoint {path}: transformers could not load it: {e}") from None
    problems = [f"{k}: missing (in no shard)" for k in sorted(info.get("missing_keys") or [])]
    problems += [f"{k} in {found.get(k, ('?',))[0]}: unexpected (the model has no such tensor)"
                 for k in sorted(info.get("unexpected_keys") or [])]
    problems += [f"{m}: shape mismatch" for m in info.get("mismatched_keys") or []]
    problems += [str(m) for m in info.get("error_msgs") or []]
    report(path, problems)
    return model


def check_finite(model: torch.nn.Module, prefix: str = "") -> None:
    """Raise :class:`CheckpointError` naming every parameter of ``model`` (e.g. the Code2Wav vocoder) that holds a
    NaN or an infinity (one host sync per tensor: a load-time check)."""
    bad = [name for name, p in model.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    if bad:
        raise CheckpointError(f"non-finite weights (NaN/inf) in {len(bad)} tensor(s): "
                              + ", ".join(prefix + n for n in bad[:20]))


__all__ = ["CheckpointError", "check_finite", "check_tensors", "checkpoint_dir", "load_config", "load_strict", "resolve_dtype",
           "scan_shards", "validate_config"]
