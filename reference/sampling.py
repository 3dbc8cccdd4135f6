"""Token sampling with transformers' logits processors, drawn by a counter-based Gumbel race (no host sync).

The distribution is transformers' ``generate(do_sample=True)`` with, in its order:
``RepetitionPenaltyLogitsProcessor`` -> ``SuppressTokensLogitsProcessor`` (here: id ranges) ->
``TemperatureLogitsWarper`` -> ``TopKLogitsWarper`` -> ``TopPLogitsWarper`` -> softmax, on fp32 logits.

- repetition penalty: ``s = s * p if s < 0 else s * fp32(1 / p)`` at every id in ``prev_ids`` (negative ids:
  padding);
- suppression: ``s = -inf`` for ids in ``[lo, hi)`` of each range;
- temperature: ``s = s * fp32(1 / T)``: what transformers' ``scores / T`` computes on CUDA, where torch divides
  by a Python scalar as a multiplication by its fp32 reciprocal (on CPU it divides: at most 1 ulp apart);
- top-k: keep ``s >= (k-th largest s)`` (ties at the threshold are all kept, as ``scores < topk[..., -1]``);
- top-p: with ``p = softmax(s)`` over the kept ids, keep id ``t`` iff ``F(t) = sum_{j: s_j <= s_t} p_j``
  is ``> 1 - top_p``; the max is always kept. transformers sorts ascending and removes ``cumsum <= 1 - top_p``;
  this is the same set except when a tie group straddles the boundary (transformers then keeps an arbitrary
  part of the group, depending on the sort) or when the cumulative sum lands within rounding of ``1 - top_p``.
  Written this way the set is a threshold on ``s``, which the kernels find by bisection without sorting.

The draw: ``argmax_j (s_j + g_j)`` over the kept ids (the Gumbel-max trick: ``log p_j = s_j - logsumexp`` and
the constant drops out), ties to the lowest id, with ``g_j = -log(-log(u_j))`` and ``u_j`` from
:func:`uniform_bits`, a 32-bit integer hash of (seed, offset, stream, id). ``stream`` is the row index when one
``seed`` serves the whole batch (rows must differ), and 0 when ``seed`` is a per-row tensor ``[B]`` (B > 1): a
row's draws then depend only on its own seed, offset and logits, never on where it sits in the batch (the same
frame at row 0 alone or at row 3 of five draws the same ids). The kernels compute the same integers, so the same
seed gives the same ids on every backend (up to an ulp-level near-tie of two race keys, where the
backends' ``log`` may round differently: probability ~1e-6 per draw).

``greedy=True``: ``argmax s`` after penalty and suppression (transformers applies no warper when not sampling),
ties to the lowest id.

NaN logits: a NaN is -inf, converted where the logits are read (before the penalty): never drawn (greedy
included, unlike ``torch.argmax``, which picks a NaN), never counted by top-k or top-p, out of the softmax. A row
draws exactly what the same row with its NaNs replaced by -inf draws; a row of only NaN and -inf therefore gives id
0, as a row of only -inf does (every backend; transformers' own chain would poison the softmax instead). +inf
logits are not covered by this rule.
"""

from __future__ import annotations

from typing import Sequence

import torch

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
MIX_A = 0x85EBCA6B
MIX_B = 0xC2B2AE35
INDEX_SALT = 0x7F4A7C15


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for int64 tensors holding uint32 values, without int64 overflow."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & MASK32


def fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding uint32 values (a bijection of [0, 2**32))."""
    x = x ^ (x >> 16)
    x = _mul32(x, MIX_A)
    x = x ^ (x >> 13)
    x = _mul32(x, MIX_B)
    return x ^ (x >> 16)


def row_key(seed: torch.Tensor, offset: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """uint32 (in int64) key of one row's draw: a chain of :func:`fmix32` over seed, offset (both int64) and the
    stream index ``row`` (the row index for a shared seed, 0 for per-row seeds: :func:`stream_index`)."""
    k = fmix32(((seed & MASK32) + GOLDEN) & MASK32)
    k = fmix32(k ^ ((seed >> 32) & MASK32))
    k = fmix32(k ^ (offset & MASK32))
    k = fmix32(k ^ ((offset >> 32) & MASK32))
    return fmix32(k ^ (row & MASK32))


def stream_index(seed: torch.Tensor, rows: int) -> torch.Tensor:
    """int64 ``[rows]``: the index mixed into each row's key: the row index when ``seed`` holds one value (shared
    by the batch: rows must draw differently), zeros when ``seed`` holds one value per row (a row's stream is its
    own seed; its position in the batch does not matter). With rows = 1 both give 0."""
    r = torch.arange(rows, device=seed.device, dtype=torch.long)
    return r if seed.numel() == 1 else torch.zeros_like(r)


def uniform_bits(seed: torch.Tensor, offset: torch.Tensor, rows: int, vocab: int) -> torch.Tensor:
    """uint32 (in int64) ``[rows, vocab]`` random bits: ``fmix32(key(row) ^ fmix32(id + SALT))``.

    seed, offset: int64 ``[1]`` or ``[rows]`` (see :func:`stream_index` for what a per-row seed changes).
    """
    dev = seed.device
    r = stream_index(seed.reshape(-1), rows)
    key = row_key(seed.long().expand(rows), offset.long().to(dev).expand(rows), r)  # [rows]
    j = fmix32((torch.arange(vocab, device=dev, dtype=torch.long) + INDEX_SALT) & MASK32)  # [vocab]
    return fmix32(key[:, None] ^ j[None, :])


def gumbel_noise(seed: torch.Tensor, offset: torch.Tensor, rows: int, vocab: int) -> torch.Tensor:
    """fp32 ``[rows, vocab]`` Gumbel(0, 1) noise ``-log(-log(u))``, ``u = ((bits >> 9) + 0.5) * 2**-23`` in (0, 1).

    23 bits, not 24: every ``k + 0.5`` with ``k < 2**23`` is exact in fp32, so the largest u is ``1 - 2**-24`` and the
    noise stays finite (with 24 bits ``2**24 - 0.5`` rounds up to ``2**24``, u = 1 and the noise is +inf)."""
    bits = uniform_bits(seed, offset, rows, vocab)
    u = ((bits >> 9).to(torch.float32) + 0.5) * (2.0**-23)  # exact in fp32, u < 1
    return -torch.log(-torch.log(u))


def seed_tensor(value, rows: int, device: torch.device, name: str) -> torch.Tensor:
    """An int64 ``[1]`` or ``[rows]`` tensor from an int, a 0-/1-d int tensor or None (0 for offset)."""
    if isinstance(value, torch.Tensor):
        return value.reshape(-1).long().contiguous()  # kernels read one value per row at unit stride
    return torch.tensor([int(value)], dtype=torch.long, device=device)


def apply_processors(
    logits: torch.Tensor,
    *,
    suppress_ranges: Sequence[tuple[int, int]] | torch.Tensor | None = None,
    repetition_penalty: float = 1.0,
    prev_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 ``[B, V]`` scores after repetition penalty and suppression (before the warpers); NaN logits are -inf
    (module doc)."""
    s = logits.to(torch.float32)
    s = s.masked_fill(s.isnan(), float("-inf"))  # a new tensor: the caller's stays untouched
    B, V = s.shape
    if prev_ids is not None and repetition_penalty != 1.0 and prev_ids.numel():
        hit = torch.zeros(B, V + 1, dtype=torch.bool, device=s.device)
        ids = prev_ids.long()
        # padding / out-of-vocab ids go to a dropped column, as transformers clamps them (torch.where: no sync)
        ids = torch.where((ids < 0) | (ids >= V), torch.full_like(ids, V), ids)
        hit.scatter_(1, ids, True)
        hit = hit[:, :V]
        pen = torch.where(s < 0, s * float(repetition_penalty), s * (1.0 / float(repetition_penalty)))
        s = torch.where(hit, pen, s)
    if suppress_ranges is not None:
        r = torch.as_tensor(suppress_ranges, dtype=torch.long, device=s.device).reshape(-1, 2)
        j = torch.arange(V, device=s.device)
        hit = ((j[None, :] >= r[:, :1]) & (j[None, :] < r[:, 1:])).any(0)  # [V]; no host round trip
        s = s.masked_fill(hit, float("-inf"))
    return s


def keep_mask(s: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """bool ``[B, V]``: the ids top-k and then top-p keep, for temperature-scaled fp32 scores ``s``."""
    B, V = s.shape
    keep = torch.ones_like(s, dtype=torch.bool)
    if 0 < top_k < V:
        kth = torch.topk(s, top_k, dim=-1).values[:, -1:]
        keep = s >= kth
    if top_p < 1.0:
        m = s.max(-1, keepdim=True).values
        m_exp = torch.where(m == float("-inf"), torch.zeros_like(m), m)  # all suppressed: no NaN
        e = torch.where(keep, torch.exp(s - m_exp), torch.zeros_like(s))
        z = e.sum(-1, keepdim=True)
        masked = torch.where(keep, s, torch.full_like(s, float("-inf")))
        sorted_s, order = torch.sort(masked, dim=-1)
        cum = torch.gather(e, 1, order).cumsum(-1)
        # F(t): the cumulative mass up to the LAST member of t's tie group (all of a tie group share one fate).
        last = torch.searchsorted(sorted_s.contiguous(), masked.contiguous(), right=True) - 1
        F = torch.gather(cum, 1, last.clamp(min=0))
        thr = torch.tensor(1.0 - float(top_p), dtype=torch.float32) * z
        keep = keep & ((F > thr) | (s == m))
    return keep


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    suppress_ranges: Sequence[tuple[int, int]] | torch.Tensor | None = None,
    repetition_penalty: float = 1.0,
    prev_ids: torch.Tensor | None = None,
    seed: int | torch.Tensor | None = None,
    offset: int | torch.Tensor | None = None,
    greedy: bool = False,
) -> torch.Tensor:
    """Draw one id per row of ``logits`` ``[B, V]`` (any float dtype); returns int64 ``[B]`` (see module doc).

    seed / offset: ints or int64 tensors ``[]``, ``[1]`` or ``[B]`` (per-row streams). ``seed=None`` draws a seed
    from torch's default generator.
    """
    B, V = logits.shape
    s = apply_processors(logits, suppress_ranges=suppress_ranges, repetition_penalty=repetition_penalty,
                         prev_ids=prev_ids)
    if greedy:
        return s.argmax(-1)  # first maximal index on ties
    if temperature != 1.0:
        s = s * (1.0 / float(temperature))  # the fp32 reciprocal, as torch's CUDA division by a scalar
    s = torch.where(s == 0, torch.zeros_like(s), s)  # -0.0 == +0.0, as the kernels' ordered keys need
    keep = keep_mask(s, top_k=top_k, top_p=top_p)
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    seed_t = seed_tensor(seed, B, logits.device, "seed")
    off_t = seed_tensor(0 if offset is None else offset, B, logits.device, "offset")
    race = torch.where(keep, s + gumbel_noise(seed_t, off_t, B, V), torch.full_like(s, float("-inf")))
    return race.argmax(-1)
