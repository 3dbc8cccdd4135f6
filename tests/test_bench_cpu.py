"""Smoke test of the benchmark CLI on a CPU-only machine: it says timing needs a GPU, checks the rope kernels under
the interpreter and prints the static sm_90a report. Also the result writers (markdown, JSON, PNG) on a fake run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `bench` is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the CPU-only path")
def test_bench_cli_on_cpu():
    # The static report is left out here: tests/test_static_sm90.py runs the same check (and it takes a while).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    res = subprocess.run([sys.executable, "-m", "omni_fast.bench", "rope", "--preset", "quick", "--no-static",
                          "--providers", "eager"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "--providers eager: not used without a GPU" in out  # (was ignored silently)
    assert "speed needs a GPU" in out
    assert "thinker rope T=1 " in out and "FAIL" not in out
    assert "Checks: all passed" in out
    assert "Static sm_90a check" not in out


def test_bench_rejects_unknown_op():
    res = subprocess.run([sys.executable, "-m", "omni_fast.bench", "no_such_op"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode != 0 and "unknown op family" in res.stdout + res.stderr


def test_result_writers(tmp_path, monkeypatch):
    from omni_fast.bench import harness

    rows = [{"op": "rope", "case": "thinker rope T=1", "provider": p, "ms": ms, "tflops": 0.1, "gbps": g,
             "pct_roofline": g / 30, "bound": "memory", "omni_fast_speedup": ms / 0.01}
            for p, ms, g in (("eager", 0.05, 100.0), ("omni_fast", 0.01, 500.0))]
    rows.append({"op": "rope", "case": "thinker rope T=1", "provider": "compile", "error": "RuntimeError: x"})
    result = {"device": "Fake GPU", "torch": torch.__version__, "triton": "x", "commit": "abc", "date": "today",
              "preset": "quick", "roofline": {"copy_gbps": 3000.0, "matmul_tflops": 800.0}, "rows": rows}
    path = harness.save(result, tmp_path)
    assert json.loads(path.read_text())["rows"][0]["provider"] == "eager"
    md = path.with_suffix(".md").read_text()
    assert "| thinker rope T=1 | eager | 50.00 |" in md and "error" in md
    assert path.with_suffix(".png").stat().st_size > 0
    assert "5.00" in harness.format_row(rows[0])  # omni_fast is 5x faster than eager


def test_units_give_time_per_unit_rtf_and_throughput(tmp_path):
    """Case.units -> ms per unit, and for audio seconds the RTF and audio seconds per second, in the JSON rows and
    the markdown table."""
    from omni_fast.bench import harness

    assert harness.unit_fields({"code": 10, "audio_s": 0.8}, 2.0) == {"ms_per_code": 0.2, "rtf": 0.0025,
                                                                    "audio_s_per_s": 400.0}
    assert harness.unit_fields({"frame": 4}, 1.0) == {"ms_per_frame": 0.25}
    row = {"op": "code2wav", "case": "stream chunk=10 B=1", "provider": "omni_fast", "ms": 2.0,
           **harness.unit_fields({"code": 10, "audio_s": 0.8}, 2.0)}
    plain = {"op": "rope", "case": "rope T=1", "provider": "eager", "ms": 0.01}
    result = {"device": "Fake GPU", "torch": "x", "triton": "x", "commit": "abc", "date": "today", "preset": "quick",
              "roofline": {"copy_gbps": 3000.0, "matmul_tflops": 800.0}, "rows": [row, plain]}
    md = harness.save(result, tmp_path).with_suffix(".md").read_text()
    assert "| 0.2 ms/code | 0.0025 | 400 |" in md
    assert "| rope T=1 | eager | 10.00 |" in md and "| - | - | - |" in md  # no units: empty cells
    assert "0.2 ms/code" in harness.format_row(row)


def test_gpu_pipeline_with_fake_events(tmp_path, monkeypatch, capsys):
    """run_gpu end to end on the CPU with a fake CUDA clock: rows, ratios, table and files (no real timing)."""
    import time

    from omni_fast.bench import harness
    from omni_fast.bench.case import Case, Unavailable

    class FakeEvent:
        def __init__(self, **kw):
            self.t = 0.0

        def record(self):
            self.t = time.perf_counter()

        def elapsed_time(self, other):
            return (other.t - self.t) * 1e3

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(harness, "_sync", lambda: None)
    monkeypatch.setattr(harness, "_gpu_sleep", lambda ms: None)
    monkeypatch.setattr(harness, "measure_roofline", lambda d: {"copy_gbps": 3000.0, "matmul_tflops": 800.0})
    monkeypatch.setattr(harness, "TARGET_MS", 1.0)

    def setup(device):
        x = torch.randn(64)

        def broken():
            raise RuntimeError("peer not available")

        return {"eager": lambda: x.add(1), "omni_fast": lambda: x.add_(0), "broken": broken,
                "peer": Unavailable("needs the peer")}  # a "skipped" row with its reason, never called

    case = Case(op="toy", name="toy T=64", params={"T": 64}, setup=setup, flops=64.0, bytes=512.0,
                units={"code": 8, "audio_s": 0.64})
    rc = harness.run_gpu([case], preset="quick", out_dir=tmp_path)
    out = capsys.readouterr().out
    assert rc == 1  # the broken provider is reported as an error
    assert "toy T=64" in out and "omni_fast" in out and "error" in out
    (saved,) = (tmp_path / "Fake_GPU").glob("*.json")
    rows = {r["provider"]: r for r in json.loads(saved.read_text())["rows"]}
    assert rows["omni_fast"]["omni_fast_speedup"] == 1.0
    assert rows["eager"]["gbps"] > 0 and "pct_roofline" in rows["eager"] and "error" in rows["broken"]
    assert rows["eager"]["ms_per_code"] == rows["eager"]["ms"] / 8 and rows["eager"]["units"]["code"] == 8
    assert rows["eager"]["rtf"] * rows["eager"]["audio_s_per_s"] == pytest.approx(1.0)
    assert rows["peer"]["skipped"] == "needs the peer" and "ms" not in rows["peer"] and "error" not in rows["peer"]
    assert "| toy T=64 | peer | skipped |" in saved.with_suffix(".md").read_text()
    assert saved.with_suffix(".png").is_file() and saved.with_suffix(".md").is_file()
    # a mistyped --providers name: the run fails and says so (it gave an empty, "clean" run)
    assert harness.run_gpu([case], preset="quick", providers=["eager", "eagr"], out_dir=tmp_path / "typo") == 1
    assert "no case has the provider(s) ['eagr']" in capsys.readouterr().out
    assert harness.run_gpu([case], preset="quick", providers=["eager"], out_dir=tmp_path / "ok") == 0


def test_peers_are_optional():
    from omni_fast.bench import peers

    assert set(peers.versions()) <= set(peers.PEER_WHEELS)
    if not torch.cuda.is_available():
        assert peers.liger_fused_moe() is None  # a peer is left out, never an error


@pytest.mark.gpu
def test_liger_peer_computes_the_same_moe():
    """The carried liger-kernel fused MoE computes what omni-fast computes (so the bench compares like for like)."""
    from omni_fast.bench import peers
    from omni_fast import ops

    liger = peers.liger_fused_moe()
    if liger is None:
        pytest.skip("liger-kernel wheel not carried (make peer-wheels)")
    T, E, k, H, I = 33, 16, 4, 256, 128
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    w13 = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) * H ** -0.5
    w2 = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) * I ** -0.5
    w, ids = ops.route_topk(torch.randn(T, E, device="cuda"), k)
    w = w.to(torch.bfloat16)
    torch.testing.assert_close(liger(x, w13, w2, w, ids), ops.moe_experts(x, w13, w2, w, ids), rtol=2e-2, atol=2e-2)


def test_static_check_filter_matching_nothing_fails():
    """`python -m omni_fast.bench.static_check NAME...` compiles only matching specialisations; a filter that matches none is
    an error (a typo must not print PASS), and the bench's own arguments never reach it."""
    from omni_fast.bench import static_check

    assert static_check.main(["no-such-kernel-name"]) == 1


