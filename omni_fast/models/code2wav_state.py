"""The state a :class:`omni_fast.models.code2wav.Code2WavStream` carries between pushes: :class:`StreamState`, its
creation, format check and snapshot/restore (around a CUDA graph's warm-up), and the ``rows`` argument of
``reset`` as a mask. Re-exported by :mod:`omni_fast.models.code2wav`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..reference.code2wav import Code2WavConfig
from ..validation import INT_DTYPES, check_index_range, check_tensor

if TYPE_CHECKING:
    from .code2wav import Code2Wav


@dataclass
class StreamState:
    """Everything a stream carries between pushes, tied to the model config that made it.

    Every tensor keeps its shape and address from the second push on (updates are in-place copies), which is what
    lets :class:`Code2WavStream` replay CUDA graphs. The KV caches are fixed ``[B, W-1, Hk, D]`` buffers holding, for
    row ``b``, the keys/values of its last ``n_b = min(pos[b], W-1)`` frames in rows ``0 .. n_b-1`` (oldest first;
    the other rows are stale and never read). ``n`` is derived from ``pos``, each row's RoPE position of its next
    frame, on the device, so nothing about the state's values lives on the host.

    Format 2 (per-row positions): a state of the former format (a shared 0-d ``pos``, no ``fresh``) is refused.
    """

    config: Code2WavConfig
    batch_size: int
    pos: torch.Tensor  # int64 [B] device tensor: each row's position of its next frame
    kv: list  # per pre-transformer layer: (k, v) [B, W-1, Hk, D] each
    # [2, layers, B, W-1, Hk, D]: the storage of every kv entry (kv[i] = (kv_stack[0, i], kv_stack[1, i])), so a
    # push moves all layers' caches with one copy in and one gather out; None (or kv entries that are not these
    # views) -> one copy and one gather per layer and tensor
    kv_stack: torch.Tensor | None = None
    conv: dict = field(default_factory=dict)  # per conv layer: raw left context [B, C_in, ctx] (absent at start)
    # bool [B] device tensor: rows reset since their last push (their next push starts a new utterance mid-stream)
    fresh: torch.Tensor | None = None
    frames: int = 0  # frames pushed through the stream so far (host; every row advances by the same count per push)
    finished: bool = False
    reset_pending: bool = False  # host: some row was reset and has not pushed since (the next push masks its lead)


def _kv_shape(cfg: Code2WavConfig, batch_size: int) -> tuple[int, int, int, int]:
    return (batch_size, cfg.sliding_window - 1, cfg.num_key_value_heads, cfg.head_dim)


def _new_state(model: Code2Wav, batch_size: int) -> StreamState:
    cfg = model.config
    shape = _kv_shape(cfg, batch_size)
    # zeros, not empty: the stale rows are never attended to, but they are copied around and must stay finite
    stack = torch.zeros((2, cfg.num_hidden_layers) + shape, dtype=model.dtype, device=model.device)
    kv = [(stack[0, i], stack[1, i]) for i in range(cfg.num_hidden_layers)]
    return StreamState(cfg, batch_size, pos=torch.zeros(batch_size, dtype=torch.long, device=model.device), kv=kv,
                       fresh=torch.zeros(batch_size, dtype=torch.bool, device=model.device), kv_stack=stack)


def _stacked_kv(st: StreamState) -> torch.Tensor | None:
    """``st.kv_stack`` when every ``st.kv`` entry is still its view (host-side pointer checks, no sync), else None."""
    stack = st.kv_stack
    if stack is None or stack.dim() != 6 or stack.shape[1] != len(st.kv):
        return None
    for i, pair in enumerate(st.kv):
        for j, t in enumerate(pair):
            view = stack[j, i]
            if (t.data_ptr() != view.data_ptr() or t.shape != view.shape or t.stride() != view.stride()
                    or t.dtype != stack.dtype):
                return None
    return stack


def _check_state_format(state: StreamState, batch_size: int) -> None:
    """A resumed state has this version's format: per-row positions ``pos [B]`` (int64) and ``fresh [B]`` (bool)."""
    pos, fresh = getattr(state, "pos", None), getattr(state, "fresh", None)
    if not isinstance(pos, torch.Tensor) or pos.dim() == 0 or not isinstance(fresh, torch.Tensor):
        raise ValueError("state has the former format (one position shared by all rows, 0-d pos): this version "
                         "keeps a position per row (pos [B]) and cannot resume it; start a new stream")
    if tuple(pos.shape) != (batch_size,) or pos.dtype != torch.int64:
        raise ValueError(f"state pos must be an int64 [B] = [{batch_size}] tensor, got {pos.dtype} {list(pos.shape)}")
    if tuple(fresh.shape) != (batch_size,) or fresh.dtype != torch.bool:
        raise ValueError(f"state fresh must be a bool [B] = [{batch_size}] tensor, got {fresh.dtype} "
                         f"{list(fresh.shape)}")


