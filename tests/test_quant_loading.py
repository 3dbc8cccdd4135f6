"""Quantized Qwen3-Omni checkpoints (FP8 block, compressed-tensors W4A16): tiny random checkpoints written here in
the published layout (config.json with its quantization_config; per-expert safetensors keys), loaded with
``Qwen3Omni.from_pretrained``; the experts stay quantized and run through omni-fast's fused MoE."""

import json

import pytest
import torch

import omni_fast
from omni_fast.models import Qwen3Omni, tiny_qwen3_omni_config
from omni_fast.models.quantized import parse_quantization_config, quantized_experts
from omni_fast.reference import moe_quant as rq
from omni_fast.testing import seeded_weights_

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme  # noqa: E402

FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
GROUP = 16


def _int4_config(symmetric: bool) -> dict:
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=GROUP))
    cfg = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                             quantization_status="compressed", ignore=["lm_head"])
    return cfg.model_dump(mode="json")


def _fp8_ct_config(strategy: str, static: bool, act_strategy: str | None = None) -> dict:
    """compressed-tensors float-quantized: llm-compressor's FP8_DYNAMIC (channel weights, dynamic per-token
    activations) or FP8 (per-tensor weights, static per-tensor activations) scheme; ``act_strategy`` "tensor" with
    ``static`` False: dynamic per-tensor activations."""
    acts = QuantizationArgs(num_bits=8, type="float", symmetric=True,
                            strategy=act_strategy or ("tensor" if static else "token"), dynamic=not static)
    scheme = QuantizationScheme(targets=["Linear"], input_activations=acts, weights=QuantizationArgs(
        num_bits=8, type="float", symmetric=True, strategy=strategy, dynamic=False))
    cfg = QuantizationConfig(config_groups={"group_0": scheme}, format="float-quantized",
                             quantization_status="compressed", ignore=["lm_head"])
    return cfg.model_dump(mode="json")


# test names -> (weight strategy, static input[, activation strategy]); fp8td: dynamic per-tensor activations
FP8C = {"fp8c": ("channel", False), "fp8t": ("tensor", True), "fp8td": ("channel", False, "tensor")}
INPUT_SCALE = 0.01  # a static activation scale (the same for gate_proj and up_proj: one input, as observed)


def _float_checkpoint(tmp_path):
    """A tiny float Qwen3-Omni saved by transformers (its published key layout); experts 32 wide so that W4A16
    groups of 16 divide both GEMMs' K."""
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as q3

    config = tiny_qwen3_omni_config()
    config.thinker_config.text_config.moe_intermediate_size = 32
    config.talker_config.text_config.moe_intermediate_size = 32
    model = seeded_weights_(q3.Qwen3OmniMoeForConditionalGeneration._from_config(config, dtype=torch.float32))
    model.save_pretrained(tmp_path / "float")
    return model, tmp_path / "float"


