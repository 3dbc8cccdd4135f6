"""Static sm_90a check: compile every registered Triton kernel for Hopper on any machine (no GPU needed).

``python -m omni_fast.bench.static_check [NAME_SUBSTRING...] [--jobs N]`` imports every ``kernels/*.py`` module (each registers its
specialisations with :func:`omni_fast.kernels.launch.static_case`), compiles each (or those whose name contains a
given substring) with ``triton.compile(..., target=GPUTarget("cuda", 90, 32))`` and reports per kernel: registers
per thread, spilled bytes, shared memory per block and whether the code uses Hopper's ``wgmma`` tensor-core
instructions and its TMA bulk tensor copies (``cp.async.bulk.tensor``). Exit status 1 when a kernel fails to
compile, spills, or needs more shared memory than an H100 block may have (227 KB). ``--jobs N`` compiles in N
forked processes (the GPU session's static step: ~240 specialisations in its 60 s box).

Registers and spills come from ``ptxas -v`` (the ptxas Triton itself uses) run on the generated PTX: reading
``CompiledKernel.n_regs`` would need a CUDA driver. The compile needs real ``triton.jit`` functions, so under
``TRITON_INTERPRET=1`` this module re-runs itself in a subprocess with the interpreter switched off.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from omni_fast._layout import REPO_ROOT

H100_SMEM_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90 (opt-in maximum)


@dataclass
class Report:
    """One static case's sm_90a facts from compiling it (registers per thread, spill bytes, shared memory per
    block, wgmma / TMA use) or its compile error; :attr:`ok` is no error, no spill and shared memory in the limit."""

    name: str
    regs: int | None = None
    spill_bytes: int | None = None  # spill stores + spill loads, bytes per thread
    smem: int | None = None  # Triton's dynamic shared memory + ptxas' static shared memory, bytes per block
    wgmma: bool = False
    tma: bool = False  # the PTX has TMA bulk tensor copies (kernels that load through tensor descriptors)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and not self.spill_bytes and (self.smem or 0) <= H100_SMEM_LIMIT

    def problems(self) -> str:
        if self.error:
            return self.error
        out = []
        if self.spill_bytes:
            out.append(f"spills {self.spill_bytes} B")
        if (self.smem or 0) > H100_SMEM_LIMIT:
            out.append(f"shared memory {self.smem} B > {H100_SMEM_LIMIT} B")
        return ", ".join(out)


def _ptxas() -> str:
    """Path of the ptxas Triton uses for sm_90 (its API moved between Triton versions)."""
    from triton.backends.nvidia import compiler as nv

    try:
        tool = nv.get_ptxas(90)
    except TypeError:  # older Triton: get_ptxas() without an arch
        tool = nv.get_ptxas()
    # A knobs.NvidiaTool (.path) in recent Triton, a (path, version) tuple in older ones.
    return tool.path if hasattr(tool, "path") else tool[0]


def _ptxas_usage(ptx: str) -> tuple[int, int, int]:
    """(registers, spill bytes, static shared bytes) from ``ptxas -v --gpu-name sm_90a``."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "k.ptx")
        src.write_text(ptx)
        res = subprocess.run([_ptxas(), "-v", "--gpu-name", "sm_90a", str(src), "-o", str(Path(tmp, "k.cubin"))],
                             capture_output=True, text=True)
    log = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed: {log.strip()[-500:]}")
    return parse_ptxas_log(log)