def _row_mask(rows, batch_size: int, device: torch.device) -> torch.Tensor:
    """``rows`` (bool mask ``[B]`` or indices: tensor, list, tuple, range or int) -> a bool ``[B]`` mask on
    ``device``. Indices are range-checked when they are on the host (no sync for device tensors)."""
    if isinstance(rows, bool):
        raise TypeError("rows must be a bool mask [B] or row indices, got a bool")
    if isinstance(rows, int):
        rows = [rows]
    if isinstance(rows, (list, tuple, range)):
        rows = list(rows)
        if rows and all(isinstance(r, bool) for r in rows):
            rows = torch.tensor(rows, dtype=torch.bool)
        elif all(isinstance(r, int) and not isinstance(r, bool) for r in rows):
            rows = torch.tensor(rows, dtype=torch.long)
        else:
            raise TypeError("rows must be a bool mask [B] or a list of row indices (ints)")
    if not isinstance(rows, torch.Tensor):
        raise TypeError(f"rows must be a bool mask [B] or row indices, got {type(rows).__name__}")
    if rows.dtype == torch.bool:
        if tuple(rows.shape) != (batch_size,):
            raise ValueError(f"rows as a bool mask must have shape [{batch_size}] (the batch), got {list(rows.shape)}")
        return rows.to(device)
    check_tensor("rows", rows, dtypes=INT_DTYPES, ndim=1)
    check_index_range("rows", rows, 0, batch_size)
    return torch.zeros(batch_size, dtype=torch.bool, device=device).index_fill_(0, rows.to(device), True)


def _clone_state(st: StreamState) -> dict:
    snap = {"pos": st.pos.clone(), "fresh": st.fresh.clone(), "frames": st.frames,
            "reset_pending": st.reset_pending}
    snap["conv"] = {k: v.clone() for k, v in st.conv.items()}
    snap["kv"] = [(k.clone(), v.clone()) for k, v in st.kv]
    return snap


def _restore_state(st: StreamState, snap: dict) -> None:
    st.pos.copy_(snap["pos"])
    st.fresh.copy_(snap["fresh"])
    st.frames = snap["frames"]
    st.reset_pending = snap["reset_pending"]
    for k, v in snap["conv"].items():
        st.conv[k].copy_(v)
    for (k, v), (saved_k, saved_v) in zip(st.kv, snap["kv"]):
        k.copy_(saved_k)
        v.copy_(saved_v)


def _leave_inference_mode(st: StreamState) -> bool:
    """Outside ``torch.inference_mode()``, replace the state's inference tensors (made by pushes under it) with
    ordinary copies, once: a push or reset updates the state in place, which an inference tensor refuses outside
    inference mode. Returns whether anything was replaced (then the stream's CUDA graphs, which read the old
    buffers by address, are stale). Inside inference mode, or for an ordinary state: nothing, False."""
    tensors = [st.pos, st.fresh, st.kv_stack, *st.conv.values(), *(t for pair in st.kv for t in pair)]
    if torch.is_inference_mode_enabled() or not any(t is not None and t.is_inference() for t in tensors):
        return False
    with torch.inference_mode(False):  # (only allocations and copies here: grad mode does not matter)
        stack = _stacked_kv(st)
        st.pos, st.fresh = st.pos.clone(), st.fresh.clone()
        st.conv = {name: c.clone() for name, c in st.conv.items()}
        if stack is not None:  # keep kv as views of one stack (one copy in / one gather out per push)
            st.kv_stack = stack.clone()
            st.kv = [(st.kv_stack[0, i], st.kv_stack[1, i]) for i in range(len(st.kv))]
        else:
            st.kv = [(k.clone(), v.clone()) for k, v in st.kv]
    return True
