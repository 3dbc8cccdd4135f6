"""The quantized mode of ``python -m omni_fast.bench.tune_moe`` (``--format``; bench/tune_moe_quant.py) wired on the
CPU: its search space keeps the kernel's tile rules (every candidate is what ``moe_gemm_quant.adjust_config``
launches), the sm_90a static prune drops what spills / overflows shared memory and keeps the nearest survivors,
and the CLI on the interpreter (stub timer, tiny shapes) writes a file named with the format's tag that the
quantized kernel's own lookup finds and runs with. No timing is asserted (the timer is a stub)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_moe_quant import _assert_matches, _ids  # noqa: E402

from omni_fast.bench import tune_moe  # noqa: E402
from omni_fast.bench import tune_moe_quant as tq  # noqa: E402
from omni_fast.kernels import moe_gemm  # noqa: E402
from omni_fast.kernels import moe_gemm_quant as mq  # noqa: E402
from omni_fast.reference import moe_quant as rq  # noqa: E402
from omni_fast.testing import DEVICE  # noqa: E402

E, N, H, K_TOP = 4, 64, 96, 2
# (--format, extra CLI args, the file tag, QuantizedExperts facts for adjust_config)
CASES = [("fp8_block", ["--block", "16", "32"], "fp8_w8a8,block_shape=[16,32]", dict(block=(16, 32))),
         ("fp8_channel", [], "fp8_w8a8", dict(block=None)),
         ("int4", ["--group-size", "32"], "int4_w4a16", dict(group_size=32))]


class _Spec:
    def __init__(self, fmt, block=None, group_size=None):
        self.format, self.block, self.group_size = fmt, block, group_size


@pytest.mark.parametrize("fmt,gk", [("fp8_block", 128), ("fp8_channel", 0), ("int4_w4a16", 128),
                                    ("int4_w4a16", 32)])
@pytest.mark.parametrize("block_m", [16, 128])
def test_search_space_keeps_the_kernels_tile_rules(fmt, gk, block_m):
    spec = _Spec(fmt, (128, gk) if fmt == "fp8_block" else None, gk if fmt == "int4_w4a16" else None)
    for gated in (True, False):
        space = tq.search_space(fmt, gk, False, block_m, gated, 2)
        assert space and all(c["BLOCK_SIZE_M"] == block_m and not c["USE_TMA"] for c in space)
        assert all(tq.smem_bytes(c, gated, fmt, 2) <= tq.SMEM_LIMIT for c in space)
        for cfg in space:  # a fixed point of the run-time rules: what is timed is what runs
            up, down = dict(cfg), dict(cfg)
            mq.adjust_config(spec, up, down)
            assert (up if gated else down) == cfg
    ks = {c["BLOCK_SIZE_K"] for c in tq.search_space(fmt, gk, False, block_m, True, 2)}
    assert ks == {"fp8_block": {128}, "fp8_channel": {64, 128, 256}}.get(fmt, {32, 64, 128} if gk == 128 else {32})
    # the shared-memory prune bites: 5 stages of 128-row fp8 tiles 256 wide do not fit an H100 block
    big = dict(BLOCK_SIZE_M=128, BLOCK_SIZE_N=256, BLOCK_SIZE_K=128, num_stages=5)
    assert tq.smem_bytes(big, True, "fp8_block", 2) > tq.SMEM_LIMIT


def test_static_prune_keeps_the_nearest_survivors(monkeypatch):
    """The prune runs on the candidates nearest the heuristic first, more of them until ``limit`` survive,
    compiles each spec once per run and reports what it dropped and why."""
    space = tq.search_space("fp8_block", 128, True, 16, True, 2)
    default = next(c for c in space if c["num_warps"] == 8)  # its nearest neighbours: 8 warps, "spilling"
    seen = []

    def facts(specs, jobs=1):
        seen.extend(specs)
        return [dict(ok=s["cfg"]["num_warps"] == 4, regs=64, spill_bytes=0 if s["cfg"]["num_warps"] == 4 else 96,
                     smem=1024, error=None) for s in specs]

    monkeypatch.setattr(tq, "compile_facts", facts)
    prune = tq.StaticPrune("fp8_block", 128, False, "bf16")
    kept = tune_moe._candidates(space, default, 3, prune, True)
    assert len(kept) == 3 and all(c["num_warps"] == 4 for c in kept)
    assert kept == [c for c in tune_moe.nearest_first(space, default, len(space)) if c["num_warps"] == 4][:3]
    assert prune.dropped and all("spills 96 B" in why for _, why in prune.dropped)
    n = len(seen)
    tune_moe._candidates(space, default, 3, prune, True)
    assert len(seen) == n  # memoised


def test_static_prune_compiles_for_sm90a():
    """One real candidate through the static check's compile (a subprocess without the interpreter): the
    decode heuristic's fp8 gate/up tile compiles for sm_90a without spills and is kept."""
    ok = dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=64, BLOCK_SIZE_K=128, GROUP_SIZE_M=1, num_warps=8, num_stages=4,
              USE_TMA=False)
    prune = tq.StaticPrune("fp8_block", 128, False, "bf16")
    assert prune([ok], True) == [ok] and not prune.dropped
    facts = prune.facts[prune._key(ok, True)]
    assert facts["regs"] > 0 and facts["spill_bytes"] == 0 and 0 < facts["smem"] <= tq.SMEM_LIMIT


