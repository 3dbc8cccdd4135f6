"""RVQ codebook embedding: one row gathered per codebook, then summed or averaged over the codebooks.

Two layouts of the embedding tables, both used by Qwen3-Omni:

- a list of ``G`` tables ``[V_g, D]`` (the Talker's next input: codebook 0 from the Talker's codec embedding,
  codebooks 1..15 from the code predictor's 15 tables; transformers sums the 16 embeddings,
  ``Qwen3OmniMoeTalkerForConditionalGeneration.prepare_inputs_for_generation``);
- one big table ``[sum V_g, D]`` with per-group row offsets (Code2Wav: ``code_embedding(codes + code_offset)
  .mean(1)``).

codes: int ``[..., G]`` (the codebook axis LAST); output ``[..., D]`` in the tables' dtype. As torch's reductions
do, the sum/mean accumulates in fp32 and rounds once to the output dtype.
"""

from __future__ import annotations

from typing import Sequence

import torch


def rvq_embed(
    codes: torch.Tensor,
    tables: torch.Tensor | Sequence[torch.Tensor],
    *,
    reduce: str = "sum",
    offsets: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """Gather ``tables[g][codes[..., g]]`` (or ``table[codes[..., g] + offsets[g]]``) and reduce over ``g``.

    codes: int32/int64 ``[..., G]``; tables: G tensors ``[V_g, D]`` or one ``[sum V_g, D]`` with ``offsets``
    (int ``[G]``; default 0 for every group). reduce: ``"sum"`` or ``"mean"``. Returns ``[..., D]``.
    """
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    G = codes.shape[-1]
    if isinstance(tables, torch.Tensor):
        if offsets is None:
            off = torch.zeros(G, dtype=torch.long, device=codes.device)
        else:
            off = torch.as_tensor(offsets, dtype=torch.long, device=codes.device)
        rows = torch.nn.functional.embedding(codes.long() + off, tables)  # [..., G, D]
    else:
        rows = torch.stack(
            [torch.nn.functional.embedding(codes[..., g].long(), tables[g]) for g in range(G)], dim=-2
        )
    # torch reduces bf16/fp16 in fp32 and rounds once, as transformers' ``.sum(1)`` / ``.mean(1)``.
    return rows.sum(-2) if reduce == "sum" else rows.mean(-2)
