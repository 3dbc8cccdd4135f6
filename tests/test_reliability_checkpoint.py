"""Strict checkpoint loading (issue 17, part 2): a tiny saved random transformers checkpoint, corrupted one way per
test, must raise at load with the shard file or the config setting (and the file) named."""

import json
import os
import shutil

import pytest
import torch

from omni_fast.models import Qwen25Omni, Qwen3Omni

safetensors_torch = pytest.importorskip("safetensors.torch")

INDEX = "model.safetensors.index.json"
KEY = "talker.model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny random Qwen3-Omni checkpoint in several shards, and its index's weight map."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    Qwen3Omni.random("tiny", patch=False).model.save_pretrained(path, max_shard_size="200KB")
    with open(path / INDEX) as f:
        return path, json.load(f)["weight_map"]


@pytest.fixture
def copy(saved, tmp_path):
    """A fresh copy of the checkpoint to corrupt; returns (path, weight_map)."""
    src, weight_map = saved
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst, weight_map


def _edit_shard(path, weight_map, key, fn):
    shard = path / weight_map[key]
    sd = safetensors_torch.load_file(shard)
    fn(sd)
    safetensors_torch.save_file(sd, shard, metadata={"format": "pt"})
    return weight_map[key]


def _edit_config(path, fn):
    with open(path / "config.json") as f:
        cfg = json.load(f)
    fn(cfg)
    with open(path / "config.json", "w") as f:
        json.dump(cfg, f)


def _load(path, **kw):
    return Qwen3Omni.from_pretrained(path, device="cpu", patch=False, **kw)


def test_clean_checkpoint_loads(saved):
    pipe = _load(saved[0])
    assert pipe.model.config.thinker_config.text_config.num_hidden_layers == 2


def test_missing_tensor_raises_naming_it(copy):
    path, wm = copy
    _edit_shard(path, wm, KEY, lambda sd: sd.pop(KEY))
    with pytest.raises(ValueError, match=f"{KEY} \\(listed for {wm[KEY]}"):  # listed in the index for that shard
        _load(path)


def test_missing_tensor_without_index_entry_raises(copy):
    path, wm = copy
    _edit_shard(path, wm, KEY, lambda sd: sd.pop(KEY))
    index = json.loads((path / INDEX).read_text())
    del index["weight_map"][KEY]
    (path / INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"{KEY}: missing"):
        _load(path)


def test_missing_expert_tensor_raises_naming_it(copy):
    path, wm = copy
    key = next(k for k in wm if "experts.1.up_proj" in k)
    _edit_shard(path, wm, key, lambda sd: sd.pop(key))
    index = json.loads((path / INDEX).read_text())
    del index["weight_map"][key]
    (path / INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"experts\.1\.up_proj\.weight: missing"):
        _load(path)


def test_missing_shard_raises_naming_it(copy):
    path, wm = copy
    os.remove(path / wm[KEY])
    with pytest.raises(FileNotFoundError, match=wm[KEY]):
        _load(path)


def test_truncated_shard_raises_naming_it(copy):
    path, wm = copy
    shard = path / wm[KEY]
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    with pytest.raises(ValueError, match=f"{wm[KEY]}.*truncated"):
        _load(path)


def test_integer_dtype_raises(copy):
    path, wm = copy
    _edit_shard(path, wm, KEY, lambda sd: sd.__setitem__(KEY, sd[KEY].to(torch.int32)))
    with pytest.raises(ValueError, match=f"{KEY} in {wm[KEY]}: stored as I32"):
        _load(path)


def test_wrong_shape_raises(copy):
    path, wm = copy
    _edit_shard(path, wm, KEY, lambda sd: sd.__setitem__(KEY, sd[KEY][:-1].contiguous()))
    with pytest.raises(ValueError, match=f"{KEY} in {wm[KEY]}: shape"):
        _load(path)


def test_unexpected_tensor_raises(copy):
    path, wm = copy
    _edit_shard(path, wm, KEY, lambda sd: sd.__setitem__("thinker.bogus.weight", torch.zeros(2)))
    with pytest.raises(ValueError, match=f"thinker.bogus.weight in {wm[KEY]}: unexpected"):
        _load(path)


def test_layer_count_mismatch_raises_listing_all(copy):
    path, _ = copy
    _edit_config(path, lambda c: c["thinker_config"]["text_config"].__setitem__("num_hidden_layers", 3))
    with pytest.raises(ValueError, match=r"layers\.2\..*missing") as err:
        _load(path)
    assert "problem(s)" in str(err.value)  # one error for all of them


def test_fewer_layers_in_config_raises(copy):
    path, _ = copy
    _edit_config(path, lambda c: c["thinker_config"]["text_config"].__setitem__("num_hidden_layers", 1))
    with pytest.raises(ValueError, match=r"layers\.1\..*unexpected"):
        _load(path)


