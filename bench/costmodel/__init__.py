"""A measured cost model of omni-fast's decode units (``python -m omni_fast.bench.model``).

- :mod:`.constants`: every model constant, each with its source, and :func:`.constants.calibrate`.
- :mod:`.counter`: :func:`.counter.count_launches` (kernels per call) and :func:`.counter.trace` (per kernel:
  launches, CTAs, bytes loaded / stored, FLOPs) by instrumenting the Triton interpreter and torch dispatch.
- :mod:`.units`: the units of work (MoE, attention, RoPE, sampler, MTP frame, decode steps, Code2Wav push).
- :mod:`.statics`: sm_90a compile facts per kernel (through :mod:`omni_fast.bench.static_check`).
- :mod:`.predict`: the floor and the predicted H100 time of a unit.
"""
