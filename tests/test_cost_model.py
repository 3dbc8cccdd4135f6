"""The cost model's CI gate (``python -m omni_fast.bench.model``; bench/costmodel/).

- Launch counts of every cheap unit (tiny configs, the real layer counts) must not grow past the committed
  baseline ``bench/results/model/launch_baseline.json`` (regenerate with ``--write-baseline`` when a change
  legitimately adds kernels, and say why in the commit).
- The committed sm_90a facts have no spills and no block over the H100's shared memory, and a few key
  specialisations recompiled here still match them (so the committed facts stay current).
- The counter counts what it should, and the byte-scaling rules the expensive traces use are exact.
No timing anywhere: the predictions are a model, not measurements.
"""

from __future__ import annotations

import json

import pytest
import torch

from omni_fast.bench.costmodel.counter import count_launches, count_unit, skip_kernels, summarize, trace
from omni_fast.bench.costmodel.model_units import all_units
from omni_fast.bench.model import BASELINE, STATICS, _scaled

CHEAP = ["moe-thinker-T1", "moe-thinker-T64", "moe-talker-T1", "moe-talker-T64", "moe-thinker-fp8-T1",
         "moe-talker-int4-T64", "attn-prefill-4096",
         "attn-decode-B1-4k", "attn-decode-B8-4k", "attn-encoder-audio", "attn-encoder-vision", "rope-thinker-T1",
         "sampler-thinker-B1", "sampler-mtp-B64",
         # counted with the kernels skipped (Unit.cheap_count, test_cheap_count_equals_executed_count): seconds
         # each, where running the kernels took 1-30 min on the interpreter
         "thinker-step-B1", "talker-step-B1", "thinker-step-B8", "talker-step-B8",
         "talker-step-fused-B1", "talker-step-fused-B8", "thinker-step-fused-B1", "thinker-step-fused-B8",
         "mtp-frame-B1", "mtp-frame-B64", "mtp-frame-persistent-B1", "mtp-frame-persistent-B64",
         "code2wav-push-B1-F1", "code2wav-push-B1-F4", "code2wav-push-B32-F1", "code2wav-push-B32-F4",
         "code2wav-push-moves-B1-F1", "code2wav-push-moves-B1-F4", "code2wav-push-moves-B32-F1",
         "code2wav-push-moves-B32-F4",
         "moe-thinker-T4096", "moe-talker-T4096",
         "dit-step-T500", "dit-step-tf32-T500", "bigvgan-amp-block-C768-T2500", "bigvgan-T500",
         "bigvgan-padded-T500-S528"]
UNITS = {u.name: u for u in all_units()}


def _check_against_baseline(name: str) -> None:
    baseline = json.loads(BASELINE.read_text())
    if name not in baseline:
        pytest.skip(f"{name} has no committed baseline yet: python -m omni_fast.bench.model {name} --write-baseline")
    base = baseline[name]
    got = count_unit(UNITS[name]).launches()  # cheap-count units: kernels skipped (test_cheap_count_* below)
    b, g = summarize(base), summarize(got)
    grown = {k: (base.get(k, 0), v) for k, v in got.items() if v > base.get(k, 0)}
    assert g["total"] <= b["total"] and g["triton"] <= b["triton"], (
        f"{name}: launches grew from {b} to {g}; kernels that grew (baseline, now): {grown}")


@pytest.mark.parametrize("name", CHEAP)
def test_launches_within_baseline(name):
    _check_against_baseline(name)


def test_baseline_covers_the_cheap_units():
    assert set(CHEAP) <= set(json.loads(BASELINE.read_text()))


def test_committed_static_facts_pass_the_gate():
    from omni_fast.bench.costmodel.constants import current

    facts = json.loads(STATICS.read_text())
    bad = {n: f for n, f in facts.items() if f.get("error") or f.get("spill_bytes") or
           (f.get("smem") or 0) > current().smem_per_block}
    assert not bad, f"kernels that fail to compile, spill or pass {current().smem_per_block} B shared memory: {bad}"


