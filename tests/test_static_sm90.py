"""The sm_90a static check (``python -m omni_fast.bench.static_check``) passes: every registered Triton kernel compiles for
Hopper without spills and within the H100's shared memory. Runs in a subprocess without ``TRITON_INTERPRET``
(the compile needs real ``triton.jit`` functions); needs no GPU."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `bench` is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))


def test_static_sm90_check_passes():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("OMP_NUM_THREADS", "1")
    res = subprocess.run([sys.executable, "-m", "omni_fast.bench.static_check"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "Static sm_90a check: PASS" in out
    assert "mrope_kernel[bf16,D128,norm=True]" in out
    # The MoE GEMM's TMA weight path really issues bulk tensor copies (the "tma" column), the pointer path none.
    rows = re.findall(r"^\s*(moe_gemm_kernel\[[^\]]*,(tma|ptr)\]).*\s(yes|no)\s+ok$", out, re.M)
    assert {path for _, path, _ in rows} == {"tma", "ptr"}, rows
    assert all((path == "tma") == (tma == "yes") for _, path, tma in rows), rows
    assert len(rows) == out.count("moe_gemm_kernel[")  # every GEMM case passed (a failing row has no tma column)


def test_report_flags_spills_and_shared_memory():
    from omni_fast.bench.static_check import H100_SMEM_LIMIT, Report, parse_ptxas_log

    log = ("ptxas info    : Function properties for k\n    0 bytes stack frame, 16 bytes spill stores, 8 bytes spill "
           "loads\nptxas info    : Used 255 registers, used 1 barriers, 1024 bytes smem, 400 bytes cmem[0]\n")
    assert parse_ptxas_log(log) == (255, 24, 1024)
    assert Report("ok", regs=96, spill_bytes=0, smem=H100_SMEM_LIMIT).ok
    assert not Report("spill", regs=255, spill_bytes=24, smem=0).ok
    assert not Report("smem", regs=96, spill_bytes=0, smem=H100_SMEM_LIMIT + 1).ok
    assert not Report("broken", error="CompilationError: x").ok
