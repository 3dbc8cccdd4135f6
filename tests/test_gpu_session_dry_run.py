"""The prepared GPU sessions (``bash scripts/gpu_session.sh first-light|second-light``, see BENCHMARKS.md) wired on
the CPU: their ``--dry-run`` runs every step in its wiring-only form (listed test ids collected and gpu-marked,
bench families listing their quick cases, the tuner at toy sizes on the interpreter, the pipeline's tiny check, the
calibration hook) and every step's log and JSON must land in the bundle, so a broken step shows in CI instead of
in GPU time. The two sessions run side by side (~45 s on 2 cores). Plus the time box and the calibration hook."""

import json
import os
import subprocess
import sys
import tarfile
import time
import types

import pytest
import torch
import triton

from omni_fast._layout import REPO_ROOT
from omni_fast.bench import session, session_tools

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="the CPU's wiring check; on a GPU run the session itself")


def test_dry_runs_wire_every_step_into_the_bundle(tmp_path):
    procs = {}
    for name in ("first-light", "second-light"):
        env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / name), OMP_NUM_THREADS="1")
        procs[name] = subprocess.Popen(
            ["bash", "scripts/gpu_session.sh", name, "--dry-run", "--work", str(tmp_path / f"work-{name}")],
            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for name, proc in procs.items():
        log = proc.communicate(timeout=900)[0]
        assert proc.returncode == 0, log[-4000:]
        out = tmp_path / name
        # what comes back from $OUT: at most 8 files (the device tool's limit); here 3
        assert sorted(f.name for f in out.iterdir()) == sorted([f"{name}.tar.gz", "summary.json", "summary.md"])
        summary = json.loads((out / "summary.json").read_text())
        steps = {s["step"]: s for s in summary["steps"]}
        assert list(steps) == [s.key for s in session.SESSIONS[name]()]
        assert all(s["status"] in ("ok", "skipped") for s in steps.values()), summary
        with tarfile.open(out / f"{name}.tar.gz") as tar:
            names = set(tar.getnames())
        for key in steps:
            assert {f"{name}/{key}/log.txt", f"{name}/{key}/step.json"} <= names
        assert f"{name}/summary.md" in names
        if name == "first-light":
            n_ids = len(session_tools.read_ids(session.FIRST_LIGHT_TESTS))
            assert steps["03_tests"]["tests"] == n_ids == steps["03_tests"]["skipped"]  # all gpu-marked: skipped here
            assert steps["02_static"]["verdict"] == "PASS"
            assert all(steps[f"04_bench_{f}"]["cases_listed"] > 0 for f in session.BENCH_BOXES)
            assert steps["01_env"]["env"]["torch"] == torch.__version__
            assert steps["06_calibrate"]["status"] in ("ok", "skipped")
        else:
            assert steps["04_memcheck"]["collected"] >= len(session_tools.read_ids(session.MEMCHECK_TESTS))
            for key in ("02_tune_768", "03_tune_384", "05_tune_fp8_768", "06_tune_fp8_384"):
                assert [v for v in steps[key]["configs"].values()] == [["3"]]
            for key, n in (("05_tune_fp8_768", 768), ("06_tune_fp8_384", 384)):  # the quantized lookup's file name
                assert list(steps[key]["configs"]) == [
                    f"E=4,N={n},dtype=fp8_w8a8,block_shape=[128,128],device=cpu,triton={triton.__version__}.json"]


def test_a_step_past_its_box_is_stopped_and_the_session_goes_on(tmp_path):
    ctx = session.Ctx(dry=True, work=tmp_path, py=sys.executable, scale=1.0)
    hang = session.Step("01_hang", "sleeps", 1.0, lambda c, d: [c.py, "-c", "import time; time.sleep(60)"])
    broken = session.Step("02_broken", "argv fails", 5.0, lambda c, d: session_tools.read_ids(tmp_path / "nope.txt"))
    t0 = time.monotonic()
    rec = session.run_step(ctx, hang, cuda=False)
    assert rec["status"] == "timeout" and time.monotonic() - t0 < 20
    assert "time box of 1 s ran out" in (tmp_path / "01_hang" / "log.txt").read_text()
    rec = session.run_step(ctx, broken, cuda=False)
    assert rec["status"] == "failed" and "FileNotFoundError" in rec["error"]
    assert json.loads((tmp_path / "02_broken" / "step.json").read_text())["status"] == "failed"


def test_calibration_hook_calls_the_cost_model_when_present(tmp_path, monkeypatch):
    results = tmp_path / "04_bench_moe" / "results" / "NVIDIA_H100"
    results.mkdir(parents=True)
    (results / "run.json").write_text("{}")
    seen = {}

    def calibrate(measurements, out_dir=None):
        seen.update(files=measurements, out_dir=out_dir)
        return {"hbm_gbps": 3000.0}

    monkeypatch.setitem(sys.modules, "omni_fast.bench.model", types.SimpleNamespace(calibrate=calibrate))
    out = tmp_path / "06_calibrate" / "calibration.json"
    got = session_tools.calibrate(tmp_path, out, dry=False)
    assert got["status"] == "ok" and got["constants"] == {"hbm_gbps": 3000.0}
    assert seen == {"files": [results / "run.json"], "out_dir": out.parent}
    assert session_tools.calibrate(tmp_path, out, dry=True)["status"] == "ok"  # wiring only: not called again
    assert len(seen["files"]) == 1

    monkeypatch.setitem(sys.modules, "omni_fast.bench.model", None)  # the module absent: one clear skip
    got = session_tools.calibrate(tmp_path, out, dry=False)
    assert got["status"] == "skipped" and "not in this checkout" in got["reason"]


def test_bench_run_keeps_its_measurements_past_a_deadline_or_an_interrupt(tmp_path, monkeypatch):
    """``python -m omni_fast.bench --deadline-s`` (the session's bench steps): cases past the deadline get a skipped
    row, an interrupt (the time box's SIGINT) ends the run, and either way the JSON is saved with ``incomplete``;
    the per-case partial file is gone once the run is saved. GPU calls are stubbed (nothing is timed)."""
    from omni_fast.bench import harness
    from omni_fast.bench.case import Case

    meta = {"device": "Fake GPU", "torch": "x", "triton": "x", "cuda": "x", "python": "x", "commit": "abc",
            "date": "now", "preset": "quick", "peers": {}, "roofline": {"copy_gbps": 1.0, "matmul_tflops": 1.0}}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(harness, "measure_roofline", lambda device: meta["roofline"])
    monkeypatch.setattr(harness, "run_metadata", lambda device, preset, roofline: dict(meta))
    cases = [Case("rope", f"case {i}", {}, setup=None) for i in range(4)]
    clock = [0.0]  # each case takes one "second" of a fake clock: no real timing in the test
    monkeypatch.setattr(harness, "time", types.SimpleNamespace(monotonic=lambda: clock[0],
                                                               perf_counter=time.perf_counter))

    def bench_case(case, device, roofline, providers=()):
        if case.name == "case 1" and interrupt:
            raise KeyboardInterrupt
        clock[0] += 1.0
        return [{"op": case.op, "case": case.name, "provider": "omni_fast", "ms": 1.0}]

    monkeypatch.setattr(harness, "bench_case", bench_case)
    for interrupt, deadline, timed in ((False, 1.5, 2), (True, None, 1)):
        clock[0] = 0.0
        out = tmp_path / str(interrupt)
        harness.run_gpu(cases, preset="quick", out_dir=out, deadline_s=deadline)
        files = list((out / "Fake_GPU").glob("*.json"))
        assert len(files) == 1 and not files[0].name.startswith("partial-")
        result = json.loads(files[0].read_text())
        assert sum("ms" in r for r in result["rows"]) == timed
        assert ("interrupted" if interrupt else "deadline") in result["incomplete"]
        assert all("skipped" in r for r in result["rows"] if "ms" not in r) and len(result["rows"]) == 4 - interrupt


def test_tuner_reduced_search_starts_next_to_the_fallback_heuristic():
    from omni_fast.bench import tune_moe

    space = tune_moe.search_space(False, 64, True, 2)
    default = dict(BLOCK_SIZE_N=64, BLOCK_SIZE_K=64, GROUP_SIZE_M=8, num_warps=8, num_stages=3)
    picked = tune_moe.nearest_first(space, default, 12)
    assert len(picked) == 12 and all(tune_moe.nearest_first(space, default, None)[i] == space[i] for i in range(3))
    assert all(p[k] == v for p in picked[:2] for k, v in default.items())  # the default itself, both weight paths
    assert {p["USE_TMA"] for p in picked[:2]} == {False, True}


def test_list_files_skip_optional_ids_until_their_test_exists(tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("# a comment\n\ntests/test_rope.py::test_kernel_edge_token_counts  # kept\n"
                   "?tests/test_rope.py::test_kernel_random_shapes[x]\n?tests/test_rope.py::test_not_there\n"
                   "?tests/test_nowhere.py::test_x\n")
    assert session_tools.read_ids(ids) == ["tests/test_rope.py::test_kernel_edge_token_counts",
                                           "tests/test_rope.py::test_kernel_random_shapes[x]"]


def test_memcheck_step_probes_the_sanitizer_first(tmp_path):
    """The memcheck step starts with a 5-second sanitizer probe; where the sanitizer refuses the device (gVisor
    machines: "Device not supported"), the step ends at once and its summary says "unavailable" (skipped), not a
    test failure, so the session keeps its time for the rest."""
    ctx = session.Ctx(dry=False, work=tmp_path, py=sys.executable, scale=1.0)
    argv = session._memcheck_step(ctx, tmp_path)
    assert argv[:2] == ["bash", "-c"] and argv[2].count("compute-sanitizer") == 2
    assert argv[2].index("probe.log") < argv[2].index("exec compute-sanitizer")
    (tmp_path / "log.txt").write_text(f"{session.SANITIZER_UNAVAILABLE} (probe exit 255)\n"
                                      "========= Error: Device not supported\n")
    got = session_tools.summarize_memcheck(ctx, tmp_path, {"status": "failed"})
    assert got["status"] == "skipped" and got["sanitizer"] == "unavailable"
    assert "Device not supported" in got["reason"]


def test_a_python_without_torch_is_named_before_any_install(tmp_path):
    """``bash scripts/gpu_session.sh first-light --dry-run`` with the default ``python3`` lacking torch: one line
    naming PYTHON, exit 2 (it pip-installed omni-fast into that python and failed inside its setuptools)."""
    env = dict(os.environ, PYTHON="false", OUT=str(tmp_path / "out"))
    res = subprocess.run(["bash", "scripts/gpu_session.sh", "first-light", "--dry-run"], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "set PYTHON" in res.stderr, res.stdout + res.stderr
    assert not (tmp_path / "out" / "install.log").exists()


@pytest.mark.parametrize("args,match", [(["--steps", "99"], "has the steps"), (["--steps", "x"], "step numbers"),
                                        (["--time-scale", "0"], "positive"), (["--time-scale", "nan"], "positive")])
def test_bad_steps_or_time_scale_are_refused_before_any_step(args, match, tmp_path, capsys, monkeypatch):
    """``--steps 99`` / ``--steps x`` ended in a traceback; ``--time-scale 0`` (or negative, NaN) ran every step into
    an instant "timeout": each a device call lost. Now an argparse error (exit 2) before any step."""
    monkeypatch.setattr(session, "run_session", lambda *a, **k: pytest.fail("the session started"))
    with pytest.raises(SystemExit) as exc:
        session.main(["first-light", "--dry-run", "--out", str(tmp_path), *args])
    assert exc.value.code == 2 and match in capsys.readouterr().err
