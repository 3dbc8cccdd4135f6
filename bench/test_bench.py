"""The benchmark cases under pytest-benchmark: ``pytest bench/ [--benchmark-only] [-k rope]``.

Not part of ``tests/`` (CI never times anything). One test per case and provider; each timed call is followed by a
``torch.cuda.synchronize()`` so the wall clock covers the GPU work. Skipped without CUDA. ``python -m omni_fast.bench`` is the
fuller tool (CUDA events, rotated inputs, roofline %); this exists for pytest-benchmark's comparison and history.
"""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("benchmarks need a CUDA GPU", allow_module_level=True)

from omni_fast.bench import harness  # noqa: E402
from omni_fast.bench.case import runnable  # noqa: E402

PRESET = "quick"
CASES = harness.discover((), PRESET)
_COPIES: dict[str, list[dict]] = {}


def _providers(case):
    return list(runnable(case.setup(torch.device("cuda"))))


PARAMS = [pytest.param(case, prov, id=f"{case.name}-{prov}") for case in CASES for prov in _providers(case)]


@pytest.mark.parametrize("case,provider", PARAMS)
def test_bench(benchmark, case, provider):
    if case.name not in _COPIES:
        _COPIES.clear()  # keep one case's inputs alive at a time
        _COPIES[case.name] = [case.setup(torch.device("cuda")) for _ in range(harness.n_copies(case))]
    fns = [c[provider] for c in _COPIES[case.name]]
    state = {"i": 0}

    def call():
        fns[state["i"] % len(fns)]()
        state["i"] += 1
        torch.cuda.synchronize()

    for fn in fns:  # warm-up: compile / autotune outside the timing
        fn()
    torch.cuda.synchronize()
    benchmark.extra_info.update(case.params, provider=provider, bytes=case.bytes, flops=case.flops)
    benchmark(call)
