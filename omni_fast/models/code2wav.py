"""Code2Wav, Qwen3-Omni's vocoder: 16-codebook frames at 12.5 Hz -> 24 kHz audio, one-shot and exact streaming.

``Code2Wav.forward(codes)`` equals transformers' ``Qwen3OmniMoeCode2Wav``. ``Code2Wav.stream(batch_size)`` returns a
:class:`Code2WavStream` whose ``push(codes_chunk)`` returns every sample that is final so far; concatenating the
pushes equals the one-shot decode sample for sample.

Why streaming is exact and needs no look-ahead (see docs/code2wav.md): every layer is causal.

- The pre-transformer is causal attention over a sliding window of ``W = 72`` frames: a frame needs the keys and
  values of the previous ``W - 1`` frames, kept per layer in a small KV cache; RoPE uses absolute frame positions.
  It runs on omni-fast ops (``flash_attn_with_kvcache`` with ``window_size=(W-1, 0)``, ``mrope`` with 1-D
  positions, the fused residual-add + RMSNorm and SiLU-and-mul of the MTP layers); only the projections are
  ``F.linear`` (cuBLAS) and the LayerScales plain elementwise products.
- Every ``CausalConvNet`` has stride 1: output ``t`` needs inputs ``t - (k-1)d .. t``; each keeps the last
  ``(k-1)d`` raw inputs (zeros at the start, which is exactly transformers' zero padding since SnakeBeta(0) = 0).
- A ``CausalTransConvNet`` with ``k = m * s`` trims ``k - s`` samples at both ends, so output block ``q`` depends on
  inputs ``q .. q + m - 1``: with ``m = 2`` (decoder blocks, ``k = 2r``) the first input of a stream yields nothing
  and every later one yields ``r`` samples, with a one-sample state; ``m = 1`` (the x2 upsamplers) needs no state.

So the decode of ``T`` frames is a prefix of the decode of any continuation: ``push`` returns exactly the new
samples (``1920 t`` per ``t`` frames after the first push, ``1920 t - 555`` on the first, with the real config) and
``finish()`` has no tail to flush.

Batches: the rows of a stream are independent streams that push the same number of frames per call (one chunk
length per push, so shapes stay fixed for CUDA graphs). Each row has its own position (``StreamState.pos [B]``, on
the device) and its own valid KV-cache length, so :meth:`Code2WavStream.reset` can start a new utterance in some rows
while the others keep streaming. A reset row's first push returns ``lead_samples`` zeros (555 with the real config:
the samples a stream's very first push does not return) and then its audio, exactly its one-shot decode.
Rows whose utterance ended early can keep pushing any codes (e.g. zeros) until reset: the prefix property means
the samples already returned never change.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F

from .. import fast_paths, ops
from ..backend import graph_capturable
from ..ops import mtp_layers
from ..ops.code2wav import pack_conv1d_weight, pack_conv_transpose1d_weight
from ..reference import code2wav as ref
from ..reference.code2wav import Code2WavConfig
from ..validation import INT_DTYPES, check_index_range, check_positive_int, check_tensor
from .code2wav_state import (StreamState, _check_state_format, _clone_state, _kv_shape, _leave_inference_mode,
                             _new_state, _restore_state, _row_mask, _stacked_kv)
from .code2wav_weights import _check_state_dict, _expected_shapes, _fold_gamma, _fuse_layer
from .._cache_memory import copy_changed
from .._device import on_device
from .cuda_graphs import capture

class Code2Wav:
    """Code2Wav with omni-fast ops. Weights are a transformers ``Qwen3OmniMoeCode2Wav`` state dict (its names);
    the conv weights are repacked once here, and each pre-transformer layer's q/k/v and gate/up projections are
    concatenated once (one GEMM each; ``sd`` keeps the per-projection names as views of the fused weights).
    ``backend`` (None = the usual choice) applies to every op."""

    def __init__(self, config, state_dict: Mapping[str, torch.Tensor], *, backend: str | None = None,
                 check_finite: bool = False):
        self.config = cfg = Code2WavConfig.coerce(config)
        _check_state_dict(cfg, state_dict)
        if check_finite:  # NaN/inf weights give a NaN waveform (the final clamp passes NaN): refuse them here
            bad = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
            if bad:
                raise ValueError(f"state_dict has non-finite (NaN/inf) Code2Wav weights: {', '.join(sorted(bad))}")
        self.backend = backend
        sd = {k: v.detach() for k, v in state_dict.items() if k in _expected_shapes(cfg)}
        for name in self._conv_names():
            sd[name] = pack_conv1d_weight(sd[name])
        for name in self._transposed_names():
            sd[name] = pack_conv_transpose1d_weight(sd[name])
        self._fused = [_fuse_layer(cfg, sd, f"pre_transformer.layers.{i}.") for i in range(cfg.num_hidden_layers)]
        self._pwconv2 = [_fold_gamma(sd, f"upsample.{i}.1.") for i in range(len(cfg.upsampling_ratios))]
        self.sd = sd
        self.dtype = sd["code_embedding.weight"].dtype
        self.device = sd["code_embedding.weight"].device
        # computed on the CPU and moved, as transformers' rotary embedding buffer is (bitwise the same frequencies)
        self._inv_freq = (1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float)
                                                    / cfg.head_dim))).to(self.device)

    # --- construction ------------------------------------------------------------------------------------------

    @classmethod
    def from_transformers(cls, module, *, backend: str | None = None, check_finite: bool = False) -> "Code2Wav":
        """From a transformers ``Qwen3OmniMoeCode2Wav`` (weights shared, not copied, except the packed convs and the
        fused q/k/v and gate/up projections). ``check_finite``: refuse NaN/inf weights (one host sync per tensor)."""
        return cls(Code2WavConfig.from_transformers(module.config), module.state_dict(), backend=backend,
                   check_finite=check_finite)

    @classmethod
    def from_state_dict(cls, config, state_dict: Mapping[str, torch.Tensor], *, backend: str | None = None,
                        check_finite: bool = False) -> "Code2Wav":
        """From a config (``Code2WavConfig``, a transformers ``Qwen3OmniMoeCode2WavConfig`` or a dict) and a state
        dict with transformers' parameter names (a ``code2wav.`` prefix is stripped). ``check_finite``: refuse
        NaN/inf weights."""
        sd = {(k[len("code2wav."):] if k.startswith("code2wav.") else k): v for k, v in state_dict.items()}
        return cls(config, sd, backend=backend, check_finite=check_finite)

    def to(self, device=None, dtype=None) -> "Code2Wav":
        """A copy with the weights on ``device`` / in ``dtype``."""
        sd = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in self.sd.items()}
        return Code2Wav(self.config, sd, backend=self.backend)

    def _conv_names(self):
        cfg = self.config
        names = [f"upsample.{i}.1.dwconv.conv.weight" for i in range(len(cfg.upsampling_ratios))]
        names.append("decoder.0.conv.weight")
        for i in range(len(cfg.upsample_rates)):
            for j in range(3):
                names += [f"decoder.{i + 1}.block.{j + 2}.conv1.conv.weight",
                          f"decoder.{i + 1}.block.{j + 2}.conv2.conv.weight"]
        names.append(f"decoder.{len(cfg.upsample_rates) + 2}.conv.weight")
        return names

    def _transposed_names(self):
        cfg = self.config
        return ([f"upsample.{i}.0.conv.weight" for i in range(len(cfg.upsampling_ratios))]
                + [f"decoder.{i + 1}.block.1.conv.weight" for i in range(len(cfg.upsample_rates))])

    # --- decoding ----------------------------------------------------------------------------------------------

    @property
    def total_upsample(self) -> int:
        return self.config.total_upsample

    def num_samples(self, frames: int) -> int:
        """Samples of the one-shot decode of ``frames`` frames (``1920 * frames - 555`` for the real config)."""
        return self.config.num_samples(frames)

    @torch.no_grad()
    def forward(self, codes: torch.Tensor, *, check_values: bool | None = None) -> torch.Tensor:
        """codes int ``[B, G, T]`` -> wav ``[B, 1, num_samples(T)]`` in the weights' dtype, as transformers.

        ``check_values``: whether to check that every code lies in ``[0, codebook_size)`` (a host sync on CUDA).
        The default (None) checks CPU tensors only, as every omni-fast op does (:mod:`omni_fast.validation`); an
        out-of-range code on CUDA is then not caught (the embedding lookup reads out of bounds). Pass True on CUDA
        to check (never while capturing a CUDA graph)."""
        self._check_codes(codes, check_values=check_values)
        return self.stream(codes.shape[0], cuda_graphs=False).push(codes, check_values=False)

    __call__ = forward

    @torch.no_grad()
    def chunked_decode(self, codes: torch.Tensor, chunk_size: int = 300, left_context_size: int = 25, *,
                       check_values: bool | None = None) -> torch.Tensor:
        """transformers' ``chunked_decode``: decode chunks of ``chunk_size`` frames, each re-decoding up to
        ``left_context_size`` previous frames and dropping their ``left_context * 1920`` samples. (It differs from
        the one-shot decode at every chunk boundary; :meth:`stream` is the exact, cheaper way to stream.)
        ``check_values`` as in :meth:`forward`."""
        self._check_codes(codes, check_values=check_values)
        chunk_size = check_positive_int("chunk_size", chunk_size)
        left_context_size = check_positive_int("left_context_size", left_context_size, minimum=0)
        wavs, start = [], 0
        while start < codes.shape[-1]:
            end = min(start + chunk_size, codes.shape[-1])
            ctx = left_context_size if start - left_context_size > 0 else start
            wav = self.forward(codes[..., start - ctx:end], check_values=False)
            wavs.append(wav[..., ctx * self.total_upsample:])
            start = end
        if not wavs:
            return codes.new_zeros(codes.shape[0], 1, 0, dtype=self.dtype)
        return torch.cat(wavs, dim=-1)

    def stream(self, batch_size: int = 1, *, state: StreamState | None = None, cuda_graphs: bool | None = None,
               graph_buckets=(1, 2, 4, 8, 16, 32, 64)) -> "Code2WavStream":
        """A stateful decoder for ``batch_size`` independent streams (optionally taking over ``state``; the
        stream that produced it must not be used afterwards). See :class:`Code2WavStream` for ``cuda_graphs`` and
        for reusing one stream across utterances (:meth:`Code2WavStream.reset`)."""
        return Code2WavStream(self, batch_size, state, cuda_graphs=cuda_graphs, graph_buckets=graph_buckets)

    def _check_codes(self, codes: torch.Tensor, batch_size: int | None = None, *,
                     check_values: bool | None = None) -> None:
        cfg = self.config
        if isinstance(codes, torch.Tensor) and codes.is_floating_point():
            raise TypeError(f"codes must be an integer tensor (int32 or int64), got {codes.dtype}")
        check_tensor("codes", codes, dtypes=INT_DTYPES, ndim=3, device=self.device)
        if codes.shape[1] != cfg.num_quantizers:
            raise ValueError(f"codes must have {cfg.num_quantizers} codebooks (shape [B, G, T]), got {codes.shape[1]}")
        if batch_size is not None and codes.shape[0] != batch_size:
            raise ValueError(f"codes must have batch size {batch_size} (the stream's), got {codes.shape[0]}")
        check_index_range("codes", codes, 0, cfg.codebook_size, check_values=check_values)

    def _lead_samples(self, frames: int) -> list[int] | None:
        """Per decoder block, the lead (samples at the start of a reset row's first push that its one-shot decode
        does not have; they must read as zeros to the next layer) when that push has ``frames`` frames, plus the
        final lead; None when the lead of some layer would not fit in the push (see :meth:`Code2WavStream.reset`).

        A transposed conv with ``k = 2r`` and a state yields ``r`` samples per input, one block more than the
        one-shot decode's trimmed start: lead ``p`` in gives ``(p + 1) r`` out (555 = ((8 * 5 + 5) * 4 + 4) * 3 + 3
        for the real rates)."""
        cfg = self.config
        n = frames * math.prod(cfg.upsampling_ratios)
        lead, leads = 0, []
        for r in cfg.upsample_rates:
            if lead + 1 > n:  # its lead would spill into the next push
                return None
            lead, n = (lead + 1) * r, n * r
            leads.append(lead)
        return leads


class Code2WavStream:
    """``push(codes [B, G, t]) -> wav [B, 1, n]`` with every sample final so far; ``finish()`` ends the stream.

    The ``B`` rows are independent streams that push ``t`` frames each per call (one chunk length for all rows).
    :meth:`reset` starts a new utterance in chosen rows (zeroes their state and position) while the others go on,
    so a serving stack keeps one long-lived stream per batch bucket and recycles rows as utterances finish.

    ``cuda_graphs`` (default None: on for a model on a CUDA device whose backend can be captured, i.e. not
    ``"reference"``, outside ``torch.compile``; off on the CPU; ``False`` opts out, ``True`` insists and raises where
    it cannot run): after the first push (which creates the per-layer states), each push is cut
    into pieces whose sizes are in ``graph_buckets`` (any chunking gives the same audio) and every piece replays a
    CUDA graph captured once per bucket for this stream's batch size (plus one per bucket for the first push after a
    :meth:`reset`, which masks the reset rows' lead). Graphs survive :meth:`reset` (it updates the state in place);
    :meth:`finish` ends the stream and frees them.
    """

    def __init__(self, model: Code2Wav, batch_size: int, state: StreamState | None = None, *,
                 cuda_graphs: bool | None = None, graph_buckets=(1, 2, 4, 8, 16, 32, 64)):
        self.model = model
        batch_size = check_positive_int("batch_size", batch_size)
        if state is None:
            state = _new_state(model, batch_size)
        elif not isinstance(state, StreamState):
            raise TypeError(f"state must be a StreamState, got {type(state).__name__}")
        elif state.config != model.config:
            raise ValueError("state comes from a Code2Wav with another config")
        elif state.batch_size != batch_size:
            raise ValueError(f"state has batch size {state.batch_size}, the stream {batch_size}")
        else:
            _check_state_format(state, batch_size)
            tensors = dict(state.conv, pos=state.pos, fresh=state.fresh)
            if len(state.kv) != model.config.num_hidden_layers:
                raise ValueError(f"state has {len(state.kv)} KV caches, the model "
                                 f"{model.config.num_hidden_layers} pre-transformer layers")
            kv_shape = _kv_shape(model.config, batch_size)
            for i, (k, v) in enumerate(state.kv):
                for name, t in ((f"kv[{i}] k", k), (f"kv[{i}] v", v)):
                    if tuple(t.shape) != kv_shape:
                        raise ValueError(f"state tensor {name} has shape {list(t.shape)}, expected "
                                         f"{list(kv_shape)} ([B, W-1, Hk, D])")
                    tensors[name] = t
            for name, t in tensors.items():
                if t.device != model.device or (t.is_floating_point() and t.dtype != model.dtype):
                    raise ValueError(f"state tensor {name} has {t.dtype} on {t.device}, the model "
                                     f"{model.dtype} on {model.device}")
        self.state = state
        if cuda_graphs is None:  # the default: graphs wherever they can be captured
            cuda_graphs = (model.device.type == "cuda" and graph_capturable(model.backend)
                           and not torch.compiler.is_compiling())
        if cuda_graphs and model.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        if cuda_graphs and not graph_capturable(model.backend):
            raise ValueError("cuda_graphs=True needs the triton or cuda backend (the reference ops read values on "
                             "the host, which a capture forbids)")
        self.cuda_graphs = bool(cuda_graphs)
        self.graph_buckets = tuple(sorted({check_positive_int("graph bucket", int(b)) for b in graph_buckets}))
        self._graphs: dict[int, _GraphStep] = {}  # per bucket size
        self._fresh_graphs: dict[int, _GraphStep] = {}  # per bucket size, for the first push after a reset
        self._pool = None
        cfg, dev = model.config, model.device
        # constants of a push's index math, made once here so a push spends no arange / mul on them: the codebook
        # offsets of the embedding lookup, W-1 as a device scalar (the int32 cache_seqlens come from one clamp) and
        # -(W-1) .. max bucket, whose slices are every push's frame and row offsets (_push_consts)
        keep = cfg.sliding_window - 1
        self._code_offsets = ref.codebook_offsets(cfg, dev).view(-1)
        self._keep = torch.tensor(keep, device=dev)
        self._offsets = torch.arange(-keep, max(self.graph_buckets), device=dev)
        # the fast path code2wav_state_moves (opt-in until its gpu test has passed): conv states to move together
        self._move_states = fast_paths.enabled("code2wav_state_moves")
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (state, input) to move (_flush_states)
        # zeros before a reset row's audio (the same for any push length; 555 with the real config)
        self.lead_samples = (model._lead_samples(self._min_reset_frames()) or [0])[-1]

    def _min_reset_frames(self) -> int:
        """Fewest frames the stream's first push, and the first push after a reset, may have (1 for the real config;
        more only for layouts with little upsampling before the decoder blocks)."""
        t = 1
        while self.model._lead_samples(t) is None:
            t += 1
        return t

    @property
    def frames(self) -> int:
        return self.state.frames

    @torch.no_grad()
    def push(self, codes: torch.Tensor, *, check_values: bool | None = None) -> torch.Tensor:
        """Decode the next ``t >= 0`` frames of every row; returns the new samples ``[B, 1, n]`` (the same ``n`` for
        every row: ``num_samples(frames + t) - num_samples(frames)``). ``check_values`` as in
        :meth:`Code2Wav.forward` (default: CPU codes only)."""
        m, st = self.model, self.state
        if st.finished:
            raise RuntimeError("push after finish(): start a new stream")
        self._leave_inference_mode()
        m._check_codes(codes, st.batch_size, check_values=check_values)
        B, _, t = codes.shape
        if t == 0:
            return torch.zeros(B, 1, 0, dtype=m.dtype, device=m.device)
        fresh = st.reset_pending
        if (fresh or st.frames == 0) and t < self._min_reset_frames():
            raise ValueError(f"the first push (and the first after reset()) needs at least {self._min_reset_frames()} "
                             f"frames with this config's upsampling layout, got {t}")
        if not self.cuda_graphs or st.frames == 0:
            return self._step(codes, fresh)
        outs, i = [], 0
        with on_device(m.device):  # captures and replays on the model's device, whichever is current
            while i < t:
                n = max([b for b in self.graph_buckets if b <= t - i] or [1])
                if fresh and n < self._min_reset_frames():  # (never with the real config) one eager piece
                    n = t - i
                piece = codes[..., i:i + n]
                if n in self.graph_buckets:
                    graphs = self._fresh_graphs if fresh else self._graphs
                    graph = graphs.get(n)
                    if graph is None:
                        graph = graphs[n] = _GraphStep(self, n, fresh)
                        copy_changed(self)  # (its buffers: recorded anew by each stream leasing this one)
                    outs.append(graph(piece))
                else:
                    outs.append(self._step(piece, fresh))
                fresh = False
                i += n
        return torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]

    @torch.no_grad()
    def reset(self, rows) -> None:
        """Start a new utterance in ``rows`` (a bool mask ``[B]`` or row indices: a tensor on any device, a list or
        an int); the other rows keep streaming. Zeroes those rows' conv and attention states and positions (eager,
        in place, no host sync for a device mask: the CUDA graphs of this stream stay valid and are reused).

        The reset rows' next push returns, like every row's, ``num_samples(frames + t) - num_samples(frames)``
        samples: the first :attr:`lead_samples` of them are zeros (the samples a new stream's very first push does
        not return: 555 with the real config) and the rest is the new utterance's audio, exactly its one-shot
        decode from then on. That push needs at least one frame (more only for layouts with little upsampling
        before the decoder blocks). Before the stream's first push every row starts fresh anyway."""
        st = self.state
        if st.finished:
            raise RuntimeError("reset after finish(): start a new stream")
        self._leave_inference_mode()
        mask = _row_mask(rows, st.batch_size, st.pos.device)
        st.pos.masked_fill_(mask, 0)
        for k, v in st.kv:
            k.masked_fill_(mask[:, None, None, None], 0)
            v.masked_fill_(mask[:, None, None, None], 0)
        for c in st.conv.values():
            c.masked_fill_(mask[:, None, None], 0)
        if st.frames > 0:  # mid-stream: the reset rows' next push masks their lead
            st.fresh.logical_or_(mask)
            st.reset_pending = True

    def _leave_inference_mode(self) -> None:
        """A push / reset outside ``torch.inference_mode()`` after pushes under it: the state's inference tensors
        become ordinary copies (once), and graphs whose buffers are inference tensors (or read the replaced state)
        are dropped, to be captured again (in-place updates of inference tensors raise outside inference mode)."""
        if torch.is_inference_mode_enabled():
            return
        stale = _leave_inference_mode(self.state)
        if stale:
            copy_changed(self)  # (new state tensors, made on this stream)
        for graphs in (self._graphs, self._fresh_graphs):
            for n in [n for n, g in graphs.items() if stale or g.codes.is_inference()]:
                del graphs[n]

    def finish(self) -> torch.Tensor:
        """End the stream and free its CUDA graphs (to start a new utterance in a long-lived stream, use
        :meth:`reset` instead). Returns the tail ``[B, 1, 0]``: empty, since every layer is causal."""
        self.state.finished = True
        self._graphs.clear()
        self._fresh_graphs.clear()
        return torch.zeros(self.state.batch_size, 1, 0, dtype=self.model.dtype, device=self.model.device)

    # --- one step (graph-capturable once every state exists) ---------------------------------------------------

    def _step(self, codes: torch.Tensor, fresh: bool = False) -> torch.Tensor:
        """One push of ``t`` frames. ``fresh``: some rows were reset since their last push (``state.fresh``): mask
        their leads (:meth:`_mask_lead`), then clear ``state.fresh``."""
        m, st = self.model, self.state
        t = codes.shape[-1]
        # the mean of the G offset embeddings (reference.code2wav.embed_codes) in one launch, codes read in place
        h = self._pre_transformer(ops.rvq_embed(codes.transpose(1, 2), m.sd["code_embedding.weight"], reduce="mean",
                                                offsets=self._code_offsets, check_values=False, backend=m.backend))
        wav = self._convnet(h.permute(0, 2, 1), m._lead_samples(t) if fresh else None)
        st.pos += t
        st.frames += t
        if fresh:
            st.fresh.zero_()
            st.reset_pending = False
        return wav

    def _mask_lead(self, x: torch.Tensor, lead: int) -> torch.Tensor:
        """Zero the first ``lead`` samples of the reset rows of x ``[B, C, T]`` in place: what the one-shot decode
        does not have reads as the zero padding it has instead (SnakeBeta(0) = 0, so a conv's zero context)."""
        if lead > 0:
            x[..., :lead].masked_fill_(self.state.fresh[:, None, None], 0)
        return x

    def _push_consts(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For a push of ``t`` frames: ``(arange(t), arange(W-1) + t - (W-1))`` int64 on the device, as views of
        the stream's constant ``-(W-1) .. max bucket`` (no launch); a longer push (never a graph's: its pieces are
        buckets) makes them."""
        keep = self.model.config.sliding_window - 1
        if keep + t > self._offsets.numel():
            return torch.arange(t, device=self._offsets.device), torch.arange(t - keep, t, device=self._offsets.device)
        return self._offsets[keep:keep + t], self._offsets[t:t + keep]

    def _pre_transformer(self, h: torch.Tensor) -> torch.Tensor:
        """h ``[B, t, H]`` -> normed hidden states ``[B, t, H]``, attending through the per-layer KV caches.
        ``h`` (contiguous; the fresh code embedding) is the residual stream and is overwritten.

        Each layer's attention runs on a working cache ``[B, W-1+t, Hk, D]``: the state's ``W-1`` rows (the last
        ``n_b = min(pos[b], W-1)`` frames of row ``b`` first), ``flash_attn_with_kvcache`` appends the ``t`` new keys
        at row ``n_b`` (per-row ``cache_seqlens``) and attends with the causal window ``(W-1, 0)`` (bottom-right
        aligned: query ``i`` sits at row ``n_b + i``), then rows ``max(n_b+t-(W-1), 0) ..`` become row ``b``'s new
        state. RoPE positions are per token (``pos[b] + i``). One-shot decodes are the ``n = 0`` case; the kernel
        visits only the key blocks inside each query block's window, so long inputs cost O(T W), never a T x T mask.
        Shapes depend on ``t`` only and ``n`` stays on the device: one CUDA graph per chunk size.
        """
        m, st, cfg = self.model, self.state, self.model.config
        be = m.backend
        B, t, H = h.shape
        N, D = B * t, cfg.head_dim
        nq, nk = cfg.num_attention_heads, cfg.num_key_value_heads
        keep = cfg.sliding_window - 1  # a frame sees the previous W - 1 frames
        dev = h.device
        frame, tail = self._push_consts(t)
        # n_b = min(pos[b], W-1) valid cache rows per row, int32 (on the device: no host sync; one clamp, no cast)
        cache_seqlens = torch.clamp(st.pos, max=self._keep, out=torch.empty(B, dtype=torch.int32, device=dev))
        # per row, the working-cache rows that become its state, max(n_b + t - (W-1), 0) + j for j < W-1:
        # = clamp(pos, W-1-t, W-1) + (j + t - (W-1)) -> gather index [B, W-1, Hk, D]
        keep_rows = (st.pos.clamp(keep - t, keep)[:, None] + tail)[:, :, None, None].expand(B, keep, nk, D)
        positions = (st.pos[:, None] + frame).reshape(-1)  # [B * t], batch-major
        eps = cfg.rms_norm_eps
        h = h.reshape(N, H)  # the residual stream, updated in place by add_rms_norm_
        first_norm = ("pre_transformer.layers.0.input_layernorm.weight" if m._fused
                      else "pre_transformer.norm.weight")
        x = mtp_layers.add_rms_norm_(h, None, m.sd[first_norm], eps=eps, backend=be)
        stack = _stacked_kv(st)
        if stack is not None:  # every layer's working cache in one buffer: one copy in here, one gather out below
            work = torch.empty(stack.shape[:3] + (keep + t,) + stack.shape[4:], dtype=h.dtype, device=dev)
            work[:, :, :, :keep].copy_(stack)
        for i, w in enumerate(m._fused):
            qkv = F.linear(x, w["qkv"], w["qkv_bias"]).view(B, t, nq + 2 * nk, D)
            q, k, v = qkv[:, :, :nq], qkv[:, :, nq:nq + nk], qkv[:, :, nq + nk:]
            ops.mrope(q.view(N, nq, D), k.view(N, nk, D), positions, mrope_section=(D // 2, 0, 0),
                      interleaved=False, inv_freq=m._inv_freq, backend=be)
            past_k, past_v = st.kv[i]
            if stack is not None:
                k_cache, v_cache = work[0, i], work[1, i]
            else:
                k_cache = torch.empty(B, keep + t, nk, D, dtype=h.dtype, device=dev)
                v_cache = torch.empty_like(k_cache)
                k_cache[:, :keep].copy_(past_k)
                v_cache[:, :keep].copy_(past_v)
            o = ops.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens, causal=True,
                                            window_size=(keep, 0), backend=be)
            if stack is None:
                torch.gather(k_cache, 1, keep_rows, out=past_k)  # in place: fixed addresses for CUDA graphs
                torch.gather(v_cache, 1, keep_rows, out=past_v)
            o = F.linear(o.reshape(N, nq * D), w["o"], w["o_bias"])  # o / down carry the layer scales
            x = mtp_layers.add_rms_norm_(h, o, w["post_norm"], eps=eps, backend=be)
            mlp = F.linear(mtp_layers.silu_mul(F.linear(x, w["gate_up"]), backend=be), w["down"])
            x = mtp_layers.add_rms_norm_(h, mlp, w["next_norm"], eps=eps, backend=be)
        if stack is not None:  # each layer's new state, all in one gather (in place: fixed addresses for graphs)
            torch.gather(work, 3, keep_rows.expand(stack.shape), out=stack)
        return x.view(B, t, H)  # the last layer's next_norm is the final pre_transformer.norm

    # Conv states: a stream's first push creates them (the ops return each new state); every later push has each
    # conv write its new state in place (update_state=True: a copy per stateful conv, and a concatenation where a
    # push is shorter than the context) or, with the fast path code2wav_state_moves, runs the convs with
    # state_out=False, queues (state, input) and moves the queued states with one update_conv_states launch per
    # decoder block, after their convs have read them (4 launches a push with the real config instead of ~20). The
    # queued inputs are never written in place before the flush (a lead mask writes a conv's output before any conv
    # reads it).

    def _state(self, name: str, x: torch.Tensor, new: torch.Tensor) -> None:
        """After conv ``name`` read ``x`` and returned ``new``: keep its first state, or queue its move."""
        conv = self.state.conv
        state = conv.get(name)
        if state is None:
            conv[name] = new
        elif self._move_states and state.numel():  # (a layer without context has an empty state: nothing to move)
            self._pending.append((state, x))

    def _flush_states(self) -> None:
        if self._pending:
            ops.update_conv_states([s for s, _ in self._pending], [x for _, x in self._pending],
                                   backend=self.model.backend)
            self._pending.clear()

    def _conv(self, name: str, x: torch.Tensor, *, dilation: int = 1, groups: int = 1, snake=None, residual=None,
              clamp=None, channels_last_out: bool = False):
        sd = self.model.sd
        state = self.state.conv.get(name)
        y, new = ops.causal_conv1d(x, sd[name + ".weight"], sd.get(name + ".bias"), dilation=dilation,
                                   groups=groups, snake=snake, residual=residual, state=state, clamp=clamp,
                                   channels_last_out=channels_last_out,
                                   update_state=state is not None and not self._move_states,
                                   state_out=state is None or not self._move_states, backend=self.model.backend)
        self._state(name, x, new)
        return y

    def _convt(self, name: str, x: torch.Tensor, stride: int, snake=None):
        sd = self.model.sd
        state = self.state.conv.get(name)
        y, new = ops.causal_conv_transpose1d(x, sd[name + ".weight"], sd.get(name + ".bias"), stride=stride,
                                             snake=snake, state=state,
                                             update_state=state is not None and not self._move_states,
                                             state_out=state is None or not self._move_states,
                                             backend=self.model.backend)
        self._state(name, x, new)
        return y

    def _convnet(self, x: torch.Tensor, leads: list[int] | None = None) -> torch.Tensor:
        """The upsamplers and the decoder on x ``[B, H, t]``; returns the new samples ``[B, 1, n]``.

        ``leads`` (a push after a reset, from :meth:`Code2Wav._lead_samples`): per decoder block, the reset rows'
        lead after its transposed conv, masked before every stateful conv that reads it; the final lead is masked
        on the output. (Nothing before the first decoder block has a lead: the upsamplers have ``k = s``.)"""
        cfg, sd = self.model.config, self.model.sd
        mask = (lambda x, i: self._mask_lead(x, leads[i])) if leads is not None else (lambda x, i: x)
        self._pending.clear()  # (left over only by a push that raised)
        for i, f in enumerate(cfg.upsampling_ratios):
            p = f"upsample.{i}."
            x = self._convt(p + "0.conv", x, f)
            # written channels-last: the LayerNorm reads dw.permute(0, 2, 1) contiguous, with no hidden copy
            dw = self._conv(p + "1.dwconv.conv", x, groups=x.shape[1], channels_last_out=True)
            x = ref.convnext_pointwise(sd, p + "1.", x, dw, pwconv2=self.model._pwconv2[i])  # gamma folded
        x = self._conv("decoder.0.conv", x)
        for i, r in enumerate(cfg.upsample_rates):
            p = f"decoder.{i + 1}.block."
            x = mask(self._convt(p + "1.conv", x, r, snake=(sd[p + "0.alpha"], sd[p + "0.beta"])), i)
            for j, d in enumerate((1, 3, 9)):
                u = f"{p}{j + 2}."
                y = self._conv(u + "conv1.conv", x, dilation=d, snake=(sd[u + "act1.alpha"], sd[u + "act1.beta"]))
                # conv2 (k1) has no context, so y's lead needs no mask; the unit's output feeds a stateful conv
                x = mask(self._conv(u + "conv2.conv", y, snake=(sd[u + "act2.alpha"], sd[u + "act2.beta"]),
                                    residual=x), i)
            if i + 1 < len(cfg.upsample_rates):  # (the last block's states move with the output conv's)
                self._flush_states()
        n = len(cfg.upsample_rates)
        # the reference's final clamp(-1, 1), in the output conv's epilogue (no launch of its own)
        x = self._conv(f"decoder.{n + 2}.conv", x, snake=(sd[f"decoder.{n + 1}.alpha"], sd[f"decoder.{n + 1}.beta"]),
                       clamp=1.0)
        self._flush_states()
        return mask(x, n - 1) if n else x


class _GraphStep:
    """One CUDA graph of :meth:`Code2WavStream._step` for a fixed chunk size (CUDA only).

    Warm-up runs the step once on copies of the state (Triton autotuning, cuBLAS handles) and restores it; capture
    then records the step on static buffers: codes in, wav out, every state updated in place.
    """

    def __init__(self, stream: Code2WavStream, frames: int, fresh: bool = False):
        st = stream.state
        self.codes = torch.zeros(st.batch_size, stream.model.config.num_quantizers, frames, dtype=torch.long,
                                 device=stream.model.device)
        snapshot = _clone_state(st)
        if stream._pool is None:  # one memory pool for all of a stream's buckets: replays never overlap
            stream._pool = torch.cuda.graph_pool_handle()
        frames_before = st.frames
        self.graph, self.out = capture(lambda: stream._step(self.codes, fresh), stream.model.device, warmup=1,
                                       pool=stream._pool, after_warmup=lambda: _restore_state(st, snapshot))
        st.frames = frames_before  # capture records but does not run the step
        st.reset_pending = snapshot["reset_pending"]
        self.state, self.fresh = st, fresh

    def __call__(self, codes: torch.Tensor) -> torch.Tensor:
        self.codes.copy_(codes)
        self.graph.replay()
        self.state.frames += self.codes.shape[-1]
        if self.fresh:
            self.state.reset_pending = False
        return self.out.clone()


__all__ = ["Code2Wav", "Code2WavStream", "StreamState", "pack_conv1d_weight", "pack_conv_transpose1d_weight"]