def test_committed_static_facts_cover_every_registered_case():
    """Every kernel specialisation the sm_90a static check registers has committed facts (a new kernel without
    them would be invisible to the model and to the spill / shared-memory gate above)."""
    from omni_fast.bench import static_check as sc
    from omni_fast.kernels.launch import STATIC_CASES

    sc.import_kernel_modules()
    missing = sorted({c.name for c in STATIC_CASES} - set(json.loads(STATICS.read_text())))
    assert not missing, (f"no committed sm_90a facts for {missing}: python -m omni_fast.bench.costmodel.statics "
                         f"<name> and merge them into {STATICS.name} (or python -m omni_fast.bench.model --static)")


KEY_CASES = ["moe_gemm_kernel[bf16,E128 N768/384/192,decode,gate_up,ptr]",
             "attn_fwd_kernel[bf16,thinker 32/4 d128 decode]", "sample_kernel[bf16,V2048,topk,topp]"]


def test_key_static_facts_current():
    from omni_fast.bench.costmodel.statics import facts

    committed = json.loads(STATICS.read_text())
    fresh = facts(KEY_CASES)
    for case in KEY_CASES:
        got = fresh[case]
        assert not got.get("spill_bytes") and got["smem"] <= 227 * 1024, got
        for key in ("regs", "smem", "tensor_core"):
            assert got[key] == committed[case][key], (
                f"{case}: {key} {committed[case][key]} committed, {got[key]} now: rerun "
                f"python -m omni_fast.bench.model --static")


def test_counter_sees_triton_and_torch_kernels_not_views():
    x = torch.randn(6, 8)

    def fn():
        y = x.view(2, 24).t().contiguous()  # view + transpose: no kernel; contiguous: one copy kernel
        return torch.empty(3), y + 1, x.sum().item()

    tr = trace(fn)
    assert tr.launches() == {"aten:clone": 1, "aten:add": 1, "aten:sum": 1}
    assert tr.syncs == 1


def test_counter_sees_the_copy_an_op_makes_of_a_strided_input():
    """native_layer_norm copies a non-contiguous input inside itself (counter.HIDDEN_COPY_INPUTS): one hidden
    copy launch with its bytes (read + write), none for a contiguous input; what the Code2Wav ConvNeXt did."""
    import torch.nn.functional as F

    x = torch.randn(2, 16, 5)  # [B, C, T] channels-first, normed over C
    w, b = torch.ones(16), torch.zeros(16)
    tr = trace(lambda: F.layer_norm(x.permute(0, 2, 1), (16,), w, b), bytes=True, unique=True)
    assert tr.launches() == {"aten:native_layer_norm": 1, "aten:copy_[native_layer_norm]": 1}
    copy = tr.kernels["aten:copy_[native_layer_norm]"]
    assert copy.loaded == copy.stored == copy.unique_loaded == copy.unique_stored == x.numel() * 4
    xl = x.transpose(1, 2).contiguous()  # channels-last: contiguous, no copy
    assert trace(lambda: F.layer_norm(xl, (16,), w, b)).launches() == {"aten:native_layer_norm": 1}


def test_counter_moe_t1_kernels_and_bytes():
    from omni_fast import ops
    from omni_fast.reference import moe as ref

    T, E, k, H, I = 1, 8, 2, 64, 64
    x, w13, w2 = torch.randn(T, H), torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    w, ids = ref.topk_softmax(torch.randn(T, E), k)
    counts = count_launches(ops.moe_experts, x, w13, w2, w, ids)
    assert summarize(counts)["triton"] == 4 and counts["triton:moe_gemm_kernel"] == 2
    tr = trace(ops.moe_experts, x, w13, w2, w, ids, bytes=True, unique=True)
    gemm = tr.kernels["triton:moe_gemm_kernel"]
    weights = 4 * k * (2 * I * H + H * I)  # fp32: the two touched experts' weights, each read once
    assert weights <= gemm.unique_loaded <= weights + 4 * (2 * T * k * H + 2 * T * k * I + 64)
    assert gemm.flops >= 2 * T * k * 3 * I * H  # padded to BLOCK_M rows


def _stats(fn):
    return {n: s.as_dict() for n, s in trace(fn, bytes=True).kernels.items()}


def test_heads_scaling_rule_is_exact():
    from omni_fast.bench.costmodel.units import _varlen_call

    small = _stats(_varlen_call([37, 20], 2, 1, 16, True, torch.float32))
    big = _stats(_varlen_call([37, 20], 6, 3, 16, True, torch.float32))
    scaled = _scaled(small, dict(rule="heads", s=3, kernels="all"))
    for f in ("loaded", "stored", "flops", "ctas"):
        assert scaled["triton:attn_fwd_kernel"][f] == big["triton:attn_fwd_kernel"][f], f


