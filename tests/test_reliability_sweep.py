"""Property sweep of issue 17 (parts 5, 6): every public op and model entry point, called with one argument replaced
by a generated bad value, either raises a TypeError/ValueError naming that argument (or the argument it must agree
with), or returns the same result on the reference and Triton backends; never another exception type, a crash, or
a silent difference. The cases and the outcome rule are in tests/reliability_cases.py
(``python tests/reliability_cases.py`` runs all of them and prints the counts)."""

import os
import sys

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import reliability_cases as rc  # noqa: E402

CASES = rc.cases()


@settings(max_examples=int(os.environ.get("OMNI_FAST_SWEEP_EXAMPLES", "120")), deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(case=st.sampled_from(CASES))
def test_bad_arguments_named_or_backends_agree(case):
    outcome, detail = rc.run_case(*case)
    assert outcome in rc.GOOD_OUTCOMES, f"{case}: {outcome}: {detail}"


def test_sweep_covers_every_public_op():
    from omni_fast import ops

    covered = {name for name, _, _ in CASES}
    missing = set(ops.__all__) - covered  # every function and the QuantizedExperts constructor
    assert not missing, f"public ops without sweep cases: {sorted(missing)}"
