"""Runs one MTP frame as one launch of the persistent kernel (:mod:`omni_fast.kernels.mtp_persistent`).

:class:`PersistentFrame` holds, for one (model weights, batch size, dtype, device, sampling settings, seed form,
codebook-0 source): the schedule (:func:`.schedule.build_frame`, checked once by :func:`.schedule.check_schedule`),
the frame's workspace (residual stream, qkv / attention / activation / logits buffers, KV caches, codes, counters,
error flag) and the item table (int64 ``[n_items, W]``, raw addresses of the weights and buffers). A call copies
nothing: the inputs and outputs are kernel arguments, so a CUDA graph can capture the one launch.
"""

from __future__ import annotations

import torch
import triton

from ...kernels import mtp_persistent as K
from ...kernels.launch import interpreting, launch
from ...kernels.mtp_gemv import gemv_blocks
from ...kernels.sampling import NWAY, block_size
from ..cuda_graphs import ModelRef
from .schedule import FrameShape, build_frame, check_schedule
from .watch import FlagWatch

NUM_WARPS = 4  # the GEMV / attention kernels' warps (the sampler's 8 spill with everything else inlined)
# Spins per wait before the watchdog gives up. One spin is an L2 round trip or two (~0.1-1 us), so 2^22 is ~0.4-4 s:
# a hang, never a slow frame (a wait lasts at most one frame, ~ms). (2^26 was up to a minute: a deadlock on the
# first GPU run would have eaten most of the tests step's time box and its 60 s per-test limit.)
SPIN_LIMIT = 1 << 22


class PersistentError(RuntimeError):
    """The persistent kernel's watchdog fired in an earlier launch (eager or a graph replay): a wait did not complete
    within the spin limit. Raised by the next call once the flag's copy has reached the host; :meth:`reset`."""