def _quantize_checkpoint(src, dst, fmt: str, symmetric: bool = True):
    """Rewrite a float checkpoint's expert linears (and non-expert linears: the thinker's q_proj, for fp8 the
    talker's shared expert) in ``fmt``'s tensors, and its config with the quantization_config."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = FP8_CONFIG if fmt == "fp8" else _fp8_ct_config(*FP8C[fmt]) if fmt in FP8C else \
        _int4_config(symmetric)
    (dst / "config.json").write_text(json.dumps(cfg))
    out = {}
    for key, t in load_file(src / "model.safetensors").items():
        quantize = ".mlp.experts." in key or (key.startswith("thinker.model.layers.") and "q_proj.weight" in key) \
            or (fmt != "int4" and ".mlp.shared_expert." in key)  # the talker's shared expert, FP8 as published
        if not quantize:
            out[key] = t
            continue
        prefix = key[:-len("weight")]
        if fmt == "fp8":
            out[key], out[prefix + "weight_scale_inv"] = rq.quantize_fp8_block(t, (128, 128))
        elif fmt in FP8C:  # compressed-tensors' names and shapes: weight_scale [N, 1] / [1], input_scale [1]
            strategy, static = FP8C[fmt][:2]
            out[key], scale = rq.quantize_fp8_channel(t, per_tensor=strategy == "tensor")
            out[prefix + "weight_scale"] = scale.reshape(-1, 1) if strategy == "channel" else scale.reshape(1)
            if static:
                out[prefix + "input_scale"] = torch.tensor([INPUT_SCALE])
        else:
            packed, scale, zero = rq.quantize_int4(t, GROUP, symmetric, torch.bfloat16)
            out[prefix + "weight_packed"], out[prefix + "weight_scale"] = packed, scale
            out[prefix + "weight_shape"] = torch.tensor(list(t.shape))
            if zero is not None:
                out[prefix + "weight_zero_point"] = pack_to_int32(zero, 4, packed_dim=0)
    save_file(out, dst / "model.safetensors")


def _thinker_logits(model, ids):
    with torch.no_grad():
        return model.thinker(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


_FORMAT_OF = {"fp8": "fp8_block", "int4": "int4_w4a16", "fp8c": "fp8_channel", "fp8t": "fp8_channel",
              "fp8td": "fp8_channel"}


@pytest.mark.parametrize("fmt,symmetric", [("fp8", True), ("int4", True), ("int4", False), ("fp8c", True),
                                           ("fp8t", True), ("fp8td", True)])
def test_quantized_checkpoint_loads_and_runs(tmp_path, fmt, symmetric):
    float_model, float_dir = _float_checkpoint(tmp_path)
    qdir = tmp_path / "quant"
    _quantize_checkpoint(float_dir, qdir, fmt, symmetric)
    omni = Qwen3Omni.from_pretrained(qdir, dtype=torch.float32, device="cpu", backend="triton")
    model = omni.model
    experts = [(n, m) for n, m in model.named_modules() if type(m).__name__.endswith("Experts")]
    assert len(experts) == 4  # thinker and talker, 2 layers each
    for name, module in experts:
        q = quantized_experts(module)
        assert q is not None and q.format == _FORMAT_OF[fmt], name
        assert q.static_input == (fmt == "fp8t"), name
        assert q.dynamic_scale == ("per_tensor" if fmt == "fp8td" else "per_token"), name
        assert module.gate_up_proj is None and module.down_proj is None  # no float copy of the experts
        assert q.symmetric == symmetric and q.num_experts == 8 and q.intermediate_size == 32
    assert not any(".experts." in n for n, _ in model.named_parameters())
    # The containers hold exactly the checkpoint's quantization of the float experts.
    fl = dict(float_model.named_modules())
    module_name, module = experts[0]
    extra = {}
    if fmt in FP8C:
        extra = dict(per_tensor=FP8C[fmt][0] == "tensor")
        if FP8C[fmt][1]:
            extra["input_scales"] = (torch.full((8,), INPUT_SCALE), torch.full((8,), INPUT_SCALE))
        if fmt == "fp8td":
            extra["dynamic_scale"] = "per_tensor"
    else:
        extra = dict(group_size=GROUP, symmetric=symmetric, scale_dtype=torch.bfloat16)
    ref = rq.quantize_experts(fl[module_name].gate_up_proj.detach(), fl[module_name].down_proj.detach(),
                              _FORMAT_OF[fmt], **extra)
    got = quantized_experts(module)
    for t in ("w13", "w2", "w13_scale", "w2_scale", "w13_zero", "w2_zero", "w13_input_scale", "w2_input_scale"):
        a, b = getattr(got, t), getattr(ref, t)
        assert (a is None) == (b is None), t
        if a is not None:
            assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                               b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b), t
    # Quantized non-expert linears are dequantized into the model dtype (within e4m3 / int4 rounding).
    fparams = dict(float_model.named_parameters())
    for name, p in model.named_parameters():
        if name.endswith("q_proj.weight") or ".shared_expert." in name:
            err = (p - fparams[name]).abs().max().item()
            assert err <= (0.1 if fmt == "int4" else 0.05) * fparams[name].abs().max().item(), name
    # Patched (the omni_fast experts function) vs the float model with the dequantized weights.
    ids = torch.randint(0, 100, (1, 7))
    got_logits = _thinker_logits(model, ids)
    expected = _dequantized_float_model(float_model, model)
    want = _thinker_logits(expected, ids) if fmt == "int4" else None
    if want is not None:  # W4A16: weights-only, fp32 activations: the float model with dequantized weights
        torch.testing.assert_close(got_logits, want, rtol=1e-4, atol=1e-4)
    # Through the reference backend (dequantize + per-token-group activation fake-quant for fp8): same logits.
    omni_fast.patch(model, backend="reference")
    torch.testing.assert_close(_thinker_logits(model, ids), got_logits, rtol=1e-4, atol=1e-4)
    # Unpatched, the quantized experts still run through omni-fast (transformers' eager loop cannot run them).
    omni_fast.unpatch(model)
    torch.testing.assert_close(_thinker_logits(model, ids), got_logits, rtol=1e-4, atol=1e-4)


def _dequantized_float_model(float_model, qmodel):
    """A copy of the float model with the quantized model's weights dequantized (experts, q_proj)."""
    import copy

    model = copy.deepcopy(float_model)
    with torch.no_grad():
        qmods = dict(qmodel.named_modules())
        for name, module in model.named_modules():
            q = quantized_experts(qmods[name]) if name in qmods else None
            if q is not None:
                w13, w2 = rq.dequantize_experts(q)
                module.gate_up_proj.copy_(w13)
                module.down_proj.copy_(w2)
        qparams = dict(qmodel.named_parameters())
        for name, p in model.named_parameters():
            if name.endswith("q_proj.weight"):  # the thinker's were quantized (the others are equal anyway)
                p.copy_(qparams[name])
    return model


