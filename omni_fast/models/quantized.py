"""Loading Qwen3-Omni checkpoints whose MoE experts are quantized, keeping the experts quantized in memory.

Supported ``quantization_config`` (config.json):

- ``{"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [bn, bk]}``
  (Qwen's / DeepSeek's FP8 checkpoints): each linear ``X`` holds ``X.weight`` (float8_e4m3fn ``[N, K]``) and
  ``X.weight_scale_inv`` (fp32 ``[ceil(N/bn), ceil(K/bk)]``, multiplied in) -> ``fp8_block`` experts.
- ``{"quant_method": "compressed-tensors", "format": "pack-quantized", ...}`` with one weight scheme of 4-bit ints,
  strategy ``group`` (symmetric or not), no activation quantization (llm-compressor's W4A16 / AWQ exports; parsed
  with compressed-tensors' own ``QuantizationConfig``): ``X.weight_packed`` int32 ``[N, K/8]``, ``X.weight_scale``
  ``[N, K/g]``, ``X.weight_zero_point`` int32 ``[ceil(N/8), K/g]`` (asymmetric; packed along N, unpacked here to
  int8 ``[N, K/g]``), ``X.weight_shape`` -> ``int4_w4a16`` experts.
- ``{"quant_method": "compressed-tensors", "format": "float-quantized", ...}`` with one scheme of 8-bit float
  weights, strategy ``tensor`` or ``channel`` (llm-compressor's FP8 / FP8_DYNAMIC), and 8-bit float input
  activations dynamic per ``token``, dynamic per ``tensor`` (one scale over each GEMM's input: vLLM's per-tensor
  dynamic quantization; vLLM itself loads such MoE checkpoints with per-tensor weights only) or static per ``tensor``: ``X.weight`` float8_e4m3fn ``[N, K]``,
  ``X.weight_scale`` ``[1]`` (tensor) or ``[N, 1]`` (channel), ``X.input_scale`` ``[1]`` (static) ->
  ``fp8_channel`` experts. Per-tensor scales are written out per row at load (``2I + H`` fp32 per expert, ~0.1%
  of its FP8 weights); the static input scale of gate_proj and up_proj (one input, so llm-compressor observes the
  same amax for both) is their max, as vLLM does.

Anything else raises a ValueError naming the method. Checkpoint keys are the published layout (per-expert
``...mlp.experts.{e}.{gate,up,down}_proj.*``); transformers' own key renamings map them onto the module tree.

Memory: the model is built with a zero expert width (no float expert weights are ever allocated), tensors are
read from the safetensors memory maps where they are used (one experts module at a time), the non-expert
tensors are loaded (quantized non-expert linears, e.g. attention projections in a fully-FP8 checkpoint, are
dequantized to the model dtype: they are a small part of the model), and each experts module gets its
quantized tensors as buffers (``.to()`` moves them) plus the format facts; :func:`quantized_experts` rebuilds the
:class:`~omni_fast.ops.quant.QuantizedExperts` the fused MoE consumes. The experts run only through omni-fast
(``config._experts_implementation = "omni_fast"`` is set on the quantized text configs).
"""

from __future__ import annotations

import glob
import json
import os
import re

import torch

from .._bound import BoundMethod
from ..ops.quant import QuantizedExperts
from ..reference import moe_quant as rq

_EXPERT_KEY = re.compile(r"^(?P<module>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\."
                         r"(?P<name>weight|weight_scale_inv|weight_packed|weight_scale|weight_zero_point|"
                         r"weight_shape|input_scale)$")
_QUANT_SUFFIXES = ("weight_scale_inv", "weight_packed", "weight_scale", "weight_zero_point", "weight_shape",
                   "input_scale")
_BUFFERS = ("w13", "w2", "w13_scale", "w2_scale", "w13_zero", "w2_zero", "w13_input_scale", "w2_input_scale")


# --- quantization_config ------------------------------------------------------------------------------------------


