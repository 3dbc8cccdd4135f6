"""Tuned launch configs for the quantized fused MoE: the format's tag in vLLM's spelling keys the same file lookup as
the bf16 configs (``omni_fast.kernels.moe_gemm.get_config``; ``configs/moe/E=..,N=..,dtype=<tag>,device=..,
triton=...json``), untuned starting points only with OMNI_FAST_MOE_STARTING_CONFIGS=1, never the bf16 files; and
the kernel run with a looked-up config computes the reference result on the interpreter."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
import triton

sys.path.insert(0, os.path.dirname(__file__))
from test_moe_quant import _assert_matches, _experts, _ids  # noqa: E402

from omni_fast.kernels import launch, moe_gemm  # noqa: E402
from omni_fast.kernels import moe_gemm_quant as mq  # noqa: E402
from omni_fast.reference import moe_quant as rq  # noqa: E402
from omni_fast.testing import DEVICE  # noqa: E402

E, H, INTER, K_TOP = 4, 96, 64, 2
FORMATS = [("fp8_block", dict(block=(16, 32)), "fp8_w8a8,block_shape=[16,32]"),
           ("fp8_channel", dict(), "fp8_w8a8"),
           ("int4_w4a16", dict(group_size=32, symmetric=False), "int4_w4a16")]
# a tuned table unlike the heuristic: 32-row tiles, 32-wide N, 4 warps, 2 stages (down: N 16)
TUNED = dict(BLOCK_SIZE_M=32, BLOCK_SIZE_N=32, BLOCK_SIZE_K=64, GROUP_SIZE_M=1, num_warps=4, num_stages=2,
             down=dict(BLOCK_SIZE_N=16, BLOCK_SIZE_K=32, num_warps=4, num_stages=2))


@pytest.mark.parametrize("fmt,kw,key", FORMATS)
def test_config_key_is_vllms_spelling(fmt, kw, key):
    assert mq.config_key(_experts(fmt, kw, E, H, INTER)) == key
    stem = moe_gemm.config_file_stem(128, 768, key, None, "3.6.0")
    assert stem == f"E=128,N=768,dtype={key},device=cpu,triton=3.6.0"
    assert moe_gemm.config_file_stem(128, 768, torch.bfloat16, None, "3.6.0") == \
        "E=128,N=768,dtype=bf16,device=cpu,triton=3.6.0"  # the bf16 files keep their names


@pytest.fixture
def on_gpu(monkeypatch, tmp_path):
    """get_config as on a CUDA device "NVIDIA H100 80GB HBM3" under Triton 3.6.0, with the config files in a
    temporary folder (returned): no GPU needed."""
    monkeypatch.setattr(moe_gemm, "interpreting", lambda: False)
    monkeypatch.setattr(moe_gemm, "device_name", lambda device=None: "NVIDIA_H100_80GB_HBM3")
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(launch, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(moe_gemm, "CONFIG_DIR", tmp_path)
    (tmp_path / moe_gemm.CONFIG_FAMILY).mkdir()
    moe_gemm._find_tuned.cache_clear()
    launch._load_config_file.cache_clear()
    yield tmp_path / moe_gemm.CONFIG_FAMILY
    moe_gemm._find_tuned.cache_clear()
    launch._load_config_file.cache_clear()


def _write(folder, dtype_tag, table, version="3.6.0"):
    name = f"E={E},N={INTER},dtype={dtype_tag},device=NVIDIA_H100_80GB_HBM3,triton={version}.json"
    (folder / name).write_text(json.dumps(table))


def _get(key, T=8):
    return moe_gemm.get_config(T, E, K_TOP, H, INTER, key, torch.device("cuda", 0))


def _heuristic(T=8):
    return moe_gemm.default_config(T, E, K_TOP, H, INTER, torch.bfloat16)


@pytest.mark.parametrize("fmt,kw,key", FORMATS)
def test_lookup_finds_the_formats_file(on_gpu, fmt, kw, key):
    _write(on_gpu, key, {"1": _heuristic(1), "16": TUNED})
    assert _get(key, T=12) == TUNED and _get(key, T=1) == _heuristic(1)
    for other_fmt, _, other in FORMATS:  # another format's file is not used
        if other != key:
            assert _get(other) == _heuristic()


def test_quantized_lookup_never_takes_the_bf16_file(on_gpu):
    _write(on_gpu, "bf16", {"8": TUNED})
    assert _get(torch.bfloat16) == TUNED
    assert all(_get(key) == _heuristic() for _, _, key in FORMATS)


def test_untuned_starting_points_need_the_switch(on_gpu, fast_path):
    """The bf16 files' switch (the ``moe_starting_configs`` fast path, OMNI_FAST_MOE_STARTING_CONFIGS=1)."""
    key = FORMATS[0][2]
    _write(on_gpu, key, {"provenance": "UNTUNED starting point: test", "8": TUNED})
    fast_path("moe_starting_configs", False)
    assert _get(key) == _heuristic()
    fast_path("moe_starting_configs")
    assert _get(key) == TUNED


def test_another_triton_versions_file_is_the_fallback(on_gpu):
    key = FORMATS[2][2]
    _write(on_gpu, key, {"8": TUNED}, version="3.5.0")
    assert _get(key) == TUNED


@pytest.mark.parametrize("fmt,kw,key", FORMATS)
@pytest.mark.parametrize("T", [1, 13])
def test_kernel_with_a_looked_up_config_matches_the_reference(on_gpu, monkeypatch, fmt, kw, key, T):
    """The looked-up config (not the heuristic) drives the kernel: the interpreter's result equals the reference."""
    _write(on_gpu, key, {"1": TUNED})
    cfg = _get(key, T)
    assert cfg == TUNED
    monkeypatch.undo()  # the interpreter again, for the run
    torch.manual_seed(T)
    q = _experts(fmt, kw, E, H, INTER, seed=T)
    x = torch.randn(T, H, device=DEVICE, dtype=torch.float32)
    weights = torch.rand(T, K_TOP, device=DEVICE)
    ids = _ids(T, E, K_TOP)
    out = mq.fused_moe(x, q, weights, ids, config=cfg)
    exact = rq.fused_moe(x.double(), q, weights.double(), ids)
    same = rq.fused_moe(x, q, weights, ids)
    _assert_matches(fmt, out, exact, same)