def test_unsupported_quantization_configs_name_the_method(tmp_path):
    with pytest.raises(ValueError, match="quant_method 'awq' is not supported"):
        parse_quantization_config({"quant_method": "awq", "bits": 4})
    with pytest.raises(ValueError, match="quant_method 'fp8'.*activation_scheme='static'"):
        parse_quantization_config(dict(FP8_CONFIG, activation_scheme="static"))
    with pytest.raises(ValueError, match="quant_method 'fp8'.*weight_block_size=None"):
        parse_quantization_config({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"})
    fp8_ct = _int4_config(True)
    fp8_ct["format"] = "float-quantized"
    for group in fp8_ct["config_groups"].values():
        group["weights"].update(num_bits=8, type="float", strategy="channel", group_size=None)
        group["format"] = "float-quantized"
    with pytest.raises(ValueError, match="compressed-tensors.*format 'float-quantized'"):
        parse_quantization_config(fp8_ct)
    assert parse_quantization_config(_int4_config(False)) == {"format": "int4_w4a16", "group_size": GROUP,
                                                              "symmetric": False}
    # from_pretrained refuses before building anything
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_omni_moe",
                                                      "quantization_config": {"quant_method": "gptq", "bits": 4}}))
    with pytest.raises(ValueError, match="quant_method 'gptq'"):
        Qwen3Omni.from_pretrained(tmp_path)


def test_save_pretrained_of_quantized_model_refused(tmp_path):
    """transformers' save_pretrained cannot write omni-fast's quantized experts (non-persistent buffers): it wrote a
    checkpoint with no expert weights at all, silently. The model and its parts refuse, naming the format, and
    write nothing; the model still runs."""
    _, float_dir = _float_checkpoint(tmp_path)
    _quantize_checkpoint(float_dir, tmp_path / "quant", "int4", symmetric=True)
    omni = Qwen3Omni.from_pretrained(tmp_path / "quant", dtype=torch.float32, device="cpu", backend="reference")
    for name, module in (("model", omni.model), ("thinker", omni.model.thinker), ("talker", omni.model.talker)):
        with pytest.raises(ValueError, match="save_pretrained.*quantized experts.*int4_w4a16"):
            module.save_pretrained(tmp_path / name)
        assert not (tmp_path / name).exists(), name
    omni_fast.unpatch(omni.model)
    with pytest.raises(ValueError, match="save_pretrained.*quantized experts"):
        omni.model.save_pretrained(tmp_path / "unpatched")
    ids = torch.tensor([[5, 6, 7]])
    assert torch.isfinite(_thinker_logits(omni.model, ids)).all()


@pytest.mark.parametrize("fmt", ["fp8", "fp8t"])
def test_dtype_cast_keeps_the_quantized_format(tmp_path, fmt):
    """``model.to(torch.bfloat16)`` / ``.float()`` (the usual step before inference) cast the e4m3 weights and the
    fp32 scales with the rest of the model (they were float buffers): the forward then refused them (TypeError
    naming w13). The quantized tensors keep their format; the model runs in the new dtype."""
    _, float_dir = _float_checkpoint(tmp_path)
    _quantize_checkpoint(float_dir, tmp_path / "quant", fmt)
    omni = Qwen3Omni.from_pretrained(tmp_path / "quant", dtype=torch.float32, device="cpu", backend="reference")
    model = omni.model
    ids = torch.tensor([[5, 6, 7, 8]])
    want = _thinker_logits(model, ids)
    before = {n: quantized_experts(m) for n, m in model.named_modules() if quantized_experts(m) is not None}
    model.to(torch.bfloat16)
    got = _thinker_logits(model, ids).float()
    torch.testing.assert_close(got, want, atol=0.1 * want.abs().max().item(), rtol=0)
    model.float()
    for name, q in before.items():
        now = quantized_experts(model.get_submodule(name))
        for field in ("w13", "w2", "w13_scale", "w2_scale", "w13_input_scale", "w2_input_scale"):
            a, b = getattr(q, field), getattr(now, field)
            assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a.view(-1).float(),
                                                                                    b.view(-1).float())), field
    assert torch.isfinite(_thinker_logits(model, ids)).all()  # (the float weights went through bf16: not equal)


