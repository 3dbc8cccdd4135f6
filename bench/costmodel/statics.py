"""sm_90a compile facts per Triton kernel, through :mod:`omni_fast.bench.static_check`'s compile path.

``facts(only)`` -> ``{case name: {...}}`` with ``kernel`` (the jit function's name, the key the launch counter
uses), registers, spill bytes, shared memory, warps, occupancy (CTAs per SM), the tensor-core instruction
(``wgmma m64nNk16`` with its widest N, ``mma.sync``, or ``fma``) and TMA. Compiling needs real ``triton.jit``
functions, so under ``TRITON_INTERPRET=1`` it runs itself in a subprocess without the interpreter.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

from omni_fast._layout import REPO_ROOT

from .constants import current


def occupancy(regs: int, smem: int, warps: int) -> int:
    """Resident CTAs per SM on sm_90 from registers per thread, shared bytes per CTA and warps per CTA (CUDA
    occupancy rules: registers allocated per warp in 256-register units, 1 KB of shared memory reserved per CTA)."""
    c = current()
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = c.regs_per_sm // (regs_per_warp * warps)
    by_smem = c.smem_per_sm // (smem + 1024) if smem else c.max_ctas_per_sm
    by_threads = c.max_threads_per_sm // (32 * warps)
    return int(max(0, min(by_regs, by_smem, by_threads, c.max_ctas_per_sm)))


def tensor_core(ptx: str) -> str:
    """The dot instruction a compiled kernel's PTX uses: ``"wgmma m64nNkK"`` (the widest N it issues),
    ``"mma.sync"``, or ``"fma"`` when neither appears."""
    shapes = re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k(\d+)", ptx)
    if shapes:
        n, k = max((int(n), int(k)) for n, k in shapes)
        return f"wgmma m64n{n}k{k}"
    if "mma.sync" in ptx:
        return "mma.sync"
    return "fma"


def _compile_all(only: list[str]) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    from omni_fast.bench import static_check as sc
    from omni_fast.kernels.launch import STATIC_CASES

    sc.import_kernel_modules()
    out = {}
    for case in STATIC_CASES:
        if only and not any(s in case.name for s in only):
            continue
        fn = sc._jit_function(case.kernel)
        row = {"kernel": fn.__name__, "num_warps": case.num_warps, "num_stages": case.num_stages}
        try:
            src = triton.compiler.ASTSource(fn=fn, signature=case.signature, constexprs=case.constexprs,
                                            attrs=case.attrs(fn.arg_names))
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": case.num_warps, "num_stages": case.num_stages})
            ptx = compiled.asm["ptx"]
            regs, spill, static_smem = sc._ptxas_usage(ptx)
            smem = int(getattr(compiled.metadata, "shared", 0) or 0) + static_smem
            row.update(regs=regs, spill_bytes=spill, smem=smem, occupancy=occupancy(regs, smem, case.num_warps),
                       tensor_core=tensor_core(ptx), tma="cp.async.bulk.tensor" in ptx)
        except Exception as exc:  # reported, and failed by the gate
            row["error"] = f"{type(exc).__name__}: {str(exc).strip()[:200]}"
        out[case.name] = row
    return out


def facts(only: list[str] | None = None) -> dict:
    """``{static case name: facts}`` for every registered specialisation (or those whose name contains one of
    ``only``)."""
    from omni_fast.backend import triton_interpreter_enabled

    only = list(only or [])
    if not triton_interpreter_enabled():
        return _compile_all(only)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "omni_fast.bench.costmodel.statics", *only], env=env, cwd=REPO_ROOT,
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise ValueError(res.stderr.strip().splitlines()[-1] if res.stderr.strip() else
                         f"statics exited with {res.returncode}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def by_kernel(all_facts: dict) -> dict[str, dict]:
    """One row per kernel function: the specialisation with the most registers (the worst case the model uses),
    with ``cases`` listing every specialisation's name."""
    out: dict[str, dict] = {}
    for name, row in all_facts.items():
        k = row["kernel"]
        prev = out.get(k)
        if prev is None or row.get("regs", 1 << 30) > prev.get("regs", -1):
            out[k] = dict(row, case=name, cases=(prev or {}).get("cases", []))
        out[k]["cases"] = out[k].get("cases", []) + [name]
    return out


def main(argv: list[str]) -> int:
    """``python -m omni_fast.bench.costmodel.statics [NAME...]``: the sm_90a facts of the registered
    specialisations whose name contains a NAME (all when none) as one JSON line, to merge into
    bench/results/model/static_sm90a.json. Runs with or without ``TRITON_INTERPRET=1`` (the compile itself runs in
    a process without it: under the interpreter every row would be an error)."""
    if any(a in ("-h", "--help") for a in argv):
        print(main.__doc__)
        return 0
    try:
        found = facts(argv)
        missing = [a for a in argv if not any(a in name for name in found)]
        if missing:  # a typo printed {} with exit 0: nothing to merge, and no word why
            raise ValueError(f"statics: no registered specialisation name contains {missing}")
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    print(json.dumps(found))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