def test_inter_scaling_rule_is_exact():
    from omni_fast.bench.costmodel.units import _moe_call

    dims = (8, 2, 64, 256, 256)  # E, k, H, I, shared I; I/4 multiples of BLOCK_N 64, BLOCK_K 64 (fp32, T=3)
    big = _stats(_moe_call("talker", 3, dims, torch.float32))
    small = _stats(_moe_call("talker", 3, dims, torch.float32, s=4))
    half = _stats(_moe_call("talker", 3, dims, torch.float32, s=2))
    scaled = _scaled(small, dict(rule="inter", s=4, kernels=["triton:moe_gemm_kernel"]), half)
    for name, k in big.items():
        for f in ("loaded", "stored", "flops", "ctas", "launches"):
            assert scaled[name][f] == k[f], (name, f)


@pytest.mark.parametrize("model,I,s", [("thinker", 512, 4), ("talker", 384, 3)])
def test_inter_scaling_rule_is_exact_with_the_real_shapes_grid_fill(model, I, s):
    """The bf16 units' scaled traces (MOE_SCALE; thinker T=8/64/4096, talker T=4096): the scaled calls take the
    launch config of the real I, here one whose decode-tier grid fill (moe_gemm.fill_grid) differs at I/s; and
    an odd ``s`` takes its second point at divisor s / 2, as ``bench.model.run_traces`` does."""
    from omni_fast.bench.costmodel.units import _moe_call
    from omni_fast.kernels import moe_gemm

    T, dims = 24, (32, 2, 64, I, 384 if model == "talker" else 0)  # 33 M tiles: BLOCK_N 64 at I, 32 at I / s
    small_cfg = moe_gemm.default_config(T, 32, 2, 64, I // s, torch.float32, fill=True)
    assert small_cfg != moe_gemm.default_config(T, 32, 2, 64, I, torch.float32, fill=True)  # the case at stake
    big = _stats(_moe_call(model, T, dims, torch.float32))
    small = _stats(_moe_call(model, T, dims, torch.float32, s=s))
    half = _stats(_moe_call(model, T, dims, torch.float32, s=s // 2 if s % 2 == 0 else s / 2))
    scaled = _scaled(small, dict(rule="inter", s=s, kernels=["triton:moe_gemm_kernel"]), half)
    for name, k in big.items():
        for f in ("loaded", "stored", "flops", "ctas", "launches"):
            assert scaled[name][f] == k[f], (name, f)


@pytest.mark.parametrize("fmt", ["fp8", "fp8_channel", "int4"])
def test_quant_inter_scaling_rule_is_exact(fmt):
    """The quantized units' scaled traces (QUANT_SCALE): the routed GEMM's counts are affine in I."""
    from omni_fast.bench.costmodel.units import _quant_moe_call

    dims = (8, 2, 128, 512, 0)  # E, k, H, I, shared I; I/4 = 128, I/2 = 256: whole K tiles, blocks, groups
    big = _stats(_quant_moe_call(fmt, 3, dims, torch.float32))
    small = _stats(_quant_moe_call(fmt, 3, dims, torch.float32, s=4))
    half = _stats(_quant_moe_call(fmt, 3, dims, torch.float32, s=2))
    scaled = _scaled(small, dict(rule="inter", s=4, kernels=["triton:moe_gemm_quant_kernel"]), half)
    for name, k in big.items():
        for f in ("loaded", "stored", "flops", "ctas", "launches"):
            assert scaled[name][f] == k[f], (name, f)


def test_prediction_model():
    from omni_fast.bench.costmodel import constants
    from omni_fast.bench.costmodel.predict import predict

    c = constants.calibrate()
    unit = dict(mode="graph", min_bytes=3e9, flops=0.0, traced=False, kernels={"triton:a": {"launches": 10}})
    p = predict(unit, {}, c)
    assert p["floor_s"] == pytest.approx(1e-3) and p["predicted_s"] == pytest.approx(1e-3 + 10 * c.graph_node_s)
    eager = predict(dict(unit, mode="eager", min_bytes=0.0), {}, c)
    assert eager["predicted_s"] == pytest.approx(10 * c.eager_triton_s)
    fast = constants.calibrate({"roofline": {"copy_gbps": 6000.0}})
    assert predict(unit, {}, fast)["floor_s"] == pytest.approx(0.5e-3)
    constants.calibrate()


def test_session_calibration_hook_reads_the_bench_ceilings(tmp_path):
    """First light's 06_calibrate finds ``omni_fast.bench.model.calibrate`` (without it the step is skipped on the
    GPU): the median of the bench families' measured ceilings sets the bandwidth / matmul constants, files without
    a roofline are left out, nothing global changes, and the session's calibration.json applies with --calibrate."""
    import json

    from omni_fast.bench import model, session_tools
    from omni_fast.bench.costmodel import constants

    files = []
    for i, (gbps, tflops) in enumerate(((2900.0, 700.0), (3100.0, 760.0), (3000.0, 720.0))):
        d = tmp_path / f"04_bench_f{i}" / "results" / "NVIDIA_H100"
        d.mkdir(parents=True)
        (d / "run.json").write_text(json.dumps({"roofline": {"copy_gbps": gbps, "matmul_tflops": tflops}}))
        files.append(d / "run.json")
    pipe = tmp_path / "05_pipeline" / "results" / "NVIDIA_H100"
    pipe.mkdir(parents=True)
    (pipe / "pipeline.json").write_text(json.dumps({"runs": []}))
    before = constants.current()
    out = tmp_path / "06_calibrate" / "calibration.json"
    out.parent.mkdir()
    rec = session_tools.calibrate(tmp_path, out, dry=False)
    assert rec["status"] == "ok", rec
    got = rec["constants"]
    assert got["from"] == sorted(str(f) for f in files)
    assert got["constants"]["hbm_bytes_per_s"] == pytest.approx(3000e9)
    assert got["constants"]["mma_flops_per_s"] == pytest.approx(720e12)
    assert set(got["constants"]) == {"hbm_bytes_per_s", "mma_flops_per_s"}  # the measured ones only
    assert constants.current() is before
    out.write_text(json.dumps(rec))
    try:
        applied = constants.calibrate(out)
        assert applied.hbm_bytes_per_s == pytest.approx(3000e9) and applied.sms == constants.DEFAULT.sms
    finally:
        constants.calibrate()
    assert model.calibrate([pipe / "pipeline.json"])["roofline"] == {}
    bad = tmp_path / "failed.json"  # a failed measurement is no ceiling (a zero one would divide by zero)
    bad.write_text(json.dumps({"roofline": {"copy_gbps": 0.0, "matmul_tflops": float("nan")}}))
    assert model.calibrate([*files, bad])["roofline"] == {"copy_gbps": 3000.0, "matmul_tflops": 720.0}
    assert model.calibrate([bad])["roofline"] == {}
    with pytest.raises(TypeError, match="measurements"):
        model.calibrate(str(files[0]))
    now = constants.current()
    for roof in ({"copy_gbps": 0.0}, {"matmul_tflops": float("nan")}, {"copy_gbps": "fast"}):
        with pytest.raises(ValueError, match=f"roofline.{next(iter(roof))}"):
            constants.calibrate({"roofline": roof})
    assert constants.current() is now  # a refused calibration changes nothing


def _both_counts(build, warmup=False):
    """(executed, cheap) launch counts of the call ``build()`` returns (the cheap one built with kernels skipped)."""
    executed = trace(build(), warmup=warmup).launches()
    with skip_kernels():
        fn = build()
    return executed, trace(fn, warmup=warmup, execute=False).launches()


@pytest.mark.parametrize("kind", ["mtp", "mtp-persistent", "code2wav", "code2wav-moves", "moe", "talker-step",
                                  "talker-step-fused", "thinker-step-fused"])
def test_cheap_count_equals_executed_count(kind):
    """The rule behind ``Unit.cheap_count``: launch counts do not depend on values, so skipping the Triton programs
    (and the set-up's) counts the same launches. Checked on the cheap-count units' code at fewer steps (the MTP
    frame, today's and the persistent one, with 1 layer and 4 code groups; a 1-layer Code2Wav stream; the MoE block
    on the multi-program alignment path with the shared expert; a 2-layer talker decode step at B=2): more layers
    and groups only repeat the same calls. (At full size, measured once on this CPU: MTP frame 421 = 421,
    Code2Wav push 245 = 245, talker MoE T=600 21 = 21, the four decode steps 778 / 826 / 470 / 490 equal.)"""
    from omni_fast.bench.costmodel.model_units import _code2wav_call, _mtp_call, _step_call
    from omni_fast.bench.costmodel.units import MOE_TINY, _moe_call

    build, warmup = {"mtp": (lambda: _mtp_call(2, layers=1, groups=4), True),
                     "mtp-persistent": (lambda: _mtp_call(2, layers=1, groups=4, persistent=True), True),
                     "code2wav": (lambda: _code2wav_call(1, 1, layers=1, warm=2), False),
                     "code2wav-moves": (lambda: _code2wav_call(1, 1, layers=1, warm=2, moves=True), False),
                     "moe": (lambda: _moe_call("talker", 40, MOE_TINY["talker"], torch.float32), False),
                     "talker-step": (lambda: _step_call("talker", 2, layers=2), False),
                     "talker-step-fused": (lambda: _step_call("talker", 2, layers=2, fused=True), False),
                     "thinker-step-fused": (lambda: _step_call("thinker", 2, layers=2, fused=True), False)}[kind]
    executed, cheap = _both_counts(build, warmup)
    assert cheap == executed and summarize(cheap)["triton"] > 0


def test_cheap_count_units_are_flagged():
    """The units too slow to count with the kernels run use the cheap count (so the gate above stays cheap)."""
    slow = [n for n in UNITS if n.startswith(("mtp-frame", "code2wav-push", "bigvgan-")) or "-step-" in n or
            n.endswith("T4096") and n.startswith("moe-")]
    assert len(slow) == 27 and slow == [n for n in UNITS if UNITS[n].cheap_count] and set(slow) <= set(CHEAP)


def test_whatif_cli_parses_its_arguments(capsys):
    """``python -m omni_fast.bench.costmodel.whatif --help`` prints usage (it used to parse ``--help`` as T)."""
    from omni_fast.bench.costmodel import whatif

    with pytest.raises(SystemExit) as got:
        whatif.main(["--help"])
    assert got.value.code == 0 and "tokens" in capsys.readouterr().out
    with pytest.raises(SystemExit) as got:
        whatif.main(["0"])
    assert got.value.code == 2


def test_model_cli_with_units_keeps_the_other_units_rows(tmp_path, monkeypatch, capsys):
    """``python -m omni_fast.bench.model UNIT`` (the docs' before/after command) replaces that unit's row in the
    default model.json and keeps every other row (it used to rewrite the file with the one unit); a subset never
    writes a partial table into BENCHMARKS.md."""
    from omni_fast.bench import model

    results = model.RESULTS
    for name in ("model.json", "launch_counts.json"):
        (tmp_path / name).write_text((results / name).read_text())
    monkeypatch.setattr(model, "RESULTS", tmp_path)
    monkeypatch.setattr(model, "COUNTS", tmp_path / "launch_counts.json")
    monkeypatch.setattr(model, "update_benchmarks", lambda text: pytest.fail("BENCHMARKS.md rewritten"))
    saved = json.loads((tmp_path / "model.json").read_text())["units"]
    assert len(saved) == len(UNITS)
    assert model.main(["code2wav-push-B1-F1", "--saved-only", "--no-static"]) == 0
    rows = json.loads((tmp_path / "model.json").read_text())["units"]
    assert [r["unit"] for r in rows] == [r["unit"] for r in saved]
    changed = [r["unit"] for r, s in zip(rows, saved) if r != s]
    assert changed == ["code2wav-push-B1-F1"]  # --no-static changed its row, only its row
    assert model.main(["code2wav-push-B1-F1", "--saved-only", "--json", str(tmp_path / "one.json"),
                       "--update-benchmarks"]) == 1
    assert [r["unit"] for r in json.loads((tmp_path / "one.json").read_text())["units"]] == ["code2wav-push-B1-F1"]
    assert "not done" in capsys.readouterr().out


def test_statics_cli_under_the_interpreter_gives_facts_not_errors():
    """``python -m omni_fast.bench.costmodel.statics NAME`` (the command the gate above names) with
    ``TRITON_INTERPRET=1`` set, as everywhere here: real facts (it compiled under the interpreter and gave an
    AttributeError row, merged as such); ``--help`` prints usage instead of compiling nothing."""
    import os
    import subprocess
    import sys

    from omni_fast._layout import REPO_ROOT

    env = dict(os.environ, TRITON_INTERPRET="1")
    name = "sample_kernel[bf16,V2048,topk,topp]"
    run = subprocess.run([sys.executable, "-m", "omni_fast.bench.costmodel.statics", name], env=env,
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    row = json.loads(run.stdout.strip().splitlines()[-1])[name]
    assert "error" not in row and row["regs"] > 0, row
    run = subprocess.run([sys.executable, "-m", "omni_fast.bench.costmodel.statics", "--help"], env=env,
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "static_sm90a.json" in run.stdout, run.stdout


@pytest.mark.parametrize("bad", [{"hbm_bytes_per_s": "fast"}, {"mma_flops_per_s": 0}, {"sms": float("nan")},
                                 {"graph_node_s": -1e-6}, {"sms": True}])
def test_calibrate_refuses_a_bad_constant_naming_it(bad):
    """A measured constant that is not a positive finite number (a latency may be 0) is refused by name; it failed
    later, inside a prediction, with a TypeError or a division by zero."""
    from omni_fast.bench.costmodel import constants

    try:
        with pytest.raises(ValueError, match=next(iter(bad))):
            constants.calibrate(bad)
        assert constants.calibrate({"sync_s": 0}).sync_s == 0
    finally:
        constants.calibrate(None)


def test_model_cli_names_a_missing_calibration_file(capsys):
    from omni_fast.bench import model

    with pytest.raises(SystemExit) as exc:
        model.main(["rope-thinker-T1", "--calibrate", "/nonexistent/calibration.json"])
    assert exc.value.code == 2 and "--calibrate: no such file" in capsys.readouterr().err


def test_token2wav_padding_table():
    """The Token2Wav padding table (docs/token2wav.md): the buckets each rule picks, finer buckets never predicted
    slower, and the vocoder on the real length never computing more than in the graph on the bucket (predicted)."""
    from omni_fast.bench.costmodel import token2wav_padding as tp

    rows = {r["codes"]: r for r in tp.rows((25, 33, 130, 250))}
    assert [(rows[n]["old"], rows[n]["new"]) for n in (25, 33, 130, 250)] == [(36, 36), (72, 48), (264, 156),
                                                                              (264, 264)]
    for r in rows.values():
        assert r["dit_fp32_new"] <= r["dit_fp32_old"] and r["dit_tf32_new"] <= r["dit_tf32_old"]
        assert r["voc_graph_new"] <= r["voc_graph_old"] and r["dit_tf32_new"] < r["dit_fp32_new"]
    assert rows[25]["voc_eager_real"] > rows[25]["voc_graph_new"]  # short: the eager launches are not hidden
    assert rows[130]["voc_eager_real"] < rows[130]["voc_graph_new"]
    assert "| 250 (5 s) | 264 / 264 |" in tp.markdown(list(rows.values()))


@pytest.mark.parametrize("where", ["folder", "under_a_file"])
def test_model_cli_refuses_a_json_path_it_cannot_write_before_running(where, tmp_path, monkeypatch, capsys):
    """``--json DIR`` raised IsADirectoryError after every unit had been counted (minutes); now an argparse error
    before any work."""
    from omni_fast.bench import model

    monkeypatch.setattr(model, "count_units", lambda *a, **k: pytest.fail("counted before the --json check"))
    (tmp_path / "f").write_text("")
    path = tmp_path if where == "folder" else tmp_path / "f" / "out.json"
    with pytest.raises(SystemExit) as exc:
        model.main(["rope-thinker-T1", "--no-static", "--json", str(path)])
    assert exc.value.code == 2 and "--json" in capsys.readouterr().err


def test_model_cli_static_and_no_static_exclude_each_other(capsys):
    """``--static --no-static`` ran without the facts (``--static`` silently dropped)."""
    from omni_fast.bench import model

    with pytest.raises(SystemExit) as exc:
        model.main(["rope-thinker-T1", "--static", "--no-static"])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