@pytest.mark.parametrize("fmt,extra,tag,spec", CASES, ids=[c[0] for c in CASES])
def test_cli_writes_the_file_the_quantized_lookup_finds(tmp_path, monkeypatch, fmt, extra, tag, spec):
    from omni_fast.kernels import launch

    calls = []

    def bench(fn):
        fn()  # the real launch, on the interpreter
        calls.append(fn)
        return 10.0 - len(calls)  # each candidate "faster" than the last: the last one wins

    def space(block_m, gated, elem):  # two candidates per GEMM, both fixed points of the format's rules
        bk = 64 if fmt == "fp8_channel" else 32
        return [dict(BLOCK_SIZE_M=block_m, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk, GROUP_SIZE_M=1, num_warps=4,
                     num_stages=2, USE_TMA=False) for bn in (16, 32)]

    out = tmp_path / moe_gemm.CONFIG_FAMILY
    argv = ["--device", DEVICE.type, "--format", fmt, *extra, "--n", str(N), "--experts", str(E), "--hidden", str(H),
            "--top-k", str(K_TOP), "--tokens", "1", "5", "--dtype", "fp16", "--out-dir", str(out), "--no-prune"]
    assert tune_moe.main(argv, bench=bench, space=space) == 0
    assert len(calls) == 2 * 2 * 2  # buckets x GEMMs x candidates (BLOCK_M 16 only at these sizes)
    name = f"{moe_gemm.config_file_stem(E, N, tag, DEVICE)}.json"
    assert [p.name for p in out.iterdir()] == [name]
    table = json.loads((out / name).read_text())
    assert sorted(table, key=int) == ["1", "5"] and table["5"]["BLOCK_SIZE_N"] == 32
    # the quantized kernel's lookup (moe_gemm._find_tuned, what get_config reads on a GPU) finds it by its tag
    monkeypatch.setattr(launch, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(moe_gemm, "CONFIG_DIR", tmp_path)
    launch._load_config_file.cache_clear()
    cfg = moe_gemm._find_tuned.__wrapped__(E, N, tag, DEVICE, 4)
    assert cfg == table["5"]
    assert moe_gemm._find_tuned.__wrapped__(E, N, torch.float16, DEVICE, 4) is None  # not the float file
    kw = dict(block=spec["block"]) if fmt == "fp8_block" else (
        dict(group_size=spec["group_size"], symmetric=False) if fmt == "int4" else {})
    g = torch.Generator().manual_seed(0)
    q = rq.quantize_experts(torch.randn(E, 2 * N, H, generator=g) * H ** -0.5,
                            torch.randn(E, H, N, generator=g) * N ** -0.5, tq.ALIASES.get(fmt, fmt), **kw)
    assert mq.config_key(q) == tag
    x, w, ids = torch.randn(4, H, generator=g), torch.rand(4, K_TOP, generator=g), _ids(4, E, K_TOP)
    got = mq.fused_moe(x, q, w, ids, config=cfg)
    _assert_matches(q.format, got, rq.fused_moe(x.double(), q, w.double(), ids), rq.fused_moe(x, q, w, ids))
    launch._load_config_file.cache_clear()


def test_cli_dry_run_with_the_static_prune(tmp_path):
    """The GPU session's dry-run form of the quantized step (interpreter, toy sizes, one candidate per GEMM) with
    the sm_90a prune on: a file with the fp8-block tag and the bucket."""
    argv = ["--device", "cpu", "--format", "fp8_block", "--n", "64", "--experts", "4", "--hidden", "128",
            "--top-k", "2", "--tokens", "3", "--dtype", "fp16", "--max-configs", "1", "--out-dir", str(tmp_path),
            "--jobs", "1"]
    assert tune_moe.main(argv) == 0
    path = tmp_path / f"{moe_gemm.config_file_stem(4, 64, 'fp8_w8a8,block_shape=[128,128]', torch.device('cpu'))}.json"
    table = json.loads(path.read_text())
    assert list(table) == ["3"] and table["3"]["BLOCK_SIZE_K"] == 128 and not table["3"]["USE_TMA"]


@pytest.mark.parametrize("bad", [["--tokens", "0"], ["--experts", "-1"], ["--n", "0"], ["--top-k", "0"],
                                 ["--hidden", "0"], ["--max-configs", "0"], ["--budget-s", "nan"], ["--jobs", "0"],
                                 ["--block", "0", "128"], ["--group-size", "-4"], ["--top-k", "9", "--experts", "8"],
                                 ["--device", "no-such-device"], ["--out-dir", "FILE"]])
def test_tune_moe_cli_refuses_bad_numbers_before_any_work(bad, tmp_path, capsys):
    """They were taken as given (``--budget-s nan`` never stopped, ``--tokens 0`` / ``--top-k 0`` failed deep in a
    GPU run, ``--device`` / ``--out-dir`` gave tracebacks); now argparse errors naming the flag, GPU or not."""
    from omni_fast.bench import tune_moe

    (tmp_path / "FILE").write_text("")
    bad = [str(tmp_path / "FILE") if b == "FILE" else b for b in bad]
    with pytest.raises(SystemExit) as exit_:
        tune_moe.main(["--device", "cpu", *bad] if "--device" not in bad else bad)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and bad[-2 if bad[0] == "--top-k" else 0] in err, err
