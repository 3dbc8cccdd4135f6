"""The quantized mode of :mod:`omni_fast.bench.tune_moe` (``--format fp8_block|fp8_channel|int4_w4a16``).

    python -m omni_fast.bench.tune_moe --format fp8_block --n 768 384 --tokens 4096 1 64 8 --max-configs 12

Random float experts at the real shapes (``tune_moe.SHAPES``: thinker E=128 top-8 N=768 H=2048, talker E=128
top-6 N=384 H=1024) are quantized once per bucket with :func:`omni_fast.reference.moe_quant.quantize_experts`
(fp8_block: ``--block`` bn bk, default 128 128; int4_w4a16: ``--group-size`` g, default 128, asymmetric: the
AWQ-style general case with zero points; fp8_channel: per-row scales, dynamic per-token activations) and the two
grouped GEMMs of :mod:`omni_fast.kernels.moe_gemm_quant` are timed exactly as the bf16 ones. The file is named
with the format's tag (``moe_gemm_quant.config_key``), e.g.
``E=128,N=768,dtype=fp8_w8a8,block_shape=[128,128],device=NVIDIA_H100_80GB_HBM3,triton=3.6.0.json``, which is
what the quantized kernel's lookup (``moe_gemm.get_config`` with the tag as the dtype) reads.

Search space (:func:`search_space`), the kernel's tile constraints (``moe_gemm_quant.adjust_config`` applies them
at run time, so every candidate is a fixed point of it: what is timed is what runs):

- fp8_block: ``BLOCK_SIZE_K`` = the block's ``bk`` (one activation group and one weight-scale column per K tile);
- int4_w4a16: ``BLOCK_SIZE_K`` in 32 / 64 / 128, dividing the group (one scale and zero point per column per tile;
  a file tuned at g=128 serves g=32 too, its K tiles clamped to the group at run time);
- fp8_channel: ``BLOCK_SIZE_K`` 64 / 128 / 256 (its scales are constant along K);
- no TMA (the quantized kernel loads its weights through pointers).

Pruning: first shared memory per stage (A tile in the activation dtype, B tiles at 1 byte (fp8) or half a byte
(int4) per weight) against the H100's 227 KB, then the sm_90a static compile (:func:`static_prune`, no GPU needed:
``omni_fast.bench.static_check``'s compile + ``ptxas -v``) drops every candidate that spills registers, needs more
shared memory than an H100 block may have, or does not compile. Its facts depend only on the tile constants, not
on the shapes, so each candidate is compiled once per run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from omni_fast._layout import REPO_ROOT
from omni_fast.bench import tune_moe  # the shared search axes and shared-memory rule (no import cycle: it
                                      # imports this module only inside its --format setup)

FORMATS = ("fp8_block", "fp8_channel", "int4_w4a16")
ALIASES = {"int4": "int4_w4a16", "fp8": "fp8_block"}
SMEM_LIMIT = tune_moe.SMEM_LIMIT
# bytes per weight in shared memory (int4: packed int32 words, 8 weights per 4 bytes)
_WEIGHT_BYTES = {"fp8_block": 1.0, "fp8_channel": 1.0, "int4_w4a16": 0.5}


def group_k(fmt: str, block=(128, 128), group_size: int = 128) -> int:
    """The K granularity of the scales: fp8_block's ``bk``, int4's group, 0 for fp8_channel (none)."""
    return {"fp8_block": block[1], "int4_w4a16": group_size}.get(fmt, 0)


def k_tiles(fmt: str, gk: int, quick: bool) -> tuple[int, ...]:
    """The ``BLOCK_SIZE_K`` values the kernel accepts for ``fmt`` (see the module docstring)."""
    if fmt == "fp8_block":
        return (gk,)
    if fmt == "int4_w4a16":
        return tuple(bk for bk in (32, 64, 128) if bk <= gk and gk % bk == 0) or (gk,)
    return tune_moe.tile_axes(quick)["BLOCK_SIZE_K"]  # fp8_channel: the unquantized tuner's


def smem_bytes(cfg: dict, gated: bool, fmt: str, act_elem: int) -> float:
    """Shared memory of the software pipeline: ``num_stages`` x (A tile + one or two B tiles)."""
    return tune_moe.pipeline_smem(cfg, gated, act_elem, _WEIGHT_BYTES[fmt])


def search_space(fmt: str, gk: int, quick: bool, block_m: int, gated: bool, act_elem: int) -> list[dict]:
    """The candidates for one GEMM of ``fmt`` (``gk``: :func:`group_k`), pruned by :func:`smem_bytes`: the
    unquantized tuner's axes (:func:`omni_fast.bench.tune_moe.tile_axes`) with ``BLOCK_SIZE_K`` from
    :func:`k_tiles`, ``BLOCK_SIZE_N`` 16 too in the full space (narrow tiles suit the smaller weights), and
    pointer loads only (``USE_TMA=False``: the quantized kernel has no TMA path)."""
    axes = dict(tune_moe.tile_axes(quick), BLOCK_SIZE_K=k_tiles(fmt, gk, quick), USE_TMA=(False,))
    if not quick:
        axes["BLOCK_SIZE_N"] = (16, *axes["BLOCK_SIZE_N"])
    return tune_moe.configs_within(axes, block_m, lambda cfg: smem_bytes(cfg, gated, fmt, act_elem))


def random_experts(fmt: str, E: int, N: int, H: int, device, *, block=(128, 128), group_size: int = 128,
                   scale_dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """A :class:`~omni_fast.ops.QuantizedExperts` of ``fmt`` quantized from random float experts (w13 ``[E, 2N, H]``,
    w2 ``[E, H, N]``, std ``1/sqrt(K)``) on ``device``; int4 asymmetric with ``scale_dtype`` scales."""
    from omni_fast.reference import moe_quant as rq

    g = torch.Generator(device=device).manual_seed(seed)
    w13 = torch.randn(E, 2 * N, H, device=device, generator=g) * H ** -0.5
    w2 = torch.randn(E, H, N, device=device, generator=g) * N ** -0.5
    if fmt == "fp8_block":
        return rq.quantize_experts(w13, w2, fmt, block=tuple(block))
    if fmt == "int4_w4a16":
        return rq.quantize_experts(w13, w2, fmt, group_size=group_size, symmetric=False, scale_dtype=scale_dtype)
    return rq.quantize_experts(w13, w2, fmt)


# --- the sm_90a static prune ---------------------------------------------------------------------------------------

_CONST_KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages")


def _case(fmt: str, gk: int, zero: bool, act: str, gated: bool, cfg: dict):
    """The kernel specialisation ``cfg`` launches, as a (not registered) static case."""
    from omni_fast.kernels import moe_gemm_quant as mq
    from omni_fast.kernels.launch import StaticCase

    k = mq._FORMATS[fmt]
    consts = dict(FORMAT=k, QUANT_N=128 if k == "fp8" else 1, GROUP_K=max(gk, 1), HAS_ZERO=zero, STATIC_A=False,
                  GATED=gated, MUL_ROUTED_WEIGHT=not gated, A_PER_TOKEN=gated, UPCAST=False, EMULATE_FP8=False,
                  DOT_PRECISION="tf32", **{key: cfg[key] for key in _CONST_KEYS[:4]})
    sig = mq._signature(act, k, act if k == "int4" else "fp32", "fp32")
    return StaticCase(f"tune[{fmt},{act},{'gate_up' if gated else 'down'},{json.dumps(cfg, sort_keys=True)}]",
                      mq.moe_gemm_quant_kernel, sig, consts, cfg["num_warps"], cfg["num_stages"],
                      ("N", "K", "stride_am", "stride_be", "stride_bn", "stride_se", "stride_cm"))


def _compile_spec(spec: dict) -> dict:
    from omni_fast.bench.static_check import compile_case

    rep = compile_case(_case(spec["fmt"], spec["gk"], spec["zero"], spec["act"], spec["gated"], spec["cfg"]))
    return dict(regs=rep.regs, spill_bytes=rep.spill_bytes, smem=rep.smem, error=rep.error, ok=rep.ok)


def compile_facts(specs: list[dict], jobs: int = 1) -> list[dict]:
    """sm_90a facts (registers, spill bytes, shared memory, error, ok) per spec ``{fmt, gk, zero, act, gated,
    cfg}``; under the interpreter in a fresh process without it (the compile needs real JIT functions)."""
    from omni_fast.backend import triton_interpreter_enabled

    if not specs:
        return []
    if triton_interpreter_enabled():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        proc = subprocess.run([sys.executable, "-m", "omni_fast.bench.tune_moe_quant", "--jobs", str(jobs)],
                              input=json.dumps(specs), capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                              check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])
    if jobs > 1 and len(specs) > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(min(jobs, len(specs))) as pool:
            return pool.map(_compile_spec, specs, chunksize=1)
    return [_compile_spec(s) for s in specs]


class StaticPrune:
    """``prune(configs, gated) -> kept``: drops the candidates whose sm_90a compile spills, exceeds the shared
    memory of an H100 block or fails; memoised per (GEMM, config) for the run. ``dropped`` lists what went and
    why (printed by the tuner with ``-v``)."""

    def __init__(self, fmt: str, gk: int, zero: bool, act: str, jobs: int = 1):
        self.base = dict(fmt=fmt, gk=gk, zero=zero, act=act)
        self.jobs = jobs
        self.facts: dict[str, dict] = {}
        self.dropped: list[tuple[dict, str]] = []

    def _key(self, cfg: dict, gated: bool) -> str:
        return json.dumps([gated, {k: cfg[k] for k in _CONST_KEYS}], sort_keys=True)

    def __call__(self, configs: list[dict], gated: bool) -> list[dict]:
        todo = {self._key(c, gated): c for c in configs if self._key(c, gated) not in self.facts}
        specs = [dict(self.base, gated=gated, cfg={k: c[k] for k in _CONST_KEYS}) for c in todo.values()]
        for key, facts in zip(todo, compile_facts(specs, self.jobs)):
            self.facts[key] = facts
            if not facts["ok"]:
                why = facts["error"] or f"spills {facts['spill_bytes']} B, shared memory {facts['smem']} B"
                self.dropped.append((todo[key], why))
        return [c for c in configs if self.facts[self._key(c, gated)]["ok"]]


def _cli() -> int:
    """``python -m omni_fast.bench.tune_moe_quant [--jobs N]``: specs (JSON list) on stdin -> facts on stdout
    (the sm_90a compile worker of ``python -m omni_fast.bench.tune_moe --format ...``, the command to run)."""
    if "-h" in sys.argv or "--help" in sys.argv:  # (it used to wait for stdin, then fail on empty JSON)
        print(_cli.__doc__)
        return 0
    jobs = int(sys.argv[sys.argv.index("--jobs") + 1]) if "--jobs" in sys.argv else 1
    print(json.dumps(compile_facts(json.loads(sys.stdin.read()), jobs)))
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
