"""Code2Wav, Qwen3-Omni's vocoder: 16-codebook frames at 12.5 Hz -> 24 kHz audio, one-shot and exact streaming.

``Code2Wav.forward(codes)`` equals transformers' ``Qwen3OmniMoeCode2Wav``. ``Code2Wav.stream(batch_size)`` returns a
:class:`Code2WavStream` whose ``push(codes_chunk)`` returns every sample that is final so far; concatenating the
pushes equals the one-shot decode sample for sample.

Why streaming is exact and needs no look-ahead (see docs/code2wav.md): every layer is causal.

- The pre-transformer is causal attention over a sliding window of ``W = 72`` frames: a frame needs the keys and
  values of the previous ``W - 1`` frames, kept per layer in a small KV cache; RoPE uses absolute frame positions.
- Every ``CausalConvNet`` has stride 1: output ``t`` needs inputs ``t - (k-1)d .. t``; each keeps the last
  ``(k-1)d`` raw inputs (zeros at the start, which is exactly transformers' zero padding since SnakeBeta(0) = 0).
- A ``CausalTransConvNet`` with ``k = m * s`` trims ``k - s`` samples at both ends, so output block ``q`` depends on
  inputs ``q .. q + m - 1``: with ``m = 2`` (decoder blocks, ``k = 2r``) the first input of a stream yields nothing
  and every later one yields ``r`` samples, with a one-sample state; ``m = 1`` (the x2 upsamplers) needs no state.

So the decode of ``T`` frames is a prefix of the decode of any continuation: ``push`` returns exactly the new
samples (``1920 t`` per ``t`` frames after the first push, ``1920 t - 555`` on the first, with the real config) and
``finish()`` has no tail to flush. Batched streams advance in lockstep; streams of different lengths can share a
batch by padding the shorter ones with any codes, then keeping the first :meth:`Code2Wav.num_samples` samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

from .. import ops
from ..ops.code2wav import pack_conv1d_weight, pack_conv_transpose1d_weight
from ..reference import code2wav as ref
from ..reference.code2wav import Code2WavConfig
from ..validation import INT_DTYPES, check_index_range, check_positive_int, check_tensor

# Longest query block the pre-transformer attends at once (bounds the explicit [Tq, Tk] mask of one-shot decodes;
# exact because the attention is windowed and the blocks run through all layers in order with the KV cache).
_ATTN_BLOCK = 256


@dataclass
class StreamState:
    """Everything a stream carries between pushes, tied to the model config that made it.

    Every tensor keeps its shape and address from the second push on (updates are in-place copies), which is what
    lets :class:`Code2WavStream` replay CUDA graphs: the KV caches are fixed ``[B, Hk, W-1, D]`` buffers whose
    not-yet-written slots (negative positions) are masked, and the RoPE position is a device scalar.
    """

    config: Code2WavConfig
    batch_size: int
    pos: torch.Tensor  # int64 0-d device tensor: the position of the next frame
    kv: list  # per pre-transformer layer: (k, v) [B, Hk, W-1, D] (None when W == 1)
    conv: dict = field(default_factory=dict)  # per conv layer: raw left context [B, C_in, ctx] (absent at start)
    frames: int = 0  # frames pushed so far (host copy of pos)
    finished: bool = False


class Code2Wav:
    """Code2Wav with omni-fast ops. Weights are a transformers ``Qwen3OmniMoeCode2Wav`` state dict (its names);
    the conv weights are repacked once here. ``backend`` (None = the usual choice) applies to the conv ops."""

    def __init__(self, config, state_dict: Mapping[str, torch.Tensor], *, backend: str | None = None):
        self.config = cfg = Code2WavConfig.coerce(config)
        _check_state_dict(cfg, state_dict)
        self.backend = backend
        sd = {k: v.detach() for k, v in state_dict.items() if k in _expected_shapes(cfg)}
        for name in self._conv_names():
            sd[name] = pack_conv1d_weight(sd[name])
        for name in self._transposed_names():
            sd[name] = pack_conv_transpose1d_weight(sd[name])
        self.sd = sd
        self.dtype = sd["code_embedding.weight"].dtype
        self.device = sd["code_embedding.weight"].device
        # computed on the CPU and moved, as transformers' rotary embedding buffer is (bitwise the same frequencies)
        self._inv_freq = (1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float)
                                                    / cfg.head_dim))).to(self.device)

    # --- construction ------------------------------------------------------------------------------------------

    @classmethod
    def from_transformers(cls, module, *, backend: str | None = None) -> "Code2Wav":
        """From a transformers ``Qwen3OmniMoeCode2Wav`` (weights shared, not copied, except the packed convs)."""
        return cls(Code2WavConfig.from_transformers(module.config), module.state_dict(), backend=backend)

    @classmethod
    def from_state_dict(cls, config, state_dict: Mapping[str, torch.Tensor], *, backend: str | None = None
                        ) -> "Code2Wav":
        """From a config (``Code2WavConfig``, a transformers ``Qwen3OmniMoeCode2WavConfig`` or a dict) and a state
        dict with transformers' parameter names (a ``code2wav.`` prefix is stripped)."""
        sd = {(k[len("code2wav."):] if k.startswith("code2wav.") else k): v for k, v in state_dict.items()}
        return cls(config, sd, backend=backend)

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
    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes int ``[B, G, T]`` -> wav ``[B, 1, num_samples(T)]`` in the weights' dtype, as transformers."""
        self._check_codes(codes)
        return self.stream(codes.shape[0]).push(codes)

    __call__ = forward

    @torch.no_grad()
    def chunked_decode(self, codes: torch.Tensor, chunk_size: int = 300, left_context_size: int = 25) -> torch.Tensor:
        """transformers' ``chunked_decode``: decode chunks of ``chunk_size`` frames, each re-decoding up to
        ``left_context_size`` previous frames and dropping their ``left_context * 1920`` samples. (It differs from
        the one-shot decode at every chunk boundary; :meth:`stream` is the exact, cheaper way to stream.)"""
        self._check_codes(codes)
        chunk_size = check_positive_int("chunk_size", chunk_size)
        left_context_size = check_positive_int("left_context_size", left_context_size, minimum=0)
        wavs, start = [], 0
        while start < codes.shape[-1]:
            end = min(start + chunk_size, codes.shape[-1])
            ctx = left_context_size if start - left_context_size > 0 else start
            wav = self.forward(codes[..., start - ctx:end])
            wavs.append(wav[..., ctx * self.total_upsample:])
            start = end
        if not wavs:
            return codes.new_zeros(codes.shape[0], 1, 0, dtype=self.dtype)
        return torch.cat(wavs, dim=-1)

    def stream(self, batch_size: int = 1, *, state: StreamState | None = None, cuda_graphs: bool = False,
               graph_buckets=(1, 2, 4, 8, 16, 32, 64)) -> "Code2WavStream":
        """A stateful decoder for ``batch_size`` independent streams (optionally taking over ``state``; the
        stream that produced it must not be used afterwards). See :class:`Code2WavStream` for ``cuda_graphs``."""
        return Code2WavStream(self, batch_size, state, cuda_graphs=cuda_graphs, graph_buckets=graph_buckets)

    def _check_codes(self, codes: torch.Tensor, batch_size: int | None = None) -> None:
        cfg = self.config
        if isinstance(codes, torch.Tensor) and codes.is_floating_point():
            raise TypeError(f"codes must be an integer tensor (int32 or int64), got {codes.dtype}")
        check_tensor("codes", codes, dtypes=INT_DTYPES, ndim=3, device=self.device)
        if codes.shape[1] != cfg.num_quantizers:
            raise ValueError(f"codes must have {cfg.num_quantizers} codebooks (shape [B, G, T]), got {codes.shape[1]}")
        if batch_size is not None and codes.shape[0] != batch_size:
            raise ValueError(f"codes must have batch size {batch_size} (the stream's), got {codes.shape[0]}")
        check_index_range("codes", codes, 0, cfg.codebook_size)