@pytest.mark.parametrize("jobs", ["0", "-3", "two"])
def test_static_check_jobs_must_be_a_positive_integer(jobs, capsys):
    from omni_fast.bench import static_check

    with pytest.raises(SystemExit) as exit_:
        static_check._cli(["--jobs", jobs, "mtp_frame"])
    assert exit_.value.code == 2 and "argument --jobs/-j: must be a positive integer" in capsys.readouterr().err


def test_statics_names_matching_nothing_are_an_error(capsys):
    """`python -m omni_fast.bench.costmodel.statics NAME` with a name no specialisation has printed {} and exit 0."""
    from omni_fast.bench.costmodel import statics

    assert statics.main(["no-such-kernel-name"]) == 2
    assert "no-such-kernel-name" in capsys.readouterr().err


def test_compiled_providers_do_not_keep_their_case_alive():
    import gc
    import weakref

    from omni_fast.bench.cases import _compile

    class Weights:  # stands for a case copy's weights, held by the provider closure
        pass

    w = Weights()
    ref = weakref.ref(w)
    fn = _compile.compiled(lambda x, w=w: x + 1, "cpu")
    del fn, w
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("bad", ["nan", "inf", "-5", "0", "soon"])
def test_bench_deadline_must_be_a_positive_number(bad, capsys):
    """``--deadline-s nan`` never fired and ``-5`` skipped every case of a GPU run: both were accepted."""
    from omni_fast.bench.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["rope", "--list", "--deadline-s", bad])
    assert exit_.value.code == 2 and "--deadline-s: must be a positive number of seconds" in capsys.readouterr().err


def test_bench_out_must_be_a_folder(tmp_path, capsys):
    """``--out FILE`` failed with a NotADirectoryError traceback after the roofline measurement of a GPU run."""
    from omni_fast.bench.__main__ import main

    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as exit_:
        main(["rope", "--list", "--out", str(tmp_path / "a_file" / "sub")])
    assert exit_.value.code == 2 and "--out" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the CPU-only path")
def test_bench_says_which_options_a_run_without_timing_does_not_use(tmp_path, capsys):
    """Without a GPU (and with --list) nothing is timed or saved: --out and --deadline-s were ignored silently."""
    from omni_fast.bench.__main__ import main

    assert main(["rope", "--list", "--out", str(tmp_path / "res"), "--deadline-s", "60", "--providers", "eager"]) == 0
    out = capsys.readouterr().out
    assert "--out, --deadline-s, --providers: not used with --list" in out and not (tmp_path / "res").exists()