def test_from_pretrained_dtype_forms(tmp_path):
    """dtype as transformers takes it (a torch.dtype, a name, "auto" = the config's dtype) for float and quantized
    checkpoints alike (the quantized path crashed on names: 'Invalid device string'); anything else an error naming
    dtype before loading."""
    _, float_dir = _float_checkpoint(tmp_path)
    _quantize_checkpoint(float_dir, tmp_path / "quant", "fp8")
    for path in (float_dir, tmp_path / "quant"):
        for dtype, want in (("bfloat16", torch.bfloat16), ("auto", torch.float32), (torch.float16, torch.float16)):
            model = Qwen3Omni.from_pretrained(path, dtype=dtype, device="cpu", patch=False).model
            assert model.thinker.lm_head.weight.dtype == want, (path, dtype)
        for dtype, exc in (("int8", ValueError), (torch.int8, ValueError), ("bf16", ValueError), (5, TypeError)):
            with pytest.raises(exc, match="dtype"):
                Qwen3Omni.from_pretrained(path, dtype=dtype, device="cpu", patch=False)


@pytest.mark.parametrize("qcfg,exc,match", [
    ("fp8", TypeError, "quantization_config must be a JSON object.*str"),
    (["fp8"], TypeError, "quantization_config must be a JSON object.*list"),
    (dict(FP8_CONFIG, weight_block_size=128), ValueError, "weight_block_size=128"),
    (dict(FP8_CONFIG, weight_block_size=[128, 0]), ValueError, r"weight_block_size=\[128, 0\]"),
    (dict(FP8_CONFIG, weight_block_size=["a", "b"]), ValueError, "weight_block_size"),
])
def test_malformed_quantization_configs_name_the_setting(qcfg, exc, match):
    """A quantization_config that is not an object, or an fp8 weight_block_size that is not two positive
    integers: a TypeError / ValueError naming the setting (was an AttributeError / a bare int() or len() error)."""
    with pytest.raises(exc, match=match):
        parse_quantization_config(qcfg)


def test_quantized_checkpoint_generates_text_and_audio(tmp_path, monkeypatch):
    """The whole pipeline on a W4A16 checkpoint: thinker and talker decode (MoeTextDecoder) on the quantized
    experts; greedy tokens as transformers' generate of the same (patched) model. The vocoder (Code2Wav) runs on the
    reference backend here: a checkpoint quantizes experts only, its Triton kernels are tests/test_code2wav*.py's,
    and under the interpreter they were ~70 % of this test's time (run twice in CI: the suite and the compat part)."""
    from omni_fast.models import Code2Wav, Request

    on_triton = Code2Wav.from_transformers
    monkeypatch.setattr(Code2Wav, "from_transformers",
                        lambda module, **kw: on_triton(module, **{**kw, "backend": "reference"}))
    _, float_dir = _float_checkpoint(tmp_path)
    _quantize_checkpoint(float_dir, tmp_path / "quant", "int4", symmetric=False)
    omni = Qwen3Omni.from_pretrained(tmp_path / "quant", dtype=torch.float32, device="cpu", backend="triton")
    out = omni.generate(Request(text=[5, 6, 7, 8, 9]), max_new_tokens=4, talker_max_new_tokens=4,
                        graph_decode=True)[0]  # decode steps on MoeTextDecoder (no graph on a CPU)
    assert len(out["token_ids"]) >= 1 and out["audio"].numel() > 0
    ids = torch.tensor([omni.build_prompt(Request(text=[5, 6, 7, 8, 9]), 0, 0, 0)])
    with torch.no_grad():
        text = omni.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), thinker_max_new_tokens=4,
                                   thinker_do_sample=False, talker_max_new_tokens=4, talker_do_sample=False,
                                   talker_repetition_penalty=1.0, return_audio=False)
    text = text[0] if isinstance(text, tuple) else text
    assert out["token_ids"] == text[0, ids.shape[1]:].tolist()[:len(out["token_ids"])]
