"""The shipped untuned starting-point MoE configs (omni_fast/configs/moe/*.json, written by
``python -m omni_fast.bench.moe_starting_configs``): found by device name and Triton version, the expected config
per token count, each distinct config computes the reference result on the interpreter, and the prefill tiles
pass the sm_90a static check (no spills, <= 227 KB shared memory, wgmma n >= 128, TMA)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import triton

from omni_fast._layout import REPO_ROOT
from omni_fast.bench import moe_starting_configs as msc
from omni_fast.kernels import moe_gemm
from omni_fast.reference import moe as ref
from omni_fast.testing import assert_matches_reference

FOLDER = moe_gemm.CONFIG_DIR / moe_gemm.CONFIG_FAMILY
SHAPES = {768: (2048, 8), 384: (1024, 6)}  # thinker, talker: N -> (H, top_k)


def test_shipped_files_match_the_generator_and_say_untuned():
    assert msc.main(["--check"]) == 0
    for name in msc.files():
        table = json.loads((FOLDER / name).read_text())
        assert "not measured" in table["provenance"] and "tune_moe" in table["provenance"]


@pytest.fixture
def on_gpu(monkeypatch, fast_path):
    """get_config as on a CUDA device called ``name`` under Triton ``version`` (no GPU needed)."""
    def use(name: str, version: str):
        monkeypatch.setattr(moe_gemm, "interpreting", lambda: False)
        monkeypatch.setattr(moe_gemm, "device_name", lambda device=None: name.replace(" ", "_"))
        monkeypatch.setattr(triton, "__version__", version)
        fast_path("moe_starting_configs")  # OMNI_FAST_MOE_STARTING_CONFIGS=1
        moe_gemm._find_tuned.cache_clear()
    yield use
    moe_gemm._find_tuned.cache_clear()


def test_untuned_starting_points_are_opt_in(on_gpu, fast_path):
    """Without OMNI_FAST_MOE_STARTING_CONFIGS=1 the untuned files are skipped: the heuristic (no TMA) runs."""
    on_gpu("NVIDIA H100 80GB HBM3", "3.6.0")
    fast_path("moe_starting_configs", False)  # (part of the lookup's cache key: no cache_clear needed)
    args = (4096, 128, 8, 2048, 768, torch.bfloat16, torch.device("cpu"))
    assert moe_gemm.get_config(*args) == moe_gemm.default_config(4096, 128, 8, 2048, 768, torch.bfloat16)
    assert not moe_gemm.get_config(*args).get("USE_TMA")


@pytest.mark.parametrize("device", ["NVIDIA H100 80GB HBM3", "NVIDIA H200"])
@pytest.mark.parametrize("version", ["3.6.0", "3.7.1"])  # 3.7.1: no file, the newest other version's is taken
@pytest.mark.parametrize("inter", [768, 384])
def test_get_config_finds_the_file_by_device_name(on_gpu, device, version, inter):
    on_gpu(device, version)
    H, k = SHAPES[inter]
    cuda = torch.device("cuda", 0)
    for T in (1, 64, 512):  # below the prefill switch: what the heuristic with grid fill gives
        got = moe_gemm.get_config(T, 128, k, H, inter, torch.bfloat16, cuda, fill=True)
        assert got == moe_gemm.default_config(T, 128, k, H, inter, torch.bfloat16, fill=True), T
    for T in (1536, 4096, 20000):
        got = moe_gemm.get_config(T, 128, k, H, inter, torch.bfloat16, cuda)
        assert got == msc.PREFILL and got["USE_TMA"] and got["BLOCK_SIZE_M"] == 128
    # H200 switches to the 128-row tiles at 1024 (vLLM's H200 table), the H100 at 1536
    at_1024 = moe_gemm.get_config(1024, 128, k, H, inter, torch.bfloat16, cuda)
    assert (at_1024 == msc.PREFILL) == (device == "NVIDIA H200")
    # another GPU / dtype / shape: no file, the heuristic
    on_gpu("NVIDIA A100-SXM4-80GB", version)
    assert moe_gemm.get_config(4096, 128, k, H, inter, torch.bfloat16, cuda) == \
        moe_gemm.default_config(4096, 128, k, H, inter, torch.bfloat16)


def _distinct_configs():
    seen = {}
    for table in msc.files().values():
        for key, cfg in table.items():
            if key.isdigit():
                seen.setdefault(json.dumps(cfg, sort_keys=True), cfg)
    return list(seen.values())


@pytest.mark.parametrize("cfg", _distinct_configs(), ids=lambda c: "m{BLOCK_SIZE_M}n{BLOCK_SIZE_N}k{BLOCK_SIZE_K}"
                         "-d{d}{tma}".format(d=c["down"]["BLOCK_SIZE_N"], tma="-tma" if c.get("USE_TMA") else "",
                                             **c))
def test_each_shipped_config_matches_reference(cfg):
    # fp16 (raw-bf16 dots are wrong on the interpreter); H, I not multiples of the tiles; uneven experts, one empty
    T, E, k, H, I = (150, 3, 2, 72, 136) if cfg["BLOCK_SIZE_M"] >= 64 else (9, 4, 2, 40, 24)
    g = torch.Generator().manual_seed(1)
    dtype = torch.float16
    x = torch.randn(T, H, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(dtype)
    w = torch.rand(T, k, generator=g)
    ids = torch.stack([torch.randperm(E - 1, generator=g)[:k] for _ in range(T)]).to(torch.int32)
    out = moe_gemm.fused_moe(x, w13, w2, w, ids, config=json.loads(json.dumps(cfg)))
    exact = ref.fused_moe(x.double(), w13.double(), w2.double(), w.double(), ids)
    same = ref.fused_moe(x, w13, w2, w, ids)
    assert_matches_reference(out, exact, same, name="fused_moe")


def test_prefill_tiles_pass_the_sm90_static_check():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "omni_fast.bench.moe_starting_configs", "--static"], cwd=REPO_ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "wgmma m64n128k16" in res.stdout and "wgmma m64n256k16" in res.stdout


@pytest.mark.parametrize("argv", [["--help"], ["--chek"], ["--check", "--report"]])
def test_cli_help_or_a_typo_writes_nothing(argv, monkeypatch):
    """``--help`` or a mistyped flag used to fall through to rewriting the shipped files."""
    monkeypatch.setattr(msc, "files", lambda: pytest.fail("would (re)write the config files"))
    with pytest.raises(SystemExit) as exc:
        msc.main(argv)
    assert exc.value.code == (0 if argv == ["--help"] else 2)
