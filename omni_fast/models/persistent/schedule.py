"""The MTP frame as an instruction queue: work items, their dependency counters, and a checker (pure Python).

One frame of the code predictor (:class:`omni_fast.models.CodePredictor`; prefill + G-2 decode steps, sampling,
next Talker input) is cut into WORK ITEMS, listed in one global topological order:

- ``prefill``: frame row b's two prefill tokens (``h`` and the codebook-0 embedding) into the residual stream;
- ``gemv_*``: ``n_tiles`` adjacent ``16 x 16`` output tiles of one fused GEMV (``norm``: RMSNorm + plain linear
  (qkv, lm_head); ``gather``: the same with the codebook embedding gathered in the prologue (a decode step's first
  qkv); ``swiglu``: post-attention norm + gate/up + silu*up; ``o`` / ``down``: linear + residual add in place);
- ``attn_prefill`` / ``attn_decode``: one (sequence, kv head) of the fused attention (q/k norm, RoPE, cache write);
- ``sample``: one row's draw of one codebook step;
- ``rvq``: one (row, D block) of the next Talker input (sum of the G codebook embeddings);
- ``reset``: the last item, zeroes the counters for the next launch.

Dependencies are COUNTERS: an item may wait on at most two ``(counter, target)`` pairs and, when done, adds one to
at most one counter. Every target is the counter's total number of signallers, so "counter c reached its target"
means "every signaller of c finished" (a fixed set of items, whatever the execution order).

:func:`check_schedule` proves, on the schedule alone, what the persistent kernel relies on:

1. every signaller of a counter precedes (in queue order) every item that waits on it, and every target equals the
   number of signallers (so counters reach their targets, and a wait names a fixed set of predecessors);
2. data hazards: any two items that touch overlapping regions of a buffer, one of them writing, are ordered by the
   happens-before relation the counters induce (transitively), not just by queue position;
3. every item precedes the final ``reset`` (so zeroing the counters cannot race with a waiter).

With (1), a kernel that hands the items out in queue order to a grid of co-resident programs cannot deadlock
(docs/persistent.md); with (2), it computes what the sequential order computes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BLOCK_M = 16  # the GEMV tile (kernels/mtp_gemv.py gemv_blocks: one config for every M)
BLOCK_N = 16


@dataclass(frozen=True)
class FrameShape:
    """Shapes of one frame: the predictor's config plus the batch ``B``. ``tiles`` = GEMV output tiles (16 columns
    each) per work item (larger items: fewer counter operations, but fewer items to spread over the SMs: at B = 1
    the o / down projections have only 64 tiles, so the default is 1; the tiles themselves are computed the same
    way whatever the grouping)."""

    B: int
    hidden: int
    inter: int
    layers: int
    nq: int
    nk: int
    head_dim: int
    vocab: int
    groups: int
    tiles: int = 1
    rvq_block: int = 1024

    @property
    def qkv_cols(self) -> int:
        return (self.nq + 2 * self.nk) * self.head_dim

    @classmethod
    def of(cls, config, B: int, **kw) -> "FrameShape":
        """From a :class:`omni_fast.models.code_predictor.CodePredictorConfig`."""
        c = config
        return cls(B, c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
                   c.num_key_value_heads, c.head_dim, c.vocab_size, c.num_code_groups, **kw)


@dataclass
class Item:
    """One work item: ``op``, its arguments, up to two waits ``(counter, target)``, the counter it signals (or None),
    and the buffer regions it reads / writes (``(buffer, r0, r1, c0, c1)``, half-open) for the hazard check."""

    op: str
    args: dict
    waits: list[tuple[int, int]] = field(default_factory=list)
    signal: int | None = None
    reads: list[tuple] = field(default_factory=list)
    writes: list[tuple] = field(default_factory=list)


@dataclass
class Schedule:
    """One frame's work items in queue order (:class:`Item`) and the names of their counters (index -> name), for
    the frame shape ``shape``; made by :func:`build_frame`, checked by :func:`check_schedule`."""

    shape: FrameShape
    items: list[Item]
    counters: list[str]  # counter index -> name

    def targets(self) -> list[int]:
        """Number of signallers per counter (the value every counter reaches in one frame)."""
        n = [0] * len(self.counters)
        for it in self.items:
            if it.signal is not None:
                n[it.signal] += 1
        return n

    def op_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for it in self.items:
            out[it.op] = out.get(it.op, 0) + 1
        return out


class _Builder:
    def __init__(self, s: FrameShape):
        self.s = s
        self.items: list[Item] = []
        self.counters: list[str] = []
        self.signals: list[int] = []  # signallers per counter so far

    def counter(self, name: str) -> int:
        self.counters.append(name)
        self.signals.append(0)
        return len(self.counters) - 1

    def add(self, op, args, waits=(), signal=None, reads=(), writes=()):
        self.items.append(Item(op, dict(args), [w for w in waits if w is not None], signal, list(reads),
                               list(writes)))
        if signal is not None:
            self.signals[signal] += 1

    def done(self, c: int) -> tuple[int, int]:
        """A wait for every signaller of counter ``c`` (all of them are already in the queue)."""
        return c, self.signals[c]

    def gemv(self, op, name, M, N, K, waits, x, out, extra=None, out_cols=None, counter_of=None):
        """Items over the ``[M, N]`` output in ``tiles``-wide column groups (never across a ``counter_of`` edge)."""
        s = self.s
        mt = -(-M // BLOCK_M)
        nt = -(-N // BLOCK_N)
        sig_default = self.counter(name) if counter_of is None else None
        # M tiles innermost (as the one-op kernel's grid): the items that read one weight tile sit side by side in
        # the queue, so all but the first find it in L2
        n0 = 0
        while n0 < nt:
            cnt = min(s.tiles, nt - n0)
            sig = sig_default
            if counter_of is not None:
                sig, edge = counter_of(n0)  # the counter of tile n0 and the first tile of the next group
                cnt = min(cnt, edge - n0)
            c0, c1 = n0 * BLOCK_N, min(N, (n0 + cnt) * BLOCK_N)
            for pid_m in range(mt):
                r0, r1 = pid_m * BLOCK_M, min(M, (pid_m + 1) * BLOCK_M)
                reads = [r(r0, r1) for r in x]
                writes = [w(r0, r1, c0, c1, n0) for w in out]
                writes = [w for w in writes if w is not None]
                self.add(op, dict(M=M, N=N, K=K, pid_m=pid_m, pid_n=n0, n_tiles=cnt, **(extra or {})), waits, sig,
                         reads, writes + ([("resid", r0, r1, c0, c1)] if op in ("o", "down") else []))
            n0 += cnt
        return sig_default


def build_frame(s: FrameShape, *, c0_embed: bool = False) -> Schedule:
    """The frame's items in topological order (see the module doc). ``c0_embed``: codebook 0 comes from a given
    ``[B, H]`` embedding (the prefill copies it; the next-input sum reads row b of it) instead of the table."""
    b = _Builder(s)
    B, H, G, d = s.B, s.hidden, s.groups, s.head_dim
    qkv_n = s.qkv_cols
    group = s.nq // s.nk
    pre = b.counter("prefill")
    for r in range(B):
        b.add("prefill", dict(row=r, c0_embed=c0_embed), signal=pre,
              reads=[("x", r, r + 1, 0, H), ("c0", r, r + 1, 0, 1)] + ([("c0e", r, r + 1, 0, H)] if c0_embed else []),
              writes=[("resid", 2 * r, 2 * r + 2, 0, H), ("codes", 0, 1, r, r + 1)])
    ready = b.done(pre)  # the residual stream of the step is ready
    sample_c = None
    for g in range(1, G):
        T = 2 if g == 1 else 1
        M = B * T
        start = 0 if g == 1 else g
        rows = lambda r0, r1, c1=H: ("resid", r0, r1, 0, c1)  # noqa: E731
        for layer in range(s.layers):
            gather = layer == 0 and g > 1
            # qkv: one counter per kv head (its q heads, k and v), when tiles never straddle heads
            per_head = d % BLOCK_N == 0
            heads = [b.counter(f"g{g}.l{layer}.qkv.h{h}") for h in range(s.nk)] if per_head else None

            def head_of(n0, heads=heads):
                col = n0 * BLOCK_N
                j = col // d  # head column index in [q heads, k heads, v heads]
                kv = j // group if j < s.nq else (j - s.nq) % s.nk
                return heads[kv], (j + 1) * d // BLOCK_N

            if gather:
                x = [lambda r0, r1, g=g: ("codes", g - 1, g, r0, r1), lambda r0, r1: ("table", 0, 1, 0, 1)]
                out = [lambda r0, r1, c0, c1, n0: ("qkv", r0, r1, c0, c1),
                       lambda r0, r1, c0, c1, n0: ("resid", r0, r1, 0, H) if n0 == 0 else None]
            else:
                x = [rows]
                out = [lambda r0, r1, c0, c1, n0: ("qkv", r0, r1, c0, c1)]
            single = b.gemv("gather" if gather else "norm", f"g{g}.l{layer}.qkv", M, qkv_n, H, [ready], x, out,
                            dict(layer=layer, weight="qkv", step=g), counter_of=head_of if per_head else None)
            attn_c = b.counter(f"g{g}.l{layer}.attn")
            for r in range(B):
                for h in range(s.nk):
                    wait = b.done(heads[h]) if per_head else b.done(single)
                    qcols = [(h * group * d, (h + 1) * group * d), ((s.nq + h) * d, (s.nq + h + 1) * d),
                             ((s.nq + s.nk + h) * d, (s.nq + s.nk + h + 1) * d)]
                    cache = [(f"kc{layer}", r * s.nk + h, r * s.nk + h + 1, 0, start + T),
                             (f"vc{layer}", r * s.nk + h, r * s.nk + h + 1, 0, start + T)]
                    b.add("attn_prefill" if T == 2 else "attn_decode",
                          dict(layer=layer, b=r, h=h, start=start, T=T), [wait], attn_c,
                          reads=[("qkv", r * T, r * T + T, c0, c1) for c0, c1 in qcols] + cache,
                          writes=cache + [("attn", r * T, r * T + T, h * group * d, (h + 1) * group * d)])
            o_c = b.gemv("o", f"g{g}.l{layer}.o", M, H, s.nq * d, [b.done(attn_c)],
                         [lambda r0, r1: ("attn", r0, r1, 0, s.nq * d)], [], dict(layer=layer, weight="o"))
            gu_c = b.gemv("swiglu", f"g{g}.l{layer}.gate_up", M, s.inter, H, [b.done(o_c)], [rows],
                          [lambda r0, r1, c0, c1, n0: ("act", r0, r1, c0, c1)], dict(layer=layer, weight="gate_up"))
            dn_c = b.gemv("down", f"g{g}.l{layer}.down", M, H, s.inter, [b.done(gu_c)],
                          [lambda r0, r1: ("act", r0, r1, 0, s.inter)], [], dict(layer=layer, weight="down"))
            ready = b.done(dn_c)
        # lm_head on the last token of each sequence (rows b*T + T-1 of the residual stream)
        lm_c = b.gemv("norm", f"g{g}.lm_head", B, s.vocab, H, [ready],
                      [lambda r0, r1, T=T: ("resid", r0 * T, r1 * T, 0, H)],
                      [lambda r0, r1, c0, c1, n0: ("logits", r0, r1, c0, c1)], dict(weight="lm_head", step=g, T=T))
        sample_c = b.counter(f"g{g}.sample")
        for r in range(B):
            b.add("sample", dict(step=g, row=r), [b.done(lm_c)], sample_c, reads=[("logits", r, r + 1, 0, s.vocab)],
                  writes=[("codes", g, g + 1, r, r + 1)])
        ready = b.done(sample_c)
    rvq_c = b.counter("rvq")
    nd = -(-H // s.rvq_block)
    for r in range(B):
        for j in range(nd):
            b.add("rvq", dict(row=r, pid_d=j), [ready], rvq_c,
                  reads=[("codes", 0, G, r, r + 1)] + ([("c0e", r, r + 1, 0, H)] if c0_embed else []),
                  writes=[("next", r, r + 1, j * s.rvq_block, min(H, (j + 1) * s.rvq_block))])
    b.add("reset", {}, [b.done(rvq_c)], None, writes=[("counters", 0, 1, 0, 1)])
    return Schedule(s, b.items, b.counters)


class ScheduleError(AssertionError):
    """A schedule breaks one of the properties :func:`check_schedule` proves (the message names the first)."""


def check_schedule(sched: Schedule, *, hazards: bool = True) -> dict:
    """Verify the three properties of the module doc; raise :class:`ScheduleError` naming the first violation.
    ``hazards=False`` skips the (quadratic) data-hazard check for large schedules. Returns a summary dict."""
    items = sched.items
    targets = sched.targets()
    first_wait: dict[int, int] = {}
    last_signal: dict[int, int] = {}
    for i, it in enumerate(items):
        if len(it.waits) > 2:
            raise ScheduleError(f"item {i} ({it.op}) waits on {len(it.waits)} counters (at most 2)")
        for c, t in it.waits:
            if t != targets[c]:
                raise ScheduleError(f"item {i} ({it.op}) waits for {sched.counters[c]} = {t}, but it has "
                                    f"{targets[c]} signallers (a wait must name every signaller)")
            first_wait.setdefault(c, i)
        if it.signal is not None:
            last_signal[it.signal] = i
    for c, i in first_wait.items():
        if last_signal.get(c, -1) >= i:
            raise ScheduleError(f"counter {sched.counters[c]}: item {last_signal[c]} signals it after item {i} "
                                f"waits on it (not a topological order)")
    # happens-before: ancestors as bitsets (signallers of every counter waited on, and their ancestors)
    sig_bits = [0] * len(sched.counters)
    anc = [0] * len(items)
    for i, it in enumerate(items):
        a = 0
        for c, _ in it.waits:
            a |= sig_bits[c]
        anc[i] = a
        if it.signal is not None:
            sig_bits[it.signal] |= a | (1 << i)
    pairs = _check_hazards(items, anc) if hazards else 0
    full = (1 << (len(items) - 1)) - 1
    if items[-1].op != "reset" or anc[-1] != full:
        missing = [i for i in range(len(items) - 1) if not anc[-1] >> i & 1][:5]
        raise ScheduleError(f"the final reset must come after every item; not after {missing}")
    return dict(items=len(items), counters=len(sched.counters), hazard_pairs=pairs, ops=sched.op_counts())


def _overlap(a, b) -> bool:
    return a[0] == b[0] and a[1] < b[2] and b[1] < a[2] and a[3] < b[4] and b[3] < a[4]


def _check_hazards(items: list[Item], anc: list[int]) -> int:
    by_buf: dict[str, list[tuple[int, tuple, bool]]] = {}
    for i, it in enumerate(items):
        for reg in it.reads:
            by_buf.setdefault(reg[0], []).append((i, reg, False))
        for reg in it.writes:
            by_buf.setdefault(reg[0], []).append((i, reg, True))
    pairs = 0
    for accesses in by_buf.values():
        writers = [a for a in accesses if a[2]]
        for i, ri, _ in writers:
            for j, rj, _ in accesses:
                if j == i or not _overlap(ri, rj):
                    continue
                lo, hi = min(i, j), max(i, j)
                pairs += 1
                if not anc[hi] >> lo & 1:
                    raise ScheduleError(f"items {lo} ({items[lo].op} {items[lo].args}) and {hi} ({items[hi].op} "
                                        f"{items[hi].args}) touch {ri} / {rj} (one writes) without a dependency")
    return pairs
