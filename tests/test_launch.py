"""The shared launcher / autotune helper and the dispatch layer's plumbing."""

import json

import pytest
import torch
import triton
import triton.language as tl

from omni_fast.kernels import launch as L
from omni_fast.testing import DEVICE


@L.autotune([triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})], key=["n"])
@triton.jit
def _scale_kernel(x_ptr, out_ptr, n, factor, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) * factor, mask=mask)


@pytest.mark.parametrize("n", [0, 1, 37])
def test_autotuned_kernel_launches_with_meta_grid(n):
    x = torch.randn(n, device=DEVICE)
    out = torch.full_like(x, float("nan"))
    L.launch(_scale_kernel, lambda meta: (triton.cdiv(n, meta["BLOCK"]),), x, out, n, 3.0, device=x.device)
    torch.testing.assert_close(out, x * 3)


def test_launch_skips_empty_grids():
    class Boom:
        def __getitem__(self, grid):
            raise AssertionError("an empty grid must not launch")

    L.launch(Boom(), (0, 4), device=torch.device("cpu"))


def test_tuned_config_picks_the_nearest_bucket(tmp_path, monkeypatch):
    (tmp_path / "fam").mkdir()
    (tmp_path / "fam" / "cfg.json").write_text(json.dumps({"1": {"B": 16}, "64": {"B": 64}, "triton": "x"}))
    monkeypatch.setattr(L, "CONFIG_DIR", tmp_path)
    L._load_config_file.cache_clear()
    assert L.tuned_config("fam", "cfg", 2) == {"B": 16}
    assert L.tuned_config("fam", "cfg", 1000) == {"B": 64}
    assert L.tuned_config("fam", "missing", 4) is None


def test_static_case_attrs_mark_pointers_and_aligned_ints():
    case = L.StaticCase("k", None, {"x_ptr": "*fp16", "n": "i32", "stride": "i32", "B": "constexpr"},
                        aligned=("stride",))
    assert case.attrs(["x_ptr", "n", "stride", "B"]) == {(0,): [["tt.divisibility", 16]],
                                                        (2,): [["tt.divisibility", 16]]}