class Code2WavStream:
    """``push(codes [B, G, t]) -> wav [B, 1, n]`` with every sample final so far; ``finish()`` ends the stream.

    ``cuda_graphs=True`` (CUDA only): after the first push (which creates the per-layer states), each push is cut
    into pieces whose sizes are in ``graph_buckets`` (any chunking gives the same audio) and every piece replays a
    CUDA graph captured once per bucket for this stream's batch size.
    """

    def __init__(self, model: Code2Wav, batch_size: int, state: StreamState | None = None, *,
                 cuda_graphs: bool = False, graph_buckets=(1, 2, 4, 8, 16, 32, 64)):
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
            tensors = dict(state.conv, pos=state.pos)
            for name, t in tensors.items():
                if t.device != model.device or (t.is_floating_point() and t.dtype != model.dtype):
                    raise ValueError(f"state tensor {name} has {t.dtype} on {t.device}, the model "
                                     f"{model.dtype} on {model.device}")
        self.state = state
        if cuda_graphs and model.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        self.cuda_graphs = bool(cuda_graphs)
        self.graph_buckets = tuple(sorted({check_positive_int("graph bucket", int(b)) for b in graph_buckets}))
        self._graphs: dict[int, _GraphStep] = {}
        self._pool = None

    @property
    def frames(self) -> int:
        return self.state.frames

    @torch.no_grad()
    def push(self, codes: torch.Tensor) -> torch.Tensor:
        """Decode the next ``t >= 0`` frames of every stream; returns the new samples ``[B, 1, n]``."""
        m, st = self.model, self.state
        if st.finished:
            raise RuntimeError("push after finish(): start a new stream")
        m._check_codes(codes, st.batch_size)
        B, _, t = codes.shape
        if t == 0:
            return torch.zeros(B, 1, 0, dtype=m.dtype, device=m.device)
        if not self.cuda_graphs or st.frames == 0:
            return self._step(codes)
        outs, i = [], 0
        while i < t:
            n = max([b for b in self.graph_buckets if b <= t - i] or [1])
            piece = codes[..., i:i + n]
            if n in self.graph_buckets:
                graph = self._graphs.get(n)
                if graph is None:
                    graph = self._graphs[n] = _GraphStep(self, n)
                outs.append(graph(piece))
            else:
                outs.append(self._step(piece))
            i += n
        return torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]

    def finish(self) -> torch.Tensor:
        """End the stream. Returns the tail ``[B, 1, 0]``: empty, since every layer is causal (module docstring)."""
        self.state.finished = True
        self._graphs.clear()
        return torch.zeros(self.state.batch_size, 1, 0, dtype=self.model.dtype, device=self.model.device)

    # --- one step (graph-capturable once every state exists) ---------------------------------------------------

    def _step(self, codes: torch.Tensor) -> torch.Tensor:
        m, st = self.model, self.state
        h = self._pre_transformer(ref.embed_codes(m.config, m.sd["code_embedding.weight"], codes))
        wav = self._convnet(h.permute(0, 2, 1))
        st.pos += codes.shape[-1]
        st.frames += codes.shape[-1]
        return wav

    def _pre_transformer(self, h: torch.Tensor) -> torch.Tensor:
        """h ``[B, t, H]`` -> normed hidden states ``[B, t, H]``, attending through the per-layer KV caches."""
        m, st, cfg = self.model, self.state, self.model.config
        keep = cfg.sliding_window - 1  # a frame sees the previous W - 1 frames
        outs = []
        for a in range(0, h.shape[1], _ATTN_BLOCK):
            x = h[:, a:a + _ATTN_BLOCK]
            n = x.shape[1]
            base = st.pos + a
            q_pos = base + torch.arange(n, device=h.device)
            k_pos = base - keep + torch.arange(keep + n, device=h.device)
            freqs = q_pos[:, None].float() * m._inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos().to(h.dtype), emb.sin().to(h.dtype)
            mask = _window_mask(q_pos, k_pos, cfg.sliding_window, h.dtype)
            for i in range(cfg.num_hidden_layers):
                past = st.kv[i]
                x, (k, v) = ref.pre_transformer_layer(cfg, m.sd, f"pre_transformer.layers.{i}.", x, cos, sin,
                                                      mask if past is not None else mask[:, keep:], past)
                if past is not None:
                    past[0].copy_(k[:, :, -keep:])
                    past[1].copy_(v[:, :, -keep:])
            outs.append(x)
        h = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
        return ref._rms_norm(h, m.sd["pre_transformer.norm.weight"], cfg.rms_norm_eps)

    def _keep_state(self, name: str, new: torch.Tensor) -> None:
        """Store a layer's new state: in place once it exists (fixed addresses for CUDA graphs)."""
        conv = self.state.conv
        old = conv.get(name)
        if old is not None and old.shape == new.shape:
            old.copy_(new)
        else:
            conv[name] = new

    def _conv(self, name: str, x: torch.Tensor, *, dilation: int = 1, groups: int = 1, snake=None, residual=None):
        sd = self.model.sd
        y, new = ops.causal_conv1d(x, sd[name + ".weight"], sd.get(name + ".bias"), dilation=dilation,
                                   groups=groups, snake=snake, residual=residual, state=self.state.conv.get(name),
                                   backend=self.model.backend)
        self._keep_state(name, new)
        return y

    def _convt(self, name: str, x: torch.Tensor, stride: int, snake=None):
        sd = self.model.sd
        y, new = ops.causal_conv_transpose1d(x, sd[name + ".weight"], sd.get(name + ".bias"), stride=stride,
                                             snake=snake, state=self.state.conv.get(name),
                                             backend=self.model.backend)
        self._keep_state(name, new)
        return y

    def _convnet(self, x: torch.Tensor) -> torch.Tensor:
        """The upsamplers and the decoder on x ``[B, H, t]``; returns the new samples ``[B, 1, n]``."""
        cfg, sd = self.model.config, self.model.sd
        for i, f in enumerate(cfg.upsampling_ratios):
            p = f"upsample.{i}."
            x = self._convt(p + "0.conv", x, f)
            dw = self._conv(p + "1.dwconv.conv", x, groups=x.shape[1])
            x = ref.convnext_pointwise(sd, p + "1.", x, dw)
        x = self._conv("decoder.0.conv", x)
        for i, r in enumerate(cfg.upsample_rates):
            p = f"decoder.{i + 1}.block."
            x = self._convt(p + "1.conv", x, r, snake=(sd[p + "0.alpha"], sd[p + "0.beta"]))
            for j, d in enumerate((1, 3, 9)):
                u = f"{p}{j + 2}."
                y = self._conv(u + "conv1.conv", x, dilation=d, snake=(sd[u + "act1.alpha"], sd[u + "act1.beta"]))
                x = self._conv(u + "conv2.conv", y, snake=(sd[u + "act2.alpha"], sd[u + "act2.beta"]), residual=x)
        n = len(cfg.upsample_rates)
        x = self._conv(f"decoder.{n + 2}.conv", x, snake=(sd[f"decoder.{n + 1}.alpha"], sd[f"decoder.{n + 1}.beta"]))
        return x.clamp(min=-1, max=1)


