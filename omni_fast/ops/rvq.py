"""Public RVQ embedding op: :func:`rvq_embed` (gather one row per codebook, sum or mean over codebooks).

See :mod:`omni_fast.reference.rvq` for the exact rule and the two table layouts.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .._cache_memory import made_to_keep, record_use
from .._device import capturing
from ..validation import (FLOAT_DTYPES, INT_DTYPES, as_int, check_bool, check_index_range, check_tensor,
                          values_checkable)
from ._dispatch import dispatched_op


def _fake(codes, tables, offsets, mean, backend):
    return tables[0].new_empty((*codes.shape[:-1], tables[0].shape[-1]))


@dispatched_op("rvq_embed", fake=_fake)
def _rvq_op(codes: torch.Tensor, tables: list[torch.Tensor], offsets: torch.Tensor | None, mean: bool,
            backend: str) -> torch.Tensor:
    """Sum/mean over the last axis of codes of one gathered table row per codebook."""


@_rvq_op.impl("reference")
def _rvq_reference(codes, tables, offsets, mean):
    single = len(tables) == 1 and codes.shape[-1] > 1 or offsets is not None
    G = codes.shape[-1]
    c = codes.long()
    # The Triton kernel's rule for unchecked codes and offsets (check_values=False), so that both backends agree: a
    # code outside [0, rows_g) adds nothing; with one table, group g has rows_g = V - first_g, none when first_g is
    # outside [0, V). Valid codes give exactly omni_fast.reference.rvq.rvq_embed (no host sync here).
    if single:  # group g reads row c + first_g of one big table
        V = tables[0].shape[0]
        first = offsets.long() if offsets is not None else torch.zeros(G, dtype=torch.long, device=codes.device)
        rows = torch.where((first >= 0) & (first < V), V - first, 0)
    else:
        rows = torch.tensor([t.shape[0] for t in tables], dtype=torch.long, device=codes.device)
    bad = (c < 0) | (c >= rows)
    c = torch.where(bad, torch.zeros_like(c), c)
    if single:
        emb = torch.nn.functional.embedding(c + first.clamp(0, max(V - 1, 0)), tables[0])  # [..., G, D]
    else:
        emb = torch.stack([torch.nn.functional.embedding(c[..., g], tables[g]) for g in range(G)], dim=-2)
    emb = torch.where(bad[..., None], torch.zeros((), dtype=emb.dtype, device=emb.device), emb)
    # torch reduces bf16/fp16 in fp32 and rounds once, as transformers' ``.sum(1)`` / ``.mean(1)``
    return emb.mean(-2) if mean else emb.sum(-2)


MAX_TABLE_SETS = 257  # table sets whose offsets are kept (keys change with model loads, not with requests)
_LIST_BASES: dict[tuple, tuple[torch.Tensor, ...]] = {}
_CAPTURED_BASES: dict[tuple, tuple[torch.Tensor, ...]] = {}  # read by a CUDA graph: never evicted


def _list_bases(tables: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Element offsets of each table from the first one's data pointer, cached per table set so a warmed-up call
    # makes no host-to-device copy (and so can be captured in a CUDA graph).
    key = (tables[0].device, tables[0].dtype) + tuple((t.data_ptr(), t.stride(0), t.shape[0]) for t in tables)
    hit = _CAPTURED_BASES.get(key) or _LIST_BASES.get(key)
    in_capture = capturing(tables[0].device)
    if hit is None:
        size = tables[0].element_size()
        base = [(t.data_ptr() - tables[0].data_ptr()) // size for t in tables]
        values = (base, [t.stride(0) for t in tables], [t.shape[0] for t in tables])
        # (full: dropped first, outside a capture only, a sync there breaks it; made where it stays valid)
        hit = made_to_keep(lambda: tuple(torch.tensor(v, dtype=torch.long, device=tables[0].device) for v in values),
                           tables[0].device, in_capture, _LIST_BASES, MAX_TABLE_SETS)
        _LIST_BASES[key] = hit
    if in_capture:
        _CAPTURED_BASES[key] = hit  # the graph reads these addresses on every replay: keep them alive
    elif hit[0].is_cuda:  # (a full-cache drop by another thread before our launch: _cache_memory.record_use)
        record_use(hit)
    return hit


@_rvq_op.impl("triton")
def _rvq_triton(codes, tables, offsets, mean):
    from ..kernels import rvq as kernels_rvq

    G = codes.shape[-1]
    D = tables[0].shape[-1]
    # [A, T, G] views of any strides (Code2Wav's transposed [B, G, T] codes: no copy; [N, G]: T = 1, a constant
    # to the JIT); more leading dims flatten
    codes3 = codes.reshape(1, 1, G) if codes.dim() == 1 else codes.unsqueeze(1) if codes.dim() == 2 else \
        codes.flatten(0, -3)
    out = tables[0].new_empty((codes3.shape[0] * codes3.shape[1], D))
    if len(tables) == 1 and (G > 1 or offsets is not None):  # one table: the groups' first rows, read in-kernel
        first = offsets.contiguous() if offsets is not None else torch.zeros(G, dtype=torch.long, device=codes.device)
        kernels_rvq.rvq_embed(codes3, tables[0], first, None, None, bool(mean), out)
    else:
        base, stride, rows = _list_bases(tables)
        kernels_rvq.rvq_embed(codes3, tables[0], base, stride, rows, bool(mean), out)
    return out.reshape(*codes.shape[:-1], D)


def rvq_embed(
    codes: torch.Tensor,
    tables: torch.Tensor | Sequence[torch.Tensor],
    *,
    reduce: str = "sum",
    offsets: torch.Tensor | Sequence[int] | None = None,
    check_values: bool | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Sum (or mean) over codebooks of one embedding row per codebook; returns ``[..., D]`` in the tables' dtype.

    codes: int32/int64 ``[..., G]`` (codebook axis last). tables: a list of G tensors ``[V_g, D]`` (one per
    codebook), a stacked tensor ``[G, V, D]`` (G equal-size codebooks, e.g. the code predictor's tables), or one
    tensor ``[sum V_g, D]`` with ``offsets`` (int ``[G]``: the first row of each group; zeros when omitted). reduce: ``"sum"`` (the Talker input) or ``"mean"`` (Code2Wav). Code ranges are checked when
    the codes live on the CPU (or ``check_values=True``); unchecked (CUDA, no host sync), the Triton kernel never
    reads outside the tables: a code that lands outside its table (past the big table's end with ``offsets``, or
    outside its own table in a list) adds nothing, as does every code of a group whose (unchecked) offset lies
    outside the table (and the address the kernel forms is clamped into the table, masked or not: any code value is
    safe); with ``offsets`` one that only passes its group's end reads the next group's row. The reference backend
    follows the same rule, so unchecked bad codes and offsets give the same result on both.
    """
    if not isinstance(reduce, str) or reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    if isinstance(codes, torch.Tensor) and codes.is_floating_point():
        raise TypeError(f"codes must be an integer tensor (int32 or int64), got {codes.dtype}")
    check_tensor("codes", codes, dtypes=INT_DTYPES)
    if codes.dim() < 1 or codes.shape[-1] < 1:
        raise ValueError(f"codes must have a codebook axis last with at least one codebook, got {tuple(codes.shape)}")
    G = codes.shape[-1]
    if check_values is not None:
        check_values = check_bool("check_values", check_values)
    if isinstance(tables, torch.Tensor) and tables.dim() == 3:  # stacked [G, V, D]: G equal-size codebooks
        check_tensor("tables", tables, dtypes=FLOAT_DTYPES, device=codes.device, last_dim_contiguous=True)
        if tables.shape[0] != G:
            raise ValueError(f"stacked tables [G, V, D] must have one table per codebook (G={G}), got "
                             f"{list(tables.shape)}")
        if offsets is not None:
            raise ValueError("offsets only apply to a single 2-D table; stacked [G, V, D] tables need none")
        tables = list(tables.unbind(0))
    if isinstance(tables, torch.Tensor):
        check_tensor("tables", tables, dtypes=FLOAT_DTYPES, ndim=(2, 3), device=codes.device,
                     last_dim_contiguous=True)  # (a 3-D one was unbound above)
        table_list = [tables]
        if offsets is not None:
            offsets = _offsets(offsets, codes.device)
            offsets = offsets.reshape(-1)
            if offsets.numel() != G:
                raise ValueError(f"offsets must have one entry per codebook (G={G}), got {offsets.numel()}")
            check_index_range("offsets", offsets, 0, tables.shape[0], check_values=check_values)
        if values_checkable(codes, check_values):  # no device work at all when the values cannot be checked
            for g in range(G):
                shifted = codes[..., g] if offsets is None else codes[..., g] + offsets[g]
                check_index_range(f"codes[..., {g}] (+ offsets[{g}])", shifted, 0, tables.shape[0],
                                  check_values=check_values)
    else:
        if not isinstance(tables, (list, tuple)):
            raise TypeError(f"tables must be a tensor [sum V_g, D] or [G, V, D], or a list of G tensors [V_g, D], "
                            f"got {type(tables).__name__}")
        table_list = list(tables)
        if offsets is not None:
            raise ValueError("offsets only apply to a single table; with a list of tables give one table per group")
        if len(table_list) != G:
            raise ValueError(f"codes have {G} codebooks but {len(table_list)} tables were given")
        D = None
        for g, t in enumerate(table_list):
            check_tensor(f"tables[{g}]", t, dtypes=FLOAT_DTYPES, ndim=2, device=codes.device,
                         last_dim_contiguous=True)
            if t.dtype != table_list[0].dtype:
                raise TypeError(f"tables[{g}] must have dtype {table_list[0].dtype}, got {t.dtype}")
            if D is not None and t.shape[1] != D:
                raise ValueError(f"tables[{g}] must have {D} columns like tables[0], got {t.shape[1]}")
            D = t.shape[1]
            check_index_range(f"codes[..., {g}]", codes[..., g], 0, t.shape[0], check_values=check_values)
    be = _rvq_op.resolve([codes, *table_list], backend)
    return _rvq_op(codes, table_list, offsets, reduce == "mean", be)


def _offsets(offsets, device) -> torch.Tensor:
    """int ``[G]`` offsets from an integer tensor or a sequence of ints (numpy / 0-d tensor ints too)."""
    if isinstance(offsets, torch.Tensor):
        if offsets.is_floating_point() or offsets.dtype == torch.bool or offsets.is_complex():
            raise TypeError(f"offsets must be integers, got {offsets.dtype}")
        return offsets.to(device)
    if isinstance(offsets, (str, bytes)) or not hasattr(offsets, "__len__"):
        raise TypeError(f"offsets must be an integer tensor or a sequence of ints, got {type(offsets).__name__}")
    values = [as_int(f"offsets[{i}]", v) for i, v in enumerate(offsets)]
    return torch.tensor(values, dtype=torch.long, device=device)


__all__ = ["rvq_embed"]