def parse_ptxas_log(log: str) -> tuple[int, int, int]:
    """(registers, spill bytes, static shared bytes) from a ``ptxas -v`` log of one kernel."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    smem = re.search(r"(\d+) bytes smem", log)
    return int(regs.group(1)) if regs else 0, sum(spills), int(smem.group(1)) if smem else 0


def _jit_function(kernel):
    """Unwrap autotuner / heuristics wrappers down to the ``triton.jit`` function."""
    while hasattr(kernel, "fn") and not hasattr(kernel, "arg_names"):
        kernel = kernel.fn
    return kernel


def compile_case(case) -> Report:
    """Compile one registered static case (``omni_fast.kernels.launch.static_case``: kernel, signature,
    constexprs, warps, stages) for sm_90a and read its :class:`Report` from the PTX and ptxas; an error is
    reported in it, never raised."""
    import triton
    from triton.backends.compiler import GPUTarget

    rep = Report(case.name)
    try:
        fn = _jit_function(case.kernel)
        src = triton.compiler.ASTSource(fn=fn, signature=case.signature, constexprs=case.constexprs,
                                        attrs=case.attrs(fn.arg_names))
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": case.num_warps, "num_stages": case.num_stages})
        ptx = compiled.asm["ptx"]
        rep.regs, rep.spill_bytes, static_smem = _ptxas_usage(ptx)
        rep.smem = int(getattr(compiled.metadata, "shared", 0) or 0) + static_smem
        rep.wgmma = "wgmma" in ptx
        rep.tma = "cp.async.bulk.tensor" in ptx
    except Exception as exc:  # report every kernel, then fail at the end
        rep.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
    return rep


def import_kernel_modules() -> list[str]:
    """Import every ``omni_fast.kernels.<stem>`` so its ``static_case`` registrations run; returns import errors."""
    import omni_fast.kernels

    errors = []
    for path in sorted(p for folder in omni_fast.kernels.__path__ for p in Path(folder).glob("*.py")):
        if path.stem.startswith("_"):
            continue
        try:
            importlib.import_module(f"omni_fast.kernels.{path.stem}")
        except Exception as exc:
            errors.append(f"omni_fast.kernels.{path.stem}: {type(exc).__name__}: {exc}")
    return errors


def _compile_at(index: int) -> Report:
    """Compile ``STATIC_CASES[index]`` (a forked worker inherits the registrations: only an index crosses over)."""
    from omni_fast.kernels.launch import STATIC_CASES

    return compile_case(STATIC_CASES[index])


def compile_all(cases, jobs: int = 1):
    """Yields the reports of ``cases`` (entries of ``STATIC_CASES``) in order, as they are compiled (in ``jobs``
    forked processes when > 1), so a run cut off by a time box still printed what it finished."""
    if jobs <= 1 or len(cases) <= 1:
        yield from (compile_case(c) for c in cases)
        return
    import multiprocessing

    from omni_fast.kernels.launch import STATIC_CASES

    index = {id(c): i for i, c in enumerate(STATIC_CASES)}
    with multiprocessing.get_context("fork").Pool(min(jobs, len(cases))) as pool:
        yield from pool.imap(_compile_at, [index[id(c)] for c in cases], chunksize=1)


def run(only: list[str] | None = None, jobs: int = 1) -> int:
    """Compile and print the report; returns the exit status (0 = every kernel passes). ``only``: compile just the
    specialisations whose name contains one of these substrings; ``jobs``: processes compiling in parallel."""
    from omni_fast.kernels.launch import STATIC_CASES

    errors = import_kernel_modules()
    cases = [c for c in STATIC_CASES if not only or any(s in c.name for s in only)]
    if only and not cases:
        print(f"Static sm_90a check: no kernel specialisation name contains any of {only}")
        return 1
    print(f"Static sm_90a check: {len(cases)} kernel specialisations (limit {H100_SMEM_LIMIT // 1024} KB shared "
          f"memory per block, no spills)", flush=True)
    width = max([len(c.name) for c in cases] + [6])
    print(f"  {'kernel':<{width}}  {'regs':>4}  {'spill B':>7}  {'smem B':>7}  wgmma  {'tma':>3}  result", flush=True)
    reports = []
    for r in compile_all(cases, jobs):
        reports.append(r)
        if r.error:
            print(f"  {r.name:<{width}}  {'-':>4}  {'-':>7}  {'-':>7}  {'-':>5}  {'-':>3}  FAIL {r.problems()}")
        else:
            verdict = "ok" if r.ok else f"FAIL {r.problems()}"
            print(f"  {r.name:<{width}}  {r.regs:>4}  {r.spill_bytes:>7}  {r.smem:>7}  {'yes' if r.wgmma else 'no':>5}"
                  f"  {'yes' if r.tma else 'no':>3}  {verdict}", flush=True)
    for e in errors:
        print(f"  FAIL import {e}")
    failed = sum(not r.ok for r in reports) + len(errors)
    print(f"Static sm_90a check: {'PASS' if not failed else f'FAIL ({failed} problems)'}")
    return 1 if failed else 0


def run_in_subprocess(only: list[str], jobs: int = 1) -> int:
    """Run the check in a fresh interpreter without ``TRITON_INTERPRET`` (needed for real JIT functions)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    sys.stdout.flush()
    return subprocess.run([sys.executable, "-m", "omni_fast.bench.static_check", *only, "--jobs", str(jobs)],
                          env=env, cwd=REPO_ROOT).returncode


def main(only: list[str] | None = None, jobs: int = 1) -> int:
    """The check over every specialisation, or those whose name contains one of ``only``."""
    from omni_fast.backend import triton_interpreter_enabled

    only = list(only or [])
    if triton_interpreter_enabled():
        return run_in_subprocess(only, jobs)
    return run(only, jobs)


def _cli(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m omni_fast.bench.static_check")
    parser.add_argument("only", nargs="*", help="compile only specialisations whose name contains one of these")
    from omni_fast.bench.cli_paths import positive_int

    parser.add_argument("--jobs", "-j", type=positive_int, default=1, help="compile in this many processes (>= 1)")
    args = parser.parse_args(argv)
    return main(args.only, args.jobs)


if __name__ == "__main__":
    sys.exit(_cli(sys.argv[1:]))
