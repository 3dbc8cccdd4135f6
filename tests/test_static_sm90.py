"""The sm_90a static check (``python -m omni_fast.bench.static_check``) passes: every registered Triton kernel compiles for
Hopper without spills and within the H100's shared memory. Runs in a subprocess without ``TRITON_INTERPRET``
(the compile needs real ``triton.jit`` functions); needs no GPU."""

import json
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
    # --jobs: one compile process per core; the report (order, rows, verdict) is the same as with one. It saves wall
    # time where a core is free (`make test` runs its compat + wheel part on the second core beside the suite)
    res = subprocess.run([sys.executable, "-m", "omni_fast.bench.static_check", "--jobs", str(os.cpu_count() or 1)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
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


def _ptx_matches(module: str, *name_parts: str, pattern: str) -> dict[str, list[str]]:
    """{static case name: sorted distinct matches of ``pattern`` in its sm_90a PTX} for the registered cases of
    ``omni_fast.kernels.<module>`` whose name holds every one of ``name_parts`` (compiled in a subprocess without
    the interpreter)."""
    code = (
        "import json, re, triton\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from omni_fast.bench.static_check import _jit_function\n"
        f"from omni_fast.kernels import {module}\n"
        "from omni_fast.kernels.launch import STATIC_CASES\n"
        "out = {}\n"
        "for c in STATIC_CASES:\n"
        f"    if all(p in c.name for p in {list(name_parts)!r}):\n"
        "        fn = _jit_function(c.kernel)\n"
        "        src = triton.compiler.ASTSource(fn=fn, signature=c.signature, constexprs=c.constexprs,\n"
        "                                        attrs=c.attrs(fn.arg_names))\n"
        "        k = triton.compile(src, target=GPUTarget('cuda', 90, 32),\n"
        "                           options={'num_warps': c.num_warps, 'num_stages': c.num_stages})\n"
        f"        out[c.name] = sorted(set(re.findall({pattern!r}, k.asm['ptx'])))\n"
        "print('RESULT', json.dumps(out))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("OMP_NUM_THREADS", "1")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT "))[7:])


def test_quantized_moe_gemm_issues_fp8_wgmma_at_prefill_tiles():
    """FP8 W8A8 GEMMs (block and per channel) use Hopper's e4m3 wgmma at the prefill tiles (BLOCK_M 64); INT4 bf16."""
    found = _ptx_matches("moe_gemm_quant", "moe_gemm_quant_kernel", "prefill", pattern=r"wgmma\.mma_async\S*")
    lines = [f"{name} {wgmma}" for name, wgmma in found.items()]
    fp8 = [ln for ln in lines if "fp8_block" in ln or "fp8_channel" in ln]
    int4 = [ln for ln in lines if "int4_w4a16" in ln]
    assert fp8 and int4, found
    assert all(".e4m3.e4m3" in ln for ln in fp8), fp8
    assert all(".bf16.bf16" in ln for ln in int4), int4


def test_pdl_phases_issue_griddepcontrol():
    """The fused decode phases compiled with PDL prefetch their weights into L2, then griddepcontrol.wait and
    launch_dependents (Hopper programmatic dependent launch); without it, none of these is emitted (the default
    launch is unchanged)."""
    found = _ptx_matches("talker_fused", "_phase_kernel", "talker",
                         pattern=r"griddepcontrol\.\w+|prefetch\.global\.L2")
    rows = [(name, " ".join(m)) for name, m in found.items()]
    assert len(rows) == 6, found
    for name, found in rows:
        # PDL: the wait, the trigger, and the weight prefetch into L2 ahead of the wait
        want = ("griddepcontrol.launch_dependents griddepcontrol.wait prefetch.global.L2" if name.endswith(",pdl]")
                else "")
        assert found.strip() == want, (name, found)
