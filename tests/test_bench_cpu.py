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


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the CPU-only path")
def test_bench_cli_on_cpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    res = subprocess.run([sys.executable, "-m", "bench", "rope", "--preset", "quick"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "speed needs a GPU" in out
    assert "thinker rope T=1 " in out and "FAIL" not in out
    assert "Checks: all passed" in out
    assert "Static sm_90a check: PASS" in out


def test_bench_rejects_unknown_op():
    res = subprocess.run([sys.executable, "-m", "bench", "no_such_op"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode != 0 and "unknown op family" in res.stdout + res.stderr


def test_result_writers(tmp_path, monkeypatch):
    from bench import harness

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
