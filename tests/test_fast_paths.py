"""The registry of opt-in fast paths (``omni_fast.fast_paths``): the table, ``enabled`` / ``enable`` / ``status``,
bad names, the environment variables, and that the kernels read the registry (no module constants left)."""

import os
import re
import subprocess
import sys

import pytest
import torch

from omni_fast import fast_paths
from omni_fast._layout import REPO_ROOT

NAMES = ["gemv_splitk", "moe_splitk", "moe_starting_configs", "split_head_dim", "token2wav", "dit_tf32",
         "persistent_mtp",
         "fused_step", "code2wav_state_moves", "fused_pdl"]


def _first_light_ids() -> set[str]:
    with open(os.path.join(REPO_ROOT, "tests", "gpu_first_light.txt")) as f:
        return {line.split("#")[0].strip() for line in f if line.strip() and not line.startswith(("#", "?"))}


def test_table_rows():
    assert fast_paths.names() == NAMES
    first_light = _first_light_ids()
    for p in fast_paths.PATHS:
        assert p.env == "OMNI_FAST_" + {"fused_pdl": "PDL"}.get(
            p.name, p.name.upper()), p
        assert p.default is False and p.what and p.gpu_tests, p
        for test_id in p.gpu_tests:
            assert test_id in first_light, f"{p.name}: {test_id} is not a (required) first-light id"
            path, func = test_id.split("::")
            func = func.split("[")[0]
            with open(os.path.join(REPO_ROOT, path)) as f:
                src = f.read()
            # (the gpu marker itself: tests/test_gpu_session_dry_run.py collects every first-light id)
            assert re.search(rf"^def {func}\(", src, re.M), test_id


def test_enable_as_function_and_context_manager():
    assert not fast_paths.enabled("fused_step")
    with fast_paths.enable("fused_step") as switch:
        assert fast_paths.enabled("fused_step") is True
        with fast_paths.enable("fused_step", False):
            assert fast_paths.enabled("fused_step") is False
        assert fast_paths.enabled("fused_step") is True
        assert "fused_step" in repr(switch)
    assert fast_paths.enabled("fused_step") is False
    switch = fast_paths.enable("persistent_mtp")  # a plain call switches it and stays
    try:
        assert fast_paths.enabled("persistent_mtp")
        row = {r["name"]: r for r in fast_paths.status()}["persistent_mtp"]
        assert row["enabled"] is True and row["default"] is False and row["env"] == "OMNI_FAST_PERSISTENT_MTP"
        assert row["gpu_tests"] and row["what"]
    finally:
        switch.__exit__(None, None, None)
    assert not fast_paths.enabled("persistent_mtp")
    assert [r["name"] for r in fast_paths.status()] == NAMES


def test_overlapping_blocks_restore_in_any_order():
    """Blocks of two server threads overlap without nesting (thread A enters, B enters, A leaves, B leaves): A's
    exit restored "off" while B was still inside, and B's exit then restored A's "on", so the path stayed on after
    both had ended. Now a block leaving before a later one hands its previous setting to it (deterministic: the
    two blocks entered and left by hand in one thread; ~0 s)."""
    before = fast_paths.enabled("fused_step")
    for first_out in ("a", "b"):
        a = fast_paths.enable("fused_step", not before).__enter__()
        b = fast_paths.enable("fused_step", not before).__enter__()
        (a if first_out == "a" else b).__exit__(None, None, None)
        assert fast_paths.enabled("fused_step") is (not before), first_out  # the other block is still inside
        (b if first_out == "a" else a).__exit__(None, None, None)
        assert fast_paths.enabled("fused_step") is before, first_out


def test_blocks_entered_in_another_order_than_switched_restore():
    """Thread A switches (``enable(...)`` runs), thread B switches and enters its block, then A enters: the blocks
    were kept in the order they were entered, so A leaving first restored "off" while B was inside, and B then
    restored A's "on" for good. Blocks now keep the order of their switches (deterministic, by hand; ~0 s)."""
    before = fast_paths.enabled("fused_step")
    a = fast_paths.enable("fused_step", not before)
    b = fast_paths.enable("fused_step", not before)
    b.__enter__()
    a.__enter__()
    a.__exit__(None, None, None)
    assert fast_paths.enabled("fused_step") is (not before)  # B is still inside
    b.__exit__(None, None, None)
    assert fast_paths.enabled("fused_step") is before


def test_fixture_switches_for_one_test(fast_path):
    fast_path("token2wav")
    fast_path("token2wav", False)
    fast_path("split_head_dim")
    assert not fast_paths.enabled("token2wav") and fast_paths.enabled("split_head_dim")