def test_not_strict_loads_anyway(copy):
    path, wm = copy
    _edit_shard(path, wm, KEY, lambda sd: sd.__setitem__("thinker.bogus.weight", torch.zeros(2)))
    _load(path, strict=False)


@pytest.mark.parametrize("where, setting, value, rule", [
    (("code2wav_config",), "sliding_window", 0, "positive integer"),
    (("talker_config",), "num_code_groups", 1, "at least 2"),
    (("thinker_config", "text_config"), "num_experts_per_tok", 9, "<= the number of experts"),
    (("code2wav_config",), "upsample_rates", [], "non-empty list"),
    (("thinker_config", "text_config"), "vocab_size", -5, "positive integer"),
    (("talker_config", "code_predictor_config"), "num_key_value_heads", 3, "divisor"),
])
def test_bad_config_names_setting_and_file(copy, where, setting, value, rule):
    path, _ = copy

    def set_(cfg):
        for w in where:
            cfg = cfg[w]
        cfg[setting] = value

    _edit_config(path, set_)
    dotted = ".".join(where + (setting,)).replace(".", r"\.")
    with pytest.raises(ValueError, match=rf"config\.json: {dotted} must be .*{rule}"):
        _load(path)


def test_missing_config_names_the_file(copy):
    path, _ = copy
    os.remove(path / "config.json")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        _load(path)


@pytest.mark.parametrize("model_type,hint", [("qwen2_5_omni", "Qwen25Omni.from_pretrained"), ("llama", "qwen3_omni_moe")])
def test_other_model_type_refused_naming_it(copy, model_type, hint):
    """A checkpoint of another model (a Qwen2.5-Omni one read as Qwen3-Omni failed with an AttributeError deep in
    transformers' model construction) is refused up front, naming the file, its model_type and what to use."""
    path, _ = copy
    _edit_config(path, lambda cfg: cfg.update(model_type=model_type))
    with pytest.raises(ValueError, match=rf"config\.json: model_type '{model_type}'.*{hint}"):
        _load(path)


@pytest.mark.parametrize("device,exc,match", [
    ("gpu", ValueError, "device must be a torch device.*'gpu'"),
    (1.5, TypeError, "device must be a torch device.*float"),
    pytest.param("cuda", ValueError, "device 'cuda'.*CUDA is not available", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="CUDA is available here")),
    # the CUDA index 0 (torch.device(0) is the accelerator's device 0; a CPU-only torch refuses to parse it):
    # Qwen25Omni.random read it as no device and built on the CPU
    pytest.param(0, ValueError, r"device (0: CUDA is not available|must be a torch device.*got 0)",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
])
def test_bad_device_refused_before_loading(saved, device, exc, match, monkeypatch):
    """A device that does not parse, or CUDA where there is none: an error naming device before any weight is read
    (was torch's RuntimeError, or an AssertionError 'Torch not compiled with CUDA' after the whole load)."""
    from omni_fast.models import checkpoint

    monkeypatch.setattr(checkpoint, "scan_shards", lambda *a: pytest.fail("weights read before the device check"))
    with pytest.raises(exc, match=match):
        Qwen3Omni.from_pretrained(saved[0], device=device, patch=False)
    with pytest.raises(exc, match=match):
        Qwen3Omni.random("tiny", device=device, patch=False)
    with pytest.raises(exc, match=match):
        Qwen25Omni.random(device=device, patch=False)


@pytest.mark.parametrize("load", [Qwen3Omni.from_pretrained, Qwen25Omni.from_pretrained])
@pytest.mark.parametrize("path", [None, 3, ["ckpt"]])
def test_path_that_is_not_a_path_names_it(load, path):
    """path must be a str / os.PathLike: was os.stat's TypeError, or for an int a file-descriptor lookup."""
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        load(path, device="cpu")


@pytest.mark.parametrize("flag", ["strict", "check_finite"])
def test_flags_must_be_bools(saved, flag):
    """strict="no" was read as True (bool of a non-empty string): flags take bools only."""
    with pytest.raises(TypeError, match=f"{flag} must be a bool"):
        Qwen3Omni.from_pretrained(saved[0], device="cpu", patch=False, **{flag: "no"})


def test_unparsable_config_names_the_file(copy):
    path, _ = copy
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: not readable JSON"):
        _load(path)


def test_nan_code2wav_weights_refused_at_load(copy):
    path, wm = copy
    key = next(k for k in wm if k.startswith("code2wav.decoder") and k.endswith("conv.weight"))
    _edit_shard(path, wm, key, lambda sd: sd[key].view(-1)[0].fill_(float("nan")))
    with pytest.raises(ValueError, match=f"non-finite.*{key}"):
        _load(path)
    _load(path, check_finite=False)  # the documented opt-out