def _new_state(model: Code2Wav, batch_size: int) -> StreamState:
    cfg = model.config
    keep = cfg.sliding_window - 1
    kv = []
    for _ in range(cfg.num_hidden_layers):
        if keep > 0:
            shape = (batch_size, cfg.num_key_value_heads, keep, cfg.head_dim)
            kv.append((torch.zeros(shape, dtype=model.dtype, device=model.device),
                       torch.zeros(shape, dtype=model.dtype, device=model.device)))
        else:
            kv.append(None)
    return StreamState(cfg, batch_size, pos=torch.zeros((), dtype=torch.long, device=model.device), kv=kv)


def _window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``[Tq, Tk]``: key j visible to query i iff ``0 <= k_j``, ``q_i - window < k_j <= q_i``
    (transformers' causal sliding window; negative positions are the KV cache slots not written yet)."""
    q = q_pos[:, None]
    k = k_pos[None, :]
    allowed = (k <= q) & (k > q - window) & (k >= 0)
    return torch.zeros(allowed.shape, dtype=dtype, device=q_pos.device).masked_fill(~allowed,
                                                                                    torch.finfo(dtype).min)


class _GraphStep:
    """One CUDA graph of :meth:`Code2WavStream._step` for a fixed chunk size (CUDA only).

    Warm-up runs the step once on copies of the state (Triton autotuning, cuBLAS handles) and restores it; capture
    then records the step on static buffers: codes in, wav out, every state updated in place.
    """

    def __init__(self, stream: Code2WavStream, frames: int):
        st = stream.state
        self.codes = torch.zeros(st.batch_size, stream.model.config.num_quantizers, frames, dtype=torch.long,
                                 device=stream.model.device)
        snapshot = _clone_state(st)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            stream._step(self.codes)
        torch.cuda.current_stream().wait_stream(side)
        _restore_state(st, snapshot)
        self.graph = torch.cuda.CUDAGraph()
        frames_before = st.frames
        if stream._pool is None:  # one memory pool for all of a stream's buckets: replays never overlap
            stream._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(self.graph, pool=stream._pool):
            self.out = stream._step(self.codes)
        st.frames = frames_before  # capture records but does not run the step
        self.state = st

    def __call__(self, codes: torch.Tensor) -> torch.Tensor:
        self.codes.copy_(codes)
        self.graph.replay()
        self.state.frames += self.codes.shape[-1]
        return self.out.clone()


def _clone_state(st: StreamState) -> dict:
    snap = {"pos": st.pos.clone(), "frames": st.frames}
    snap["conv"] = {k: v.clone() for k, v in st.conv.items()}
    snap["kv"] = [None if kv is None else (kv[0].clone(), kv[1].clone()) for kv in st.kv]
    return snap


def _restore_state(st: StreamState, snap: dict) -> None:
    st.pos.copy_(snap["pos"])
    st.frames = snap["frames"]
    for k, v in snap["conv"].items():
        st.conv[k].copy_(v)
    for kv, saved in zip(st.kv, snap["kv"]):
        if kv is not None:
            kv[0].copy_(saved[0])
            kv[1].copy_(saved[1])


# --- state dict checks -----------------------------------------------------------------------------------------------


def _expected_shapes(cfg: Code2WavConfig) -> dict[str, tuple[int, ...]]:
    H, D = cfg.hidden_size, cfg.head_dim
    hq, hk, inter = cfg.num_attention_heads * D, cfg.num_key_value_heads * D, cfg.intermediate_size
    s: dict[str, tuple[int, ...]] = {"code_embedding.weight": (cfg.codebook_size * cfg.num_quantizers, H),
                                     "pre_transformer.norm.weight": (H,)}
    for i in range(cfg.num_hidden_layers):
        p = f"pre_transformer.layers.{i}."
        s.update({p + "self_attn.q_proj.weight": (hq, H), p + "self_attn.k_proj.weight": (hk, H),
                  p + "self_attn.v_proj.weight": (hk, H), p + "self_attn.o_proj.weight": (H, hq),
                  p + "mlp.gate_proj.weight": (inter, H), p + "mlp.up_proj.weight": (inter, H),
                  p + "mlp.down_proj.weight": (H, inter), p + "input_layernorm.weight": (H,),
                  p + "post_attention_layernorm.weight": (H,), p + "self_attn_layer_scale.scale": (H,),
                  p + "mlp_layer_scale.scale": (H,)})
        if cfg.attention_bias:
            s.update({p + "self_attn.q_proj.bias": (hq,), p + "self_attn.k_proj.bias": (hk,),
                      p + "self_attn.v_proj.bias": (hk,), p + "self_attn.o_proj.bias": (H,)})
    for i, f in enumerate(cfg.upsampling_ratios):
        p = f"upsample.{i}."
        s.update({p + "0.conv.weight": (H, H, f), p + "0.conv.bias": (H,), p + "1.dwconv.conv.weight": (H, 1, 7),
                  p + "1.dwconv.conv.bias": (H,), p + "1.norm.weight": (H,), p + "1.norm.bias": (H,),
                  p + "1.pwconv1.weight": (4 * H, H), p + "1.pwconv1.bias": (4 * H,),
                  p + "1.pwconv2.weight": (H, 4 * H), p + "1.pwconv2.bias": (H,), p + "1.gamma": (H,)})
    dim = cfg.decoder_dim
    s.update({"decoder.0.conv.weight": (dim, H, 7), "decoder.0.conv.bias": (dim,)})
    for i, r in enumerate(cfg.upsample_rates):
        p = f"decoder.{i + 1}.block."
        out = dim // 2
        s.update({p + "0.alpha": (dim,), p + "0.beta": (dim,), p + "1.conv.weight": (dim, out, 2 * r),
                  p + "1.conv.bias": (out,)})
        for j in range(3):
            u = f"{p}{j + 2}."
            s.update({u + "act1.alpha": (out,), u + "act1.beta": (out,), u + "act2.alpha": (out,),
                      u + "act2.beta": (out,), u + "conv1.conv.weight": (out, out, 7), u + "conv1.conv.bias": (out,),
                      u + "conv2.conv.weight": (out, out, 1), u + "conv2.conv.bias": (out,)})
        dim = out
    n = len(cfg.upsample_rates)
    s.update({f"decoder.{n + 1}.alpha": (dim,), f"decoder.{n + 1}.beta": (dim,),
              f"decoder.{n + 2}.conv.weight": (1, dim, 7), f"decoder.{n + 2}.conv.bias": (1,)})
    return s


def _check_state_dict(cfg: Code2WavConfig, sd: Mapping[str, torch.Tensor]) -> None:
    expected = _expected_shapes(cfg)
    missing = [k for k in expected if k not in sd]
    if missing:
        raise ValueError(f"state dict is missing {len(missing)} Code2Wav weights, e.g. {missing[:3]}")
    dtype = sd["code_embedding.weight"].dtype
    device = sd["code_embedding.weight"].device
    for k, shape in expected.items():
        t = sd[k]
        if tuple(t.shape) != shape:
            raise ValueError(f"state dict weight {k} has shape {list(t.shape)}, the config expects {list(shape)}")
        if t.dtype != dtype or t.device != device:
            raise ValueError(f"state dict weight {k} is {t.dtype} on {t.device}; all weights must share "
                             f"{dtype} on {device}")


__all__ = ["Code2Wav", "Code2WavStream", "StreamState", "pack_conv1d_weight", "pack_conv_transpose1d_weight"]