def test_bad_names_and_values():
    for bad in ("fused", ""):
        with pytest.raises(ValueError, match="name must be one of"):
            fast_paths.enabled(bad)
        with pytest.raises(ValueError, match="name must be one of"):
            fast_paths.enable(bad)
    for bad in (None, 3, ["fused_step"]):  # not a str at all: TypeError, naming the argument
        with pytest.raises(TypeError, match="name must be a str"):
            fast_paths.enabled(bad)
        with pytest.raises(TypeError, match="name must be a str"):
            fast_paths.enable(bad)
    with pytest.raises(TypeError, match="on must be a bool"):
        fast_paths.enable("fused_step", "yes")
    with pytest.raises(TypeError, match="on"):
        fast_paths.enable("fused_step", 1)
    assert not fast_paths.enabled("fused_step")


def test_environment_variables_at_import():
    """``OMNI_FAST_<X>=1`` when omni-fast is imported turns a path on; another value (or none) leaves it off."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNI_FAST_")}
    env.update({p.env: "1" for p in fast_paths.PATHS if p.name != "token2wav"}, OMNI_FAST_TOKEN2WAV="true",
               PYTHONPATH=REPO_ROOT)
    code = ("from omni_fast import fast_paths\n"
            "print(sorted(r['name'] for r in fast_paths.status() if r['enabled']))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == str(sorted(n for n in NAMES if n != "token2wav"))
    # "true" leaves token2wav off, and says so (it was silent)
    assert "OMNI_FAST_TOKEN2WAV='true': only '1' turns the fast path 'token2wav' on; it is off" in out.stderr


@pytest.mark.parametrize("value,on,warns", [("1", True, False), ("0", False, False), ("", False, False),
                                            (" 1", False, True), ("1\n", False, True), ("yes", False, True)])
def test_environment_value_warns_whenever_it_is_not_taken_as_written(monkeypatch, value, on, warns):
    """Only '1' turns a path on, compared as written: a value that looks like '1' once stripped (" 1", "1\n") is
    off too, so it warns like "yes" (the check stripped it: off, silently)."""
    import warnings

    path = fast_paths._BY_NAME["token2wav"]
    monkeypatch.setenv(path.env, value)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert fast_paths._from_env(path) is on
    assert bool([w for w in seen if "only '1' turns" in str(w.message)]) is warns


def test_kernels_read_the_registry(fast_path):
    from omni_fast.integrations import token2wav
    from omni_fast.kernels import flash_attn, moe_gemm, mtp_gemv, talker_fused

    for module, old in ((mtp_gemv, "SPLIT_K_ENABLED"), (moe_gemm, "SPLIT_K_ENABLED"),
                        (moe_gemm, "STARTING_CONFIGS_ENABLED"), (flash_attn, "SPLIT_HEAD_DIM"),
                        (token2wav, "ENABLED"), (talker_fused, "PDL_ENABLED")):
        assert not hasattr(module, old), f"{module.__name__}.{old}: one switch per path (omni_fast.fast_paths)"
    assert flash_attn.head_tiles(72) == (128, 0)
    assert "SPLIT_K" not in moe_gemm.default_config(1, 1, 1, 1024, 768, torch.bfloat16, fill=True)
    assert token2wav.label("x", True) == (False, f"({token2wav.OPT_IN})")
    fast_path("split_head_dim")
    fast_path("moe_splitk")
    fast_path("token2wav")
    assert flash_attn.head_tiles(72) == (64, 16)
    assert moe_gemm.default_config(1, 1, 1, 1024, 768, torch.bfloat16, fill=True)["SPLIT_K"] == 3
    assert token2wav.label("x", True) == (True, "x")


def test_status_table():
    import omni_fast

    assert omni_fast.fast_paths is fast_paths
    out = fast_paths.table()
    assert all(f"{p.env}=1" in out for p in fast_paths.PATHS) and "needs on a GPU: tests/" in out


def test_reading_a_switch_compiles_without_a_graph_break():
    """A plain Python bool: ``torch.compile(fullgraph=True)`` traces through it (and guards on it)."""
    def f(x):
        return x * 2 if fast_paths.enabled("fused_step") else x + 1

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    x = torch.ones(3)
    assert torch.equal(compiled(x), x + 1)
    with fast_paths.enable("fused_step"):
        assert torch.equal(compiled(x), x * 2)
    assert torch.equal(compiled(x), x + 1)
