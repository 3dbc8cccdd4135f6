"""The opt-in fast paths: one table, one switch per path.

New fast paths stay off until a GPU run passes their gpu-marked tests (the project rule); the proven path is the
default and the fallback. Every such switch lives here, in :data:`PATHS`: its name, its environment variable, what
it does and the gpu-marked test ids that must pass before it becomes the default.

- ``enabled(name)``: is it on now (a plain Python bool: reading it costs a dict lookup, no host sync, nothing a
  CUDA graph capture or ``torch.compile`` trace could trip on);
- ``enable(name, on=True)``: switch it now; also a context manager that restores the previous setting on exit
  (``with fast_paths.enable("fused_step"): ...``). The switches are process-wide: a block in one thread switches
  the path for every thread while it is inside; blocks of several threads that overlap restore correctly in any
  order;
- ``status()``: one row per path (name, env var, on/off, default, what it does, gpu tests);
  ``print(omni_fast.fast_paths.table())`` shows them.

The environment variables keep their meaning: ``OMNI_FAST_<X>=1`` in the environment when omni-fast is imported
turns the path on (any other value, or none, leaves it off; a value other than ``0`` or empty warns that it does);
``enable`` overrides it afterwards. Switches are read
where work is set up or launched (the kernel's config, the decoder's construction), so a CUDA graph or a compiled
function keeps the path it was captured with; the model-level paths (``persistent_mtp``, ``fused_step``) are read
when the pipeline / ``patch`` builds its code predictor or decoder (cached per setting).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from .validation import check_bool


@dataclass(frozen=True)
class FastPath:
    """One opt-in fast path: ``name`` (the registry key), ``env`` (``=1`` turns it on at import), ``what`` (one
    line), ``gpu_tests`` (pytest ids, all in tests/gpu_first_light.txt, that must pass on a GPU before the path
    becomes the default) and ``default`` (False for every path until then)."""

    name: str
    env: str
    what: str
    gpu_tests: tuple[str, ...]
    default: bool = False


PATHS: tuple[FastPath, ...] = (
    FastPath("gemv_splitk", "OMNI_FAST_GEMV_SPLITK",
             "split-K of the MTP residual GEMVs (o/down projections) over more programs per column tile "
             "(kernels/mtp_gemv.py)",
             ("tests/test_mtp_gemv_splitk.py::test_gpu_splitk_real_shapes_bf16[1]",
              "tests/test_mtp_gemv_splitk.py::test_gpu_splitk_on_two_streams_at_once_bf16")),
    FastPath("moe_splitk", "OMNI_FAST_MOE_SPLITK",
             "split-K of the decode MoE GEMMs still short of one program per SM (the talker's shared expert; "
             "kernels/moe_gemm.py)",
             ("tests/test_moe_fill.py::test_gpu_shared_expert_split_k_bf16",)),
    FastPath("moe_starting_configs", "OMNI_FAST_MOE_STARTING_CONFIGS",
             "the shipped UNTUNED H100/H200 MoE configs (TMA weight path at large T; omni_fast/configs/moe)",
             ("tests/test_moe_cuda.py::test_fused_moe_tma_real_shapes_bf16[tma-128-8-2048-768-4096]",)),
    FastPath("split_head_dim", "OMNI_FAST_SPLIT_HEAD_DIM",
             "attention head dims 72/80/96 as two power-of-two tiles instead of one padded one "
             "(kernels/flash_attn.py)",
             ("tests/test_attention_kvcache.py::test_bf16_split_head_dim_gpu[shape0]",)),
    FastPath("token2wav", "OMNI_FAST_TOKEN2WAV",
             "patch() swaps in the Qwen2.5-Omni Token2Wav pieces (BigVGAN, DiT attention/AdaLN, the DiT solve as "
             "one CUDA graph) and routes Token2Wav's forward to the solve + vocoder in one graph per bucket "
             "(omni_fast/integrations/token2wav.py, token2wav_synth.py)",
             ("tests/test_dit_solve.py::test_graph_replay_equals_eager_on_cuda",
              "tests/test_dit_layers.py::test_fused_pieces_on_cuda",
              "tests/test_bigvgan_padded.py::test_solve_and_vocoder_graph_on_cuda",
              "tests/test_dit_solve.py::test_shared_pool_alternating_buckets_on_cuda",
              "tests/test_token2wav_forward.py::test_patched_forward_graph_on_cuda")),
    FastPath("dit_tf32", "OMNI_FAST_DIT_TF32",
             "the Qwen2.5-Omni Token2Wav solve's cuBLAS GEMMs (the DiT's, and the vocoder's inside synthesize's "
             "graph) as TF32 instead of transformers' IEEE fp32 (the FMA units): PREDICTED ~6x less DiT step time; "
             "not bit-equal to transformers; the cuBLAS flag is process-wide while the solve runs or is captured "
             "(omni_fast/models/dit_solve.py)",
             ("tests/test_dit_solve.py::test_tf32_solve_close_to_fp32_on_cuda",)),
    FastPath("persistent_mtp", "OMNI_FAST_PERSISTENT_MTP",
             "the MTP frame as ONE persistent launch (CodePredictor(persistent=True)) wherever the pipeline or "
             "patch() builds the code predictor (docs/persistent.md)",
             ("tests/test_persistent.py::test_gpu_persistent_matches_fused_bf16[1]",
              "tests/test_persistent.py::test_gpu_watchdog_with_a_full_grid",
              "tests/test_persistent_watchdog.py::test_gpu_graph_replay_that_trips_is_reported_and_defined",
              "tests/test_guarded_allocations.py::test_gpu_persistent_mtp_real_shapes_writes_inside[64]")),
    FastPath("fused_step", "OMNI_FAST_FUSED_STEP",
             "thinker and talker decode steps as 3 phase-fused launches per layer (MoeTextDecoder(fused=True)) "
             "where the pipeline or patch() builds a decoder; decoders it cannot run keep the ops path "
             "(docs/persistent.md)",
             ("tests/test_fused_step.py::test_gpu_real_config_bf16_matches_ops_path[1]",
              "tests/test_fused_step.py::test_gpu_real_config_bf16_matches_ops_path[8]",
              "tests/test_fused_step.py::test_gpu_fused_graph_replay_equals_eager",
              "tests/test_fused_step.py::test_gpu_thinker_real_config_bf16_matches_ops_path",
              "tests/test_guarded_allocations.py::test_gpu_fused_decode_step_real_shapes_writes_inside[8]")),
    FastPath("code2wav_state_moves", "OMNI_FAST_CODE2WAV_STATE_MOVES",
             "Code2Wav streaming moves its conv states after the convs, up to 8 per launch (ops.update_conv_states, "
             "kernels/code2wav_states.py): 4 launches a push instead of ~20 copies (read when a stream is made; "
             "docs/code2wav.md)",
             ("tests/test_code2wav_gpu.py::test_gpu_state_moves_equal_per_conv_copies_bf16",)),
    FastPath("fused_pdl", "OMNI_FAST_PDL",
             "the phase-fused step's three launches per layer chained by programmatic dependent launch, each "
             "phase prefetching its weights into L2 before the wait (sm_90+; kernels/talker_fused.py)",
             ("tests/test_fused_step.py::test_gpu_pdl_phases_equal_plain_launches",)),
)

_BY_NAME = {p.name: p for p in PATHS}


def _from_env(path: FastPath) -> bool:
    value = os.environ.get(path.env)
    if value is not None and value not in ("", "0", "1"):
        # "true" / "yes" / "on" (and " 1", "1\n": compared as written) leave the path off: say so rather than run
        # the slow path silently
        import warnings

        warnings.warn(f"{path.env}={value!r}: only '1' turns the fast path {path.name!r} on; it is off",
                      UserWarning, stacklevel=2)
    return path.default if value is None else value == "1"


_STATE: dict[str, bool] = {p.name: _from_env(p) for p in PATHS}
_BLOCKS: dict[str, list] = {p.name: [] for p in PATHS}  # the `with enable(...)` blocks inside now, oldest first
_BLOCKS_LOCK = threading.Lock()
_SWITCHES = 0  # enable() calls so far: each block's place in the chain of previous settings


def _check_name(name) -> str:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str (one of {sorted(_BY_NAME)}), got {type(name).__name__}")
    if name not in _BY_NAME:
        raise ValueError(f"name must be one of {sorted(_BY_NAME)}, got {name!r}")
    return name


def enabled(name: str) -> bool:
    """Whether the fast path ``name`` is on (a plain bool; see the module doc)."""
    on = _STATE.get(name) if isinstance(name, str) else None  # (no try/except: torch.compile traces this)
    if on is None:
        _check_name(name)
    return on


class enable:  # noqa: N801 - used like a function (and like torch.set_grad_enabled, as a context manager)
    """Turn the fast path ``name`` on (``on=False``: off) now. As a context manager it restores the previous
    setting on exit: ``with enable("persistent_mtp"): ...``."""

    def __init__(self, name: str, on: bool = True):
        self.name = _check_name(name)
        on = check_bool("on", on)
        global _SWITCHES
        with _BLOCKS_LOCK:  # the previous setting, the switch and its order: one step (threads)
            self.previous, self.order = _STATE[name], _SWITCHES
            _STATE[name], _SWITCHES = on, _SWITCHES + 1

    def __enter__(self) -> "enable":
        # in the order of the switches, not of the entries: another thread may switch between this one's switch
        # (__init__) and its entry, and the hand-over in __exit__ follows the chain of previous settings
        with _BLOCKS_LOCK:
            blocks = _BLOCKS[self.name]
            blocks.insert(next((j for j, b in enumerate(blocks) if b.order > self.order), len(blocks)), self)
        return self

    def __exit__(self, *exc) -> None:
        # Blocks of several threads overlap without nesting (A enters, B enters, A leaves): a block that leaves
        # while a later one is still inside hands its previous setting to that one, which restores it when it
        # leaves, so the switch ends as it was before the first block whatever the order
        with _BLOCKS_LOCK:
            blocks = _BLOCKS[self.name]
            i = next((j for j, b in enumerate(blocks) if b is self), None)
            if i is not None:
                del blocks[i]
                if i < len(blocks):  # a later block is still inside
                    blocks[i].previous = self.previous
                    return
            _STATE[self.name] = self.previous

    def __repr__(self) -> str:
        return f"enable({self.name!r}, {_STATE[self.name]})"


def status() -> list[dict]:
    """One row per fast path: ``name``, ``env``, ``enabled`` (now), ``default``, ``what``, ``gpu_tests``."""
    return [dict(name=p.name, env=p.env, enabled=_STATE[p.name], default=p.default, what=p.what,
                 gpu_tests=list(p.gpu_tests)) for p in PATHS]


def names() -> list[str]:
    """The registered fast paths' names."""
    return [p.name for p in PATHS]


def table() -> str:
    """:func:`status` as text: one path per line (name, on/off, env var, what), then the gpu tests it needs."""
    lines = []
    for row in status():
        lines.append(f"{row['name']:<22} {'on ' if row['enabled'] else 'off'}  {row['env']}=1  {row['what']}")
        lines += [f"{'':<28}needs on a GPU: {test_id}" for test_id in row["gpu_tests"]]
    return "\n".join(lines)


__all__ = ["FastPath", "PATHS", "enable", "enabled", "names", "status", "table"]