def parse_quantization_config(qcfg: dict) -> dict:
    """A checkpoint's ``quantization_config`` -> ``{"format", "block" | "group_size", "symmetric"}``.

    Raises ValueError naming the method (and the unsupported field) for anything but the two supported formats.
    """
    if not isinstance(qcfg, dict):
        raise TypeError(f"quantization_config must be a JSON object (a dict with quant_method), got "
                        f"{type(qcfg).__name__} {qcfg!r}")
    method = qcfg.get("quant_method")
    if method == "fp8":
        fmt, act, block = qcfg.get("fmt", "e4m3"), qcfg.get("activation_scheme", "dynamic"), \
            qcfg.get("weight_block_size")
        two_sizes = isinstance(block, (list, tuple)) and len(block) == 2 and all(
            isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
        if fmt != "e4m3" or act != "dynamic" or not two_sizes:
            raise ValueError(f"quantization_config quant_method 'fp8' is supported with fmt 'e4m3', "
                             f"activation_scheme 'dynamic' and a weight_block_size of two positive integers; got fmt={fmt!r}, "
                             f"activation_scheme={act!r}, weight_block_size={block!r}")
        return {"format": "fp8_block", "block": (int(block[0]), int(block[1])), "symmetric": True}
    if method == "compressed-tensors":
        return _parse_compressed_tensors(qcfg)
    raise ValueError(f"quantization_config quant_method {method!r} is not supported by omni-fast (supported: 'fp8' "
                     "block-scaled e4m3, 'compressed-tensors' pack-quantized W4A16 and float-quantized FP8)")


def _parse_compressed_tensors(qcfg: dict) -> dict:
    try:
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError as exc:  # pragma: no cover - the package is a dependency of this path only
        raise ImportError("loading a compressed-tensors checkpoint needs the 'compressed-tensors' package") from exc
    cfg = QuantizationConfig.model_validate(qcfg)
    schemes = list(cfg.config_groups.values())
    fmt = cfg.format
    bad = None
    if len(schemes) != 1:
        bad = f"{len(schemes)} config_groups (one scheme expected)"
    else:
        w, a = schemes[0].weights, schemes[0].input_activations
        fmt = getattr(schemes[0], "format", None) or fmt
        if fmt == "float-quantized":
            return _parse_float_quantized(w, a)
        if fmt != "pack-quantized":
            bad = f"format {fmt!r}"
        elif w is None or w.num_bits != 4 or w.type != "int" or w.strategy != "group":
            bad = "weights other than 4-bit int group-wise" if w is not None else "no weight scheme"
        elif a is not None:
            bad = "quantized input activations"
    if bad is not None:
        raise ValueError(f"quantization_config quant_method 'compressed-tensors' is supported for pack-quantized "
                         f"W4A16 (4-bit int weights, group strategy, 16-bit activations); this one has {bad}")
    return {"format": "int4_w4a16", "group_size": int(w.group_size), "symmetric": bool(w.symmetric)}


def _parse_float_quantized(w, a) -> dict:
    """compressed-tensors ``float-quantized``: FP8 weights per tensor / channel, FP8 activations per token
    (dynamic) or per tensor (static)."""
    bad = None
    if w is None or w.num_bits != 8 or w.type != "float" or w.strategy not in ("tensor", "channel") \
            or not w.symmetric or w.dynamic:
        bad = ("weights other than static symmetric 8-bit float per tensor / channel (got strategy "
               f"{getattr(w, 'strategy', None)!r})")
    elif a is None:
        bad = "no input activation scheme (weight-only FP8)"
    elif a.num_bits != 8 or a.type != "float" or not a.symmetric or \
            (a.strategy, bool(a.dynamic)) not in (("token", True), ("tensor", True), ("tensor", False)):
        bad = (f"input activations {a.type} {a.num_bits}-bit strategy {a.strategy!r} dynamic={a.dynamic!r} (dynamic "
               "per token, dynamic or static per tensor expected)")
    if bad is not None:
        raise ValueError(f"quantization_config quant_method 'compressed-tensors' format 'float-quantized' is "
                         f"supported for FP8 W8A8 (per-tensor / per-channel e4m3 weights, e4m3 activations dynamic "
                         f"per token, dynamic or static per tensor); this one has {bad}")
    # dynamic per tensor: one scale over each GEMM's whole input, computed on the device (as vLLM runs it)
    return {"format": "fp8_channel", "weight_strategy": str(w.strategy), "static_input": not a.dynamic,
            "symmetric": True, "dynamic_scale": "per_tensor" if a.strategy == "tensor" and a.dynamic else "per_token"}


# --- tensors ------------------------------------------------------------------------------------------------------


def _checkpoint_files(path: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(glob.escape(path), "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    return files


class _Checkpoint:
    """The checkpoint's tensors by key, read on demand (safetensors memory maps): the experts are read one experts
    module at a time, so host memory holds at most one module's quantized experts beyond the non-expert weights."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self._files = [safe_open(f, framework="pt") for f in _checkpoint_files(path)]
        self._where = {key: f for f in self._files for key in f.keys()}

    def keys(self):
        return list(self._where)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._where[key].get_tensor(key)


def _unpack_zero_rows(zp: torch.Tensor, rows: int) -> torch.Tensor:
    """compressed-tensors' zero points packed along the output dim (int32 ``[ceil(N/8), G]``) -> int8 ``[N, G]``."""
    return rq.unpack_int4(zp.t().contiguous(), rows).t().contiguous()


def _dequantize_linear(parts: dict[str, torch.Tensor], spec: dict, dtype: torch.dtype) -> torch.Tensor:
    """A quantized non-expert linear's tensors -> its float weight ``[N, K]`` in ``dtype``."""
    if spec["format"] == "fp8_block":
        return rq.dequantize_fp8_block(parts["weight"], parts["weight_scale_inv"], spec["block"]).to(dtype)
    if spec["format"] == "fp8_channel":  # weight_scale [1] or [N, 1] broadcasts; the input_scale is dropped
        return rq.dequantize_fp8_channel(parts["weight"], parts["weight_scale"]).to(dtype)
    N, K = (int(v) for v in parts["weight_shape"].tolist())
    zero = parts.get("weight_zero_point")
    zero = None if zero is None else _unpack_zero_rows(zero, N)
    return rq.dequantize_int4(parts["weight_packed"], parts["weight_scale"], zero, spec["group_size"], K).to(dtype)


def _row_scales(p: dict) -> torch.Tensor:
    """A float-quantized linear's weight_scale (``[1]`` per tensor or ``[N, 1]``) as fp32 ``[N, 1]``."""
    return p["weight_scale"].float().reshape(-1, 1).expand(p["weight"].shape[0], 1)


def _expert_tensors(parts: dict, spec: dict) -> tuple[torch.Tensor, ...]:
    """One expert's {proj: {name: tensor}} -> (w13, w2, w13_scale, w2_scale, w13_zero | None, w2_zero | None,
    w13_input_scale | None, w2_input_scale | None)."""
    g, u, d = parts["gate_proj"], parts["up_proj"], parts["down_proj"]
    if spec["format"] == "fp8_block":
        return (torch.cat([g["weight"], u["weight"]]), d["weight"],
                torch.cat([g["weight_scale_inv"], u["weight_scale_inv"]]).float(), d["weight_scale_inv"].float(),
                None, None, None, None)
    if spec["format"] == "fp8_channel":
        a13 = a2 = None
        if spec["static_input"]:  # one input feeds gate and up: one scale (their max, as vLLM)
            a13 = torch.maximum(g["input_scale"].float().reshape(()), u["input_scale"].float().reshape(()))
            a2 = d["input_scale"].float().reshape(())
        return (torch.cat([g["weight"], u["weight"]]), d["weight"], torch.cat([_row_scales(g), _row_scales(u)]),
                _row_scales(d).contiguous(), None, None, a13, a2)
    zero = None
    if not spec["symmetric"]:
        zero = [_unpack_zero_rows(p["weight_zero_point"], int(p["weight_shape"][0])) for p in (g, u, d)]
    return (torch.cat([g["weight_packed"], u["weight_packed"]]), d["weight_packed"],
            torch.cat([g["weight_scale"], u["weight_scale"]]), d["weight_scale"],
            None if zero is None else torch.cat(zero[:2]), None if zero is None else zero[2], None, None)


def build_quantized_experts(per_expert: dict[int, dict], spec: dict, device, load=None) -> QuantizedExperts:
    """{expert index: {proj: {name: tensor, or a key for ``load``}}} (all of 0..E-1) -> a validated container on
    ``device``."""
    E = len(per_expert)
    if sorted(per_expert) != list(range(E)):
        raise ValueError(f"checkpoint experts are not numbered 0..{E - 1}: {sorted(per_expert)[:8]}...")
    if load is not None:
        per_expert = {e: {proj: {name: load(k) for name, k in parts.items()} for proj, parts in projs.items()}
                      for e, projs in per_expert.items()}
    tensors = [_expert_tensors(per_expert[e], spec) for e in range(E)]
    stacked = [None if col[0] is None else torch.stack(col).to(device).contiguous() for col in zip(*tensors)]
    if spec["format"] == "fp8_block":
        return QuantizedExperts.fp8_block(*stacked[:4], block=spec["block"])
    if spec["format"] == "fp8_channel":
        return QuantizedExperts.fp8_channel(*stacked[:4], stacked[6], stacked[7],
                                            dynamic_scale=spec.get("dynamic_scale", "per_token"))
    return QuantizedExperts.int4(*stacked[:4], group_size=spec["group_size"], w13_zero=stacked[4],
                                 w2_zero=stacked[5], symmetric=spec["symmetric"])


# --- the experts module -------------------------------------------------------------------------------------------


# Floating tensors of the format (e4m3 weights, fp32 scales) are held as integer views of the same width: a module
# dtype cast (``model.to(torch.bfloat16)``, ``.half()``) converts floating buffers only, so the format's dtypes
# survive it as the packed int32 weights do; ``.to(device)`` still moves them.
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def attach_quantized_experts(module: torch.nn.Module, q: QuantizedExperts) -> None:
    """Give a transformers experts module quantized weights: buffers ``quant_w13`` ... (moved by ``.to()``, never
    cast by a dtype change: floating ones are stored as their bits) and the format facts; its float ``gate_up_proj``
    / ``down_proj`` become None."""
    dtypes = {}
    for name in _BUFFERS:
        t = getattr(q, name)
        if t is not None and t.is_floating_point():
            dtypes[name], t = t.dtype, t.view(_BITS[t.element_size()])
        module.register_buffer(f"quant_{name}", t, persistent=False)
    module._quantized_experts_facts = {"format": q.format, "block": q.block, "group_size": q.group_size,
                                       "symmetric": q.symmetric, "dynamic_scale": q.dynamic_scale, "dtypes": dtypes}
    for name in ("gate_up_proj", "down_proj"):
        if name in module._parameters:
            module._parameters[name] = None


def quantized_experts(module: torch.nn.Module) -> QuantizedExperts | None:
    """The :class:`QuantizedExperts` of an experts module given them by :func:`attach_quantized_experts`, else None."""
    facts = module.__dict__.get("_quantized_experts_facts")
    if facts is None:
        return None
    tensors = {name: getattr(module, f"quant_{name}") for name in _BUFFERS}
    tensors.update({name: tensors[name].view(dtype) for name, dtype in facts["dtypes"].items()})
    return QuantizedExperts(facts["format"], **tensors, block=facts["block"], group_size=facts["group_size"],
                            symmetric=facts["symmetric"], dynamic_scale=facts.get("dynamic_scale", "per_token"))
    # (input scales: None buffers unless static fp8; facts pickled before dynamic_scale existed: per token)


# --- the model ----------------------------------------------------------------------------------------------------


def _renamer(model):
    """checkpoint key -> model key, with transformers' own renamings for this model (identity if unavailable)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:  # pragma: no cover - other transformers versions
        return lambda key: key
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    meta = dict.fromkeys(model.state_dict(), True)
    return lambda key: rename_source_key(key, renamings, [], model.base_model_prefix, meta)[0]


def _text_configs(config):
    """The text configs whose experts a checkpoint may quantize (thinker, talker)."""
    out = []
    for part in ("thinker_config", "talker_config"):
        sub = getattr(config, part, None)
        text = getattr(sub, "text_config", None) if sub is not None else None
        if text is not None and hasattr(text, "moe_intermediate_size"):
            out.append(text)
    return out


def load_quantized(path: str, config, spec: dict, *, dtype: torch.dtype, device: torch.device):
    """A ``Qwen3OmniMoeForConditionalGeneration`` from a quantized checkpoint (see the module docstring)."""
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as q3

    from ..integrations.transformers import EXPERTS_NAME, register_transformers

    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the quantized tensors are handled here, not by a transformers quantizer
    texts = _text_configs(config)
    widths = [t.moe_intermediate_size for t in texts]
    try:
        for t in texts:
            t.moe_intermediate_size = 0  # experts built with zero-size float weights: nothing allocated
        with torch.device(device):
            model = q3.Qwen3OmniMoeForConditionalGeneration._from_config(config, dtype=dtype)
    finally:
        for t, w in zip(texts, widths):
            t.moe_intermediate_size = w
    rename = _renamer(model)
    experts: dict[str, dict[int, dict]] = {}
    linears: dict[str, dict[str, str]] = {}
    plain: dict[str, str] = {}
    ckpt = _Checkpoint(path)
    for key in ckpt.keys():  # sorted into groups by key; tensors are read where they are used
        m = _EXPERT_KEY.match(key)
        if m:
            per = experts.setdefault(m["module"], {}).setdefault(int(m["e"]), {})
            per.setdefault(m["proj"], {})[m["name"]] = key
        elif key.rsplit(".", 1)[-1] in _QUANT_SUFFIXES:
            linears.setdefault(key.rsplit(".", 1)[0], {})[key.rsplit(".", 1)[1]] = key
        else:
            plain[key] = key
    for prefix, parts in linears.items():  # an fp8 linear's e4m3 weight sits next to its weight_scale_inv
        if prefix + ".weight" in plain:
            parts["weight"] = plain.pop(prefix + ".weight")
    state = {rename(k): ckpt[k] for k in plain}
    for prefix, parts in linears.items():
        state[rename(prefix + ".weight")] = _dequantize_linear({n: ckpt[k] for n, k in parts.items()}, spec, dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    expert_modules = {}
    for ckpt_prefix, per_expert in experts.items():
        name = rename(ckpt_prefix + ".gate_up_proj").rsplit(".", 1)[0]
        expert_modules[name] = model.get_submodule(name)
        attach_quantized_experts(expert_modules[name],
                                 build_quantized_experts(per_expert, spec, device, load=ckpt.__getitem__))
    float_experts = {n for n in expert_modules for n in (n + ".gate_up_proj", n + ".down_proj")}
    missing = [k for k in missing if k not in float_experts]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: missing {missing[:8]}, unexpected "
                         f"{unexpected[:8]}")
    empty = [n for n, mod in model.named_modules() if type(mod).__name__.endswith("Experts")
             and n not in expert_modules]
    if empty:
        raise ValueError(f"checkpoint {path} has no quantized experts for {empty[:4]}")
    register_transformers()
    for t in texts:
        t._experts_implementation = EXPERTS_NAME  # the experts run only through omni-fast's fused MoE
    model._quantization_spec = dict(spec)  # (not _omni_fast_*: unpatch drops those)
    for module in model.modules():  # the model and its parts (thinker, talker) that hold quantized experts
        if callable(getattr(module, "save_pretrained", None)) and any(
                "_quantized_experts_facts" in m.__dict__ for m in module.modules()):
            module.save_pretrained = BoundMethod(_refuse_save_pretrained, module)
    return model.eval()


def _refuse_save_pretrained(self, *args, **kwargs):
    """transformers' ``save_pretrained`` writes the state dict, which has no quantized experts (they are
    non-persistent buffers in omni-fast's layout): it would write a checkpoint without expert weights, silently."""
    fmt = next(m.__dict__["_quantized_experts_facts"]["format"] for m in self.modules()
               if "_quantized_experts_facts" in m.__dict__)
    raise ValueError(f"save_pretrained: this {type(self).__name__} holds omni-fast quantized experts ({fmt}, loaded "
                     "by Qwen3Omni.from_pretrained) that transformers' save_pretrained cannot write (the checkpoint "
                     "would have no expert weights); keep the quantized checkpoint directory it was loaded from")


def read_quantization_config(path: str) -> dict | None:
    """``quantization_config`` of ``path/config.json`` parsed (:func:`parse_quantization_config`), or None."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        return None
    try:
        with open(cfg_file) as f:
            qcfg = json.load(f).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None  # unreadable: the strict loader reports it, naming the file (models.checkpoint)
    return None if qcfg is None else parse_quantization_config(qcfg)