class PersistentFrame:
    """One MTP frame as one launch of the persistent kernel, for a fixed (model, batch B, dtype, device, sampling,
    seed form, codebook-0 source): see the module doc. Calling it runs the frame (:meth:`__call__`)."""

    # its workspace, parameters and schedule are normal tensors even when built under torch.inference_mode(): reset()
    # and later calls write them in place, inside the mode or outside it
    @torch.inference_mode(False)
    def __init__(self, model, B: int, dtype: torch.dtype, device, sampling: tuple, per_row: bool, c0_embed: bool,
                 *, tiles: int | None = None, grid: int | None = None):
        c = model.config
        # one 16-column tile per item while there are few rows (spread the weights over every SM), 4 from B > 16
        # (the rows give enough items; fewer counter operations per frame)
        tiles = tiles or (1 if B <= 16 else 4)
        # the model weakly (it keeps its frames: a cycle would hold both, workspace and weights, until a full gc)
        self._model = ModelRef(model, "CodePredictor")
        self.B, self.sampling, self.per_row, self.c0_embed = B, sampling, per_row, c0_embed
        self.shape = s = FrameShape.of(c, B, tiles=tiles, rvq_block=min(triton.next_power_of_2(max(c.hidden_size, 16)),
                                                                          1024))
        self.schedule = build_frame(s, c0_embed=c0_embed)
        self.summary = check_schedule(self.schedule, hazards=len(self.schedule.items) <= 4000)
        kw = dict(dtype=dtype, device=device)
        H, G, V, d = s.hidden, s.groups, s.vocab, s.head_dim
        self.ws = ws = {
            "resid": torch.zeros(2 * B, H, **kw), "qkv": torch.zeros(2 * B, s.qkv_cols, **kw),
            "attn": torch.zeros(2 * B, s.nq * d, **kw), "act": torch.zeros(2 * B, s.inter, **kw),
            "logits": torch.zeros(B, V, **kw), "e0": torch.zeros(max(B, 1), H, **kw),
            "kc": torch.zeros(s.layers, B, s.nk, G, d, **kw), "vc": torch.zeros(s.layers, B, s.nk, G, d, **kw),
            "codes": torch.zeros(G, B, dtype=torch.long, device=device),
            "offsets": torch.arange(G, dtype=torch.long, device=device),
            "counters": torch.zeros(max(len(self.schedule.counters), 1), dtype=torch.int32, device=device),
            "err": torch.zeros(1, dtype=torch.int32, device=device),
        }
        consts = model._constants(device, B, dtype)
        self.cos, self.sin = consts["cos"], consts["sin"]
        self.items = self._encode().to(device)
        V0 = model.codec_vocab_size
        table = model.table
        esz = table.element_size()
        first = [0] + [V0 + g * V for g in range(G - 1)]
        base = [f * H for f in first]
        rows = [V0] + [V] * (G - 1)  # each group's own codebook: rvq_tile clamps every gathered id into it
        if c0_embed:  # group 0: row b of the e0 buffer (the given embeddings), addressed from the table's pointer
            base[0], rows[0] = (ws["e0"].data_ptr() - table.data_ptr()) // esz, B
        gb, gs, gr = (torch.tensor(v, dtype=torch.long, device=device) for v in (base, [H] * G, rows))
        self._keep = (gb, gs, gr)
        prm = dict(table=_addr(table), resid=_addr(ws["resid"]), e0=_addr(ws["e0"]), codes=_addr(ws["codes"]), B=B,
                   H=H, cos=_addr(self.cos), sin=_addr(self.sin), stride_cs=self.cos.stride(0), n_q=s.nq, n_kv=s.nk,
                   L=G, V=V, top_k=int(sampling[1]) if sampling[0] else 0, gb=_addr(gb), gs=_addr(gs), gr=_addr(gr),
                   seed_stride=1 if per_row else 0)
        self.params = torch.tensor([prm[k] for k in K.PARAMS], dtype=torch.long, device=device)
        # 16-byte alignment of every address and every row size / stride the GEMV items use (the kernel's ALIGNED);
        # not the code-index pointer (field 10: row (step-1)*B of the int64 codes, 8-byte aligned for odd B), which
        # the kernel never claims aligned (else every odd B, B = 1 included, lost ALIGNED: spills, no cp.async)
        # The attention items claim their six pointers (fields 6-11: qkv, caches, output, q/k norm weights) aligned
        # too (_attention's A), so they are checked as well: a q/k norm weight that is a view into packed storage
        # must turn ALIGNED off, not make the kernel assume 16-byte vector loads.
        gemv = [K.OP[o] for o in ("norm", "gather", "swiglu", "o", "down")]
        attn = [K.OP[o] for o in ("attn_prefill", "attn_decode")]
        rows_ = self.items.cpu()
        g_rows = rows_[torch.isin(rows_[:, 0], torch.tensor(gemv))]
        a_rows = rows_[torch.isin(rows_[:, 0], torch.tensor(attn))]
        self.aligned = bool((g_rows[:, [6, 7, 8, 9, 11]] % 16 == 0).all() and (g_rows[:, [14, 15, 16]] % 16 == 0).all()
                            and (a_rows[:, 6:12] % 16 == 0).all()
                            and all(prm[k] % 16 == 0 for k in ("cos", "sin", "resid", "codes"))
                            and d % 16 == 0)
        self.grid = 1 if interpreting() else grid
        self.spin_limit = SPIN_LIMIT  # per frame: a graph captures the value of its capture time
        # the error flag seen from the host without a sync; eager calls record it themselves, a graph that
        # captured this frame records it after each replay (models.frame_graph.FrameGraph)
        self.watch = FlagWatch(ws["err"])

    # --- item table ---------------------------------------------------------------------------------------------

    @property
    def model(self):
        """The :class:`~omni_fast.models.CodePredictor` this frame was built for (held weakly: it holds its frames;
        a ``ReferenceError`` once it was freed: the item table holds its weights' addresses)."""
        return self._model.get()

    def _encode(self) -> torch.Tensor:
        rows = [self._row(it) for it in self.schedule.items]
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), K.W)

    def _row(self, it) -> list[int]:
        r = [0] * K.W
        r[0] = K.OP[it.op]
        r[1:5] = [-1, 0, -1, 0]
        for j, (c, t) in enumerate(it.waits):
            r[1 + 2 * j: 3 + 2 * j] = [c, t]
        r[5] = -1 if it.signal is None else it.signal
        a, m, ws, s = it.args, self.model, self.ws, self.shape
        p = _addr
        if it.op in ("norm", "gather", "swiglu", "o", "down"):
            layer = m.layers[a["layer"]] if "layer" in a else None
            H, T = s.hidden, a.get("T", 1)
            if a["weight"] == "lm_head":
                x, nw, w, out, sx, so = p(ws["resid"], (T - 1) * H), p(m.norm), p(m.lm_head[a["step"] - 1]), \
                    p(ws["logits"]), T * H, s.vocab
            elif it.op == "gather":
                table_row = m.codec_vocab_size + (a["step"] - 2) * s.vocab
                x, nw, w, out, sx, so = p(m.table, table_row * H), p(layer.input_norm), p(layer.qkv), p(ws["qkv"]), \
                    H, s.qkv_cols
            elif a["weight"] == "qkv":
                x, nw, w, out, sx, so = p(ws["resid"]), p(layer.input_norm), p(layer.qkv), p(ws["qkv"]), H, s.qkv_cols
            elif it.op == "swiglu":
                x, nw, w, out, sx, so = p(ws["resid"]), p(layer.post_norm), p(layer.gate_up), p(ws["act"]), H, s.inter
            elif it.op == "o":
                x, nw, w, out, sx, so = p(ws["attn"]), p(layer.o), p(layer.o), p(ws["resid"]), s.nq * s.head_dim, H
            else:
                x, nw, w, out, sx, so = p(ws["act"]), p(layer.down), p(layer.down), p(ws["resid"]), s.inter, H
            idx = p(ws["codes"], (a["step"] - 1) * s.B) if it.op == "gather" else p(ws["codes"])
            r[6:20] = [x, nw, w, out, idx, p(ws["resid"]), a["M"], a["N"], a["K"], sx, so, a["pid_m"], a["pid_n"],
                       a["n_tiles"]]
        elif it.op in ("attn_prefill", "attn_decode"):
            layer = m.layers[a["layer"]]
            r[6:16] = [p(ws["qkv"]), p(ws["kc"][a["layer"]]), p(ws["vc"][a["layer"]]), p(ws["attn"]),
                       p(layer.q_norm), p(layer.k_norm), a["b"], a["h"], a["start"], a["T"]]
        elif it.op == "prefill":
            r[6:8] = [a["row"], int(a["c0_embed"])]
        elif it.op == "sample":
            r[6:10] = [p(ws["logits"]), a["row"], p(ws["codes"], a["step"] * s.B), p(ws["offsets"], a["step"])]
        elif it.op == "rvq":
            r[6:8] = [a["row"], a["pid_d"]]
        elif it.op == "reset":
            r[6] = len(self.schedule.counters)
        return r

    # --- one frame ----------------------------------------------------------------------------------------------

    def __call__(self, x: torch.Tensor, c0: torch.Tensor, c0_embed: torch.Tensor | None, seed: torch.Tensor,
                 *, spin_limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x ``[B, H]`` (model dtype, contiguous), c0 int64 ``[B]``, c0_embed ``[B, H]`` or None (as built), seed
        int64 ``[1]`` or ``[B]`` (as built). Returns ``codes`` int64 ``[B, G]`` and ``next_input`` ``[B, H]``
        (defined even when this launch's watchdog trips: column 0 is ``c0``, every other code lies in
        ``[0, vocab)``, ``next_input`` is a finite embedding sum of valid ids; docs/persistent.md, Watchdog).
        ``spin_limit``: spins per wait (default :attr:`spin_limit`). Raises :class:`PersistentError` when an
        earlier launch tripped (seen without a host sync)."""
        self.check()
        s, ws, m = self.shape, self.ws, self.model
        B, H, G = s.B, s.hidden, s.groups
        codes = torch.empty(B, G, dtype=torch.long, device=x.device)
        nxt = torch.empty(B, H, dtype=x.dtype, device=x.device)
        do_sample, top_k, top_p, temperature = self.sampling
        top_k, top_p = (top_k, top_p) if do_sample else (0, 1.0)
        d = s.head_dim
        half = (d + 1) // 2
        blk = block_size(s.vocab)
        grid = self.grid or co_resident_grid(self, x.device)
        compiled = launch(
            K.mtp_frame_kernel, (grid,),
            self.items, self.items.shape[0], ws["counters"], ws["err"],
            int(self.spin_limit if spin_limit is None else spin_limit), self.params,
            x, c0, c0_embed if c0_embed is not None else x, seed, codes, nxt,
            float(m.config.rms_norm_eps), float(d**-0.5), 1.0 / float(temperature), 1.0 - float(top_p),
            BK_H=gemv_blocks(0, 0, H)["BLOCK_K"], BK_O=gemv_blocks(0, 0, s.nq * d)["BLOCK_K"],
            BK_I=gemv_blocks(0, 0, s.inter)["BLOCK_K"], UPCAST=interpreting(),
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            GROUP=s.nq // s.nk, BLOCK_Q1=triton.next_power_of_2(s.nq // s.nk),
            BLOCK_Q2=triton.next_power_of_2(2 * (s.nq // s.nk)), BLOCK_L=triton.next_power_of_2(max(G, 2)), D=d,
            HALF=half, BLOCK_HALF=triton.next_power_of_2(half),
            GREEDY=not do_sample, TEMPERATURE=do_sample and float(temperature) != 1.0,
            TOP_K=0 < int(top_k) < s.vocab, TOP_P=float(top_p) < 1.0, S_BLOCK=blk,
            S_NUM_BLOCKS=triton.cdiv(s.vocab, blk), NWAY=NWAY,
            G=G, BLOCK_G=triton.next_power_of_2(G), RVQ_BLOCK=s.rvq_block, BLOCK_H=triton.next_power_of_2(H),
            ALIGNED=self.aligned, PREFETCH=not interpreting(),  # inline PTX: not on the interpreter
            PF_LINES=triton.next_power_of_2(triton.cdiv(max(H, s.nq * d, s.inter) * x.element_size(), 128)),
            num_warps=NUM_WARPS, device=x.device,
        )
        if self.grid is None and getattr(self, "_compiled", None) is None:
            # first GPU launch: one program per SM (co-resident whenever the kernel runs at all); from now on the
            # occupancy of the compiled kernel
            self._compiled = compiled
        # The flag's copy, for the next call's check (inside a capture this does nothing: the graph's replays
        # record it). Without the check, every frame after a trip would skip its work (drain: defined, in-range
        # but meaningless outputs) until reset(), silently.
        self.watch.record()
        return codes, nxt

    def check(self) -> None:
        """Raise :class:`PersistentError` if an earlier launch's (or replay's) flag copy has landed holding an
        error. No host sync: a copy still in flight is looked at by a later call."""
        flag = self.watch.tripped()
        if flag:
            raise PersistentError(f"the persistent MTP frame's watchdog fired in an earlier call (item {flag - 1} "
                                  "waited longer than the spin limit): its codes (defined and in range, but not "
                                  "the model's) and every later frame's are not valid; call "
                                  "omni_fast.models.persistent.reset_persistent(x) with x the CodePredictor, the "
                                  "Qwen3Omni pipeline or the patched model (or this frame's reset()) (a hang: "
                                  "please report it with the batch size and device)")

    def error(self) -> int:
        """0, or the index + 1 of the first item whose wait timed out (a host sync: call it in tests / on
        suspicion, not per frame). After an error the counters are left as they were: call :meth:`reset`."""
        return int(self.ws["err"].item())

    def reset(self) -> None:
        """Zero the counters and the error flag (stream-ordered after the launch that tripped) and forget the
        recorded flag: the next frame runs the whole schedule again."""
        self.ws["counters"].zero_()
        self.ws["err"].zero_()
        self.watch.clear()


def _addr(t: torch.Tensor, elems: int = 0) -> int:
    return t.data_ptr() + elems * t.element_size()


def co_resident_grid(frame: PersistentFrame, device) -> int:
    """The largest grid whose programs are all resident at once on ``device`` (deadlock freedom needs that): SMs x
    blocks per SM from the compiled kernel's registers, shared memory and warps; never more than the items.
    One program per SM (always co-resident) while any of those is unknown: no compiled kernel yet, or one without
    a register count (Triton sets ``CompiledKernel.n_regs`` when it loads the binary, at the first launch; taken as
    1 register, the thread limit alone would decide, more programs than the registers allow: a deadlock)."""
    props = torch.cuda.get_device_properties(device)
    sms = props.multi_processor_count
    per_sm = 1
    compiled = getattr(frame, "_compiled", None)
    meta = getattr(compiled, "metadata", None)
    regs = getattr(compiled, "n_regs", None)
    warps = getattr(meta, "num_warps", None)
    if isinstance(regs, int) and regs > 0 and isinstance(warps, int) and warps > 0:
        smem = int(getattr(meta, "shared", 0) or 0)
        by_regs = props.regs_per_multiprocessor // (((regs * 32 + 255) // 256) * 256 * warps)
        by_threads = props.max_threads_per_multi_processor // (32 * warps)
        by_smem = (props.shared_memory_per_multiprocessor // smem) if smem else by_threads
        per_sm = max(1, min(by_regs, by_threads, by_smem))
    return max(1, min(sms * per_sm, len(frame.schedule.items)))
