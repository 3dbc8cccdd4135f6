"""Graph-capturable single-token decode for Qwen-Omni text decoders: Qwen3-Omni's MoE thinker and talker, and
Qwen2.5-Omni's dense talker (config switches, one step body: see :class:`TextDecoderConfig`).

transformers decodes one token per call through its text model: a causal mask is built, a cache class is updated
and 48 (thinker) / 20 (talker) decoder layers run with Python between every kernel. :class:`MoeTextDecoder` does the
same math on omni-fast ops with fixed shapes and no host sync, so on CUDA one decode step of the whole model is
one ``torch.cuda.CUDAGraph`` replay:

- its own static KV cache per layer, ``[B, S_max, Hk, D]``, with per-row ``cache_seqlens`` (int32 ``[B]``);
  :meth:`MoeTextDecoder.load_prefill` copies the KV of transformers' prefill (left-padded, in a ``DynamicCache`` or
  ``StaticCache``) into it *left-aligned*: row ``i`` holds only its valid tokens, ``cache_seqlens[i]`` = their
  count. Keys carry their RoPE already, so decode needs no attention mask: each row attends to its
  ``cache_seqlens[i]`` keys plus the new one, exactly the keys transformers' padding mask leaves visible;
- per layer: RMSNorm (``add_rms_norm_``, residual add fused), q/k/v projections (cuBLAS, with their biases where
  the model has them), per-head q/k RMSNorm + TM-RoPE (:func:`omni_fast.ops.qk_norm_mrope`, the 3 position rows
  given per token, interleaved sections; Qwen2.5-Omni: no q/k norm, :func:`omni_fast.ops.mrope` with contiguous
  sections),
  :func:`omni_fast.ops.flash_attn_with_kvcache` (append + attention), o projection, the sparse MoE block
  (:func:`omni_fast.ops.moe_block`: router, top-k, fused experts, the talker's sigmoid-gated shared expert) or a
  dense SwiGLU MLP (gate/up as one GEMM, :func:`omni_fast.ops.mtp_layers.silu_mul`, down);
- final RMSNorm and the head (``lm_head`` / ``codec_head``; optional: without one, ``step`` returns no logits and
  the caller applies its own head, as transformers' Qwen2.5-Omni talker does outside its text model).

:meth:`MoeTextDecoder.step` takes ``input_embeds [B, H]`` and ``positions [B]`` or ``[3, B]`` and returns
``(logits [B, V], hidden [B, H])`` (hidden: the final-norm output, transformers' ``last_hidden_state``). On CUDA
(``use_graph``) the step is captured once per batch bucket (and again only when a batch needs a larger cache than
the current one) and replayed; elsewhere the same body runs eagerly on the same static buffers. The weights are the
transformers module's own tensors (shared, not copied), except the small fused gate/up weights of the talker's
shared expert and of dense MLP layers. One decoder keeps one set of buffers (the latest batch's bucket).

Positions that are not whole numbers (a video at a fractional ``second_per_grid * position_id_per_seconds``) take
the pure-PyTorch RoPE (:func:`omni_fast.reference.rope.qk_norm_mrope`, transformers' cos/sin math): pass
``fractional_positions=True`` to :meth:`load_prefill`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from .. import ops
from ..backend import graph_capturable, requested_backend, triton_interpreter_enabled
from ..ops import mtp_layers
from ..reference import rope as ref_rope
from .code_predictor import BATCH_BUCKETS
from ..validation import check_bool
from .._cache_memory import copy_changed
from .._device import devices_of, on_device
from .cuda_graphs import capture
from .fused_step import FusedWorkspace, fused_body, unsupported as fused_unsupported
from .quantized import quantized_experts
from ..validation import check_positive_int

CAPACITY_ALIGN = 64  # cache lengths are rounded up to this, so nearby prompt lengths reuse one captured graph


@dataclass(frozen=True)
class TextDecoderConfig:
    """The shapes of one decoder (read from a transformers text config by :meth:`from_transformers`)."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    mrope_section: tuple[int, int, int]
    interleaved: bool = True  # Qwen3-Omni's interleaved TM-RoPE sections; False: Qwen2.5-Omni's contiguous ones
    attention_scaling: float = 1.0
    qk_norm: bool = True  # per-head q/k RMSNorm before RoPE (Qwen3-Omni); Qwen2.5-Omni has none


# Rotary classes whose M-RoPE sections are contiguous (t | h | w blocks); every other one interleaves them.
CONTIGUOUS_ROTARY = frozenset({"Qwen2_5OmniRotaryEmbedding"})


class _Layer:
    """One decoder layer's tensors (views of the transformers module's parameters)."""

    def __init__(self, layer: torch.nn.Module, config: Any):
        att, mlp = layer.self_attn, layer.mlp
        w = lambda m: None if m is None else m.detach()  # noqa: E731
        self.input_norm = w(layer.input_layernorm.weight)
        self.post_norm = w(layer.post_attention_layernorm.weight)
        self.q, self.k, self.v, self.o = (w(p.weight) for p in (att.q_proj, att.k_proj, att.v_proj, att.o_proj))
        self.q_bias, self.k_bias, self.v_bias, self.o_bias = (
            w(p.bias) for p in (att.q_proj, att.k_proj, att.v_proj, att.o_proj))
        norms = getattr(att, "q_norm", None), getattr(att, "k_norm", None)
        self.q_norm, self.k_norm = (w(n.weight) if getattr(n, "weight", None) is not None else None for n in norms)
        experts = getattr(mlp, "experts", None)
        self.moe = experts is not None
        if self.moe:
            if getattr(config, "hidden_act", "silu") != "silu":  # (the experts run SiLU SwiGLU)
                raise ValueError(f"the experts must be SwiGLU (hidden_act 'silu'), got hidden_act {config.hidden_act!r}")
            quant = quantized_experts(experts)  # FP8 / INT4 experts of a quantized checkpoint (models.quantized)
            if quant is None and not isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor):
                raise TypeError(f"expected transformers' fused experts (gate_up_proj [E, 2I, H]), got "
                                f"{type(experts).__name__}")
            self.router = w(mlp.gate.weight)
            self.top_k = int(getattr(mlp.gate, "top_k", None) or config.num_experts_per_tok)
            self.renormalize = bool(getattr(mlp.gate, "norm_topk_prob", config.norm_topk_prob))
            self.w13, self.w2 = (quant, None) if quant is not None else (w(experts.gate_up_proj), w(experts.down_proj))
            shared = getattr(mlp, "shared_expert", None)
            self.shared_w13 = self.shared_w2 = self.shared_gate = None
            if shared is not None:  # the talker: sigmoid-gated shared SwiGLU expert
                self.shared_w13 = torch.cat([w(shared.gate_proj.weight), w(shared.up_proj.weight)], 0)
                self.shared_w2 = w(shared.down_proj.weight)
                self.shared_gate = w(mlp.shared_expert_gate.weight)
        else:  # a dense SwiGLU layer (mlp_only_layers / decoder_sparse_step configs; Qwen2.5-Omni's Qwen2MLP)
            act = getattr(config, "hidden_act", "silu")
            if act != "silu" or any(getattr(p, "bias", None) is not None for p in (mlp.gate_proj, mlp.up_proj,
                                                                                   mlp.down_proj)):
                raise ValueError(f"the dense MLP must be SwiGLU without biases (hidden_act 'silu'), got hidden_act "
                                 f"{act!r}")
            self.gate_up = torch.cat([w(mlp.gate_proj.weight), w(mlp.up_proj.weight)], 0)
            self.down = w(mlp.down_proj.weight)


class _State:
    """Static buffers of one batch bucket and cache capacity: KV caches, inputs, outputs and the captured graph."""

    def __init__(self, dec: "MoeTextDecoder", bucket: int, capacity: int, fractional: bool):
        c, dev, dt = dec.config, dec.device, dec.dtype
        self.bucket, self.capacity, self.fractional, self.batch = bucket, capacity, fractional, 0
        self.caches = [(torch.zeros(bucket, capacity, c.num_kv_heads, c.head_dim, device=dev, dtype=dt),
                        torch.zeros(bucket, capacity, c.num_kv_heads, c.head_dim, device=dev, dtype=dt))
                       for _ in dec.layers]
        self.cache_seqlens = torch.zeros(bucket, dtype=torch.int32, device=dev)
        self.x = torch.zeros(bucket, c.hidden_size, device=dev, dtype=dt)
        self.pos = torch.zeros(3, bucket, device=dev, dtype=torch.float64 if fractional else torch.int64)
        self.steps_left = 0
        # the residual after layer i - 1 (transformers' hidden_states[i]) per recorded index, copied every step
        self.recorded = {i: torch.zeros(bucket, c.hidden_size, device=dev, dtype=dt) for i in sorted(dec.record_layers)}
        # the phase-fused step's scratch (``fused=True``; integer positions and a Triton-capable backend only)
        self.fused = FusedWorkspace(dec, bucket, capacity) if dec._fused_active(fractional) else None
        self.graph = None
        self.logits = self.hidden = None


class MoeTextDecoder:
    """Single-token decode of a Qwen-Omni text model (Qwen3-Omni's MoE thinker or talker, Qwen2.5-Omni's dense
    talker) with a static KV cache.

    Build with :meth:`from_transformers`, then per batch: :meth:`load_prefill` after transformers' prefill, and
    :meth:`step` per token. ``backend`` pins the backend of every op (default: the ambient one).

    ``fused=True`` (opt-in, not yet run on a GPU) runs each layer as three phase-fused Triton launches
    (:mod:`omni_fast.kernels.talker_fused`: qkv + q/k norm + TM-RoPE + KV append; attention + o projection +
    residual; norm + router + top-k + experts + shared expert + combine + residual) instead of ~24 ops: needs MoE
    layers with float experts, no attention biases and a power-of-two head_dim (else ValueError). Steps with
    fractional positions, and the ``"reference"`` backend, keep the ops path (the default and the fallback).
    docs/persistent.md has the design and the launch counts.

    ``record_layers`` (set before :meth:`load_prefill`): layer outputs (transformers' ``hidden_states[i]``,
    ``0 < i < N``) each step also keeps, read with :meth:`recorded`; one ``[B, H]`` copy per index per step. The
    decode takeover of ``patch`` sets it to what ``generate`` reads (the thinker's ``accept_hidden_layer``).
    """

    def __init__(self, config: TextDecoderConfig, layers: list[_Layer], norm: torch.Tensor,
                 head: torch.Tensor | None, inv_freq: torch.Tensor, *, backend: str | None = None,
                 fused: bool = False):
        self.config, self.layers, self.norm, self.head = config, layers, norm, head
        self.inv_freq = inv_freq.to(torch.float32).contiguous()
        self.backend = backend
        self.device, self.dtype = norm.device, (head if head is not None else layers[0].q).dtype
        self.fused = check_bool("fused", fused)
        why = fused_unsupported(self) if self.fused else None
        if why is not None:
            raise ValueError(f"fused=True is not available for this decoder: {why}")
        # why the "fused_step" fast path left this decoder on the ops path (set by opt_in_decoder; None otherwise)
        self.fused_fallback: str | None = None
        # transformers' hidden_states indices 1 .. N-1 (the output of layer i - 1) each step also keeps, read back
        # with recorded(i); set before load_prefill. Index 0 (the input) and N (the final-norm output, step's
        # hidden) need no copy. One [bucket, H] copy per index per step.
        self.record_layers: frozenset[int] = frozenset()
        self._state: _State | None = None

    def _fused_active(self, fractional: bool) -> bool:
        """Whether a state's steps take the phase-fused path: not under the reference backend (pinned or ambient),
        nor on a CPU without the Triton interpreter (where "auto" resolves to the reference ops)."""
        return self.fused and not fractional and requested_backend(self.backend) != "reference" and \
            (self.device.type == "cuda" or triton_interpreter_enabled())

    # --- construction ---------------------------------------------------------------------------------------

    @classmethod
    def from_transformers(cls, text_model: torch.nn.Module, lm_head: torch.nn.Module | torch.Tensor | None, *,
                          backend: str | None = None, fused: bool = False) -> "MoeTextDecoder":
        """From transformers' ``Qwen3OmniMoeThinkerTextModel`` (``thinker.model.language_model``; ``thinker.model``
        in transformers before 5.2x) with the thinker's ``lm_head``, ``Qwen3OmniMoeTalkerModel`` (``talker.model``)
        with the talker's ``codec_head``, or ``Qwen2_5OmniTalkerModel`` (``talker.model``: dense SwiGLU, q/k/v bias,
        no q/k norm, contiguous M-RoPE) with ``codec_head`` or None (no logits); ``fused``: see the class doc. The
        weights are shared with the module (later in-place updates are seen; ``.to()`` needs a new decoder). They
        must sit on one device (ValueError otherwise: a ``device_map`` split; the decode takeover of ``patch`` then
        leaves the decode to transformers). That device need not be the current one: the decoder captures, replays
        and launches on it."""
        devices = devices_of(text_model, *([lm_head] if isinstance(lm_head, torch.nn.Module) else []))
        if len(devices) > 1:  # one static KV cache and one graph per step: the weights must share one device
            raise ValueError(f"the text model's weights are on several devices ({', '.join(map(str, devices))}, "
                             "e.g. split by device_map): MoeTextDecoder runs on one device")
        cfg = text_model.config
        rotary = text_model.rotary_emb
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        section = tuple(int(s) for s in getattr(rotary, "mrope_section", None) or (head_dim // 2, 0, 0))
        config = TextDecoderConfig(
            hidden_size=cfg.hidden_size, num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads or cfg.num_attention_heads, head_dim=head_dim,
            rms_norm_eps=float(cfg.rms_norm_eps), mrope_section=section,
            # transformers' Qwen3-Omni rotary always recomposes the sections interleaved (Qwen3-VL style),
            # Qwen2.5-Omni's in contiguous t | h | w blocks
            interleaved=type(rotary).__name__ not in CONTIGUOUS_ROTARY,
            attention_scaling=float(getattr(rotary, "attention_scaling", 1.0)))
        if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or ()):
            raise ValueError(f"only full-attention layers are supported, got layer_types {cfg.layer_types}")
        head = lm_head if lm_head is None or isinstance(lm_head, torch.Tensor) else lm_head.weight
        if isinstance(lm_head, torch.nn.Module) and getattr(lm_head, "bias", None) is not None:
            raise ValueError("the head must have no bias (Qwen-Omni's lm_head and codec_head have none)")
        layers = [_Layer(layer, cfg) for layer in text_model.layers]
        config = dataclasses.replace(config, qk_norm=layers[0].q_norm is not None)
        return cls(config, layers, text_model.norm.weight.detach(), None if head is None else head.detach(),
                   rotary.inv_freq.detach(), backend=backend, fused=fused)

    # --- per batch --------------------------------------------------------------------------------------------

    def load_prefill(self, cache: Any, attention_mask: torch.Tensor, *, max_new_tokens: int = 256,
                     fractional_positions: bool = False, use_graph: bool | None = None) -> None:
        """Take over transformers' prefill KV for a batch, ready for ``max_new_tokens`` :meth:`step` calls.

        cache: the ``DynamicCache`` / ``StaticCache`` after the prefill of ``attention_mask`` ``[B, S]`` (1 =
        token, 0 = padding; any pattern, typically left padding): per row the valid tokens are copied, in order,
        to the front of the row's cache and ``cache_seqlens[i]`` is their count. ``fractional_positions``: decode
        positions will be float (non-integer TM-RoPE positions). ``use_graph`` (default: on CUDA, unless the
        backend is ``"reference"``, whose ops read values on the host) captures the step as a CUDA graph.
        """
        if attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be [B, S], got shape {tuple(attention_mask.shape)}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        B, S = attention_mask.shape
        keys, values = _cache_tensors(cache, len(self.layers))
        c = self.config
        for i, (k, v) in enumerate(zip(keys, values)):
            if k.shape[0] != B or k.shape[1] != c.num_kv_heads or k.shape[3] != c.head_dim or k.shape[2] < S:
                raise ValueError(f"layer {i} of the cache holds keys of shape {tuple(k.shape)}, expected "
                                 f"[{B}, {c.num_kv_heads}, >= {S}, {c.head_dim}] for attention_mask [{B}, {S}]")
        if use_graph is None:
            use_graph = self.device.type == "cuda" and graph_capturable(self.backend)
        elif use_graph and self.device.type != "cuda":
            raise ValueError(f"use_graph needs a CUDA device, the decoder is on {self.device}")
        elif use_graph and not graph_capturable(self.backend):
            raise ValueError("use_graph needs the triton or cuda backend (the reference ops read values on the host)")
        bucket = next((b for b in BATCH_BUCKETS if b >= B), None) or 1 << max(B - 1, 0).bit_length()
        needed = S + max_new_tokens
        st = self._state
        # Reuse the buffers (and the captured graph) when they fit: same bucket and position kind, enough room.
        bad = [i for i in self.record_layers if isinstance(i, bool) or not isinstance(i, int)
               or not 0 < i < len(self.layers)]
        if bad:
            raise ValueError(f"record_layers must hold layer outputs 1 .. {len(self.layers) - 1}, got {sorted(bad)}")
        # buffers made under torch.inference_mode() cannot be written outside it: a plain generate after one run
        # under inference_mode gets fresh ones
        if (st is None or st.bucket != bucket or st.fractional != bool(fractional_positions)
                or st.capacity < needed or (st.graph is not None) != bool(use_graph)
                or set(st.recorded) != set(self.record_layers)
                or (st.x.is_inference() and not torch.is_inference_mode_enabled())):
            self._state = None  # free the previous buffers (and graph) before allocating new ones
            capacity = -(-needed // CAPACITY_ALIGN) * CAPACITY_ALIGN
            st = self._state = _State(self, bucket, capacity, bool(fractional_positions))
            copy_changed(self)  # (made on this stream: the streams that recorded the old state record it anew)
            if use_graph:
                self._capture(st)
        st.batch = B
        st.steps_left = st.capacity - S
        valid = attention_mask.to(self.device).bool()
        pos = torch.arange(S, device=self.device).expand(B, S)
        order = torch.where(valid, pos, pos + S).argsort(dim=1, stable=True)  # valid tokens first, in order
        for (kc, vc), k, v in zip(st.caches, keys, values):
            idx = order[:, :, None, None].expand(B, S, c.num_kv_heads, c.head_dim)
            kc[:B, :S].copy_(k[:, :, :S].transpose(1, 2).to(self.dtype).gather(1, idx))
            vc[:B, :S].copy_(v[:, :, :S].transpose(1, 2).to(self.dtype).gather(1, idx))
        st.cache_seqlens.zero_()
        st.cache_seqlens[:B].copy_(valid.sum(1))
        st.x.zero_()
        st.pos.zero_()

    def step(self, input_embeds: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row: ``input_embeds`` ``[B, H]``, ``positions`` ``[B]`` (text: the 3 TM-RoPE rows are
        equal) or ``[3, B]``. Returns ``(logits [B, V], hidden [B, H])`` in the model dtype (fresh tensors;
        logits None for a decoder built without a head)."""
        st = self._state
        if st is None:
            raise RuntimeError("load_prefill must be called before step")
        B, c = st.batch, self.config
        if input_embeds.shape != (B, c.hidden_size):
            raise ValueError(f"input_embeds must be [{B}, {c.hidden_size}], got {tuple(input_embeds.shape)}")
        if positions.shape not in ((B,), (3, B)):
            raise ValueError(f"positions must be [{B}] or [3, {B}], got {tuple(positions.shape)}")
        if positions.is_floating_point() and not st.pos.is_floating_point():
            raise TypeError("float positions need load_prefill(..., fractional_positions=True)")
        if st.steps_left <= 0:
            raise RuntimeError(f"the KV cache is full ({st.capacity} tokens): load_prefill with a larger "
                               "max_new_tokens")
        with on_device(self.device):  # (the decoder's device, whichever is current: docs/reliability.md)
            st.x[:B].copy_(input_embeds)
            st.pos[:, :B].copy_(positions.expand(3, B))
            if st.graph is not None:
                st.graph.replay()
            else:
                st.logits, st.hidden = self._body(st)
        st.steps_left -= 1
        return None if st.logits is None else st.logits[:B].clone(), st.hidden[:B].clone()

    def rewind(self, steps: int = 1) -> None:
        """Forget the last ``steps`` tokens of every row (``cache_seqlens -= steps``, on the device, no sync): the
        next :meth:`step` overwrites them. For speculative tokens that were rejected, and benchmarks that repeat one
        step. A row holding fewer than ``steps`` tokens is emptied (the clamp also keeps the hidden batch-bucket
        padding rows, which hold none, at 0)."""
        st = self._state
        if st is None:
            raise RuntimeError("load_prefill must be called before rewind")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an int >= 0, got {steps!r}")
        st.cache_seqlens.sub_(steps).clamp_(min=0)
        st.steps_left += steps

    def reorder_rows(self, index: torch.Tensor) -> None:
        """Row ``b`` takes row ``index[b]``'s cached tokens (KV, lengths, recorded layer outputs): beam search's
        cache reorder. index int ``[B]`` (the batch of :meth:`load_prefill`), on the decoder's device; in place
        (gathered through a copy: the buffers keep their addresses, so a captured graph stays valid)."""
        st = self._state
        if st is None:
            raise RuntimeError("load_prefill must be called before reorder_rows")
        if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.shape[0] != st.batch \
                or index.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"index must be an int tensor [B] = [{st.batch}], got "
                             f"{getattr(index, 'dtype', type(index).__name__)} {list(getattr(index, 'shape', []))}")
        index = index.to(self.device)
        B = st.batch
        for t in [c for pair in st.caches for c in pair] + [st.cache_seqlens] + list(st.recorded.values()):
            t[:B].copy_(t[:B].index_select(0, index))

    def reserve(self, steps: int) -> None:
        """Make room for ``steps`` more :meth:`step` calls, keeping every cached token: when the cache is too small,
        new buffers of the needed capacity are allocated (and the step re-captured when it was), and the KV copied.
        For callers that do not know the decode length at :meth:`load_prefill` (transformers' ``generate``)."""
        st = self._state
        if st is None:
            raise RuntimeError("load_prefill must be called before reserve")
        steps = check_positive_int("steps", steps, minimum=0)
        if st.steps_left >= steps:
            return
        used = st.capacity - st.steps_left
        capacity = -(-(used + steps) // CAPACITY_ALIGN) * CAPACITY_ALIGN
        new = _State(self, st.bucket, capacity, st.fractional)
        if st.graph is not None:
            self._capture(new)  # on the fresh (zero) buffers, as load_prefill does, before the KV comes in
        for (kc, vc), (nk, nv) in zip(st.caches, new.caches):
            nk[:, :st.capacity].copy_(kc)
            nv[:, :st.capacity].copy_(vc)
        new.cache_seqlens.copy_(st.cache_seqlens)
        new.batch, new.steps_left = st.batch, capacity - used
        self._state = new
        copy_changed(self)

    def recorded(self, index: int) -> torch.Tensor:
        """transformers' ``hidden_states[index]`` of the last :meth:`step`: the residual after layer ``index - 1``,
        ``[B, H]`` (a fresh tensor); ``index`` must be in :attr:`record_layers` (KeyError otherwise)."""
        st = self._state
        if st is None:
            raise RuntimeError("load_prefill must be called before recorded")
        if index not in st.recorded:
            raise KeyError(f"hidden state {index} is not recorded (record_layers {sorted(st.recorded)})")
        return st.recorded[index][:st.batch].clone()

    @property
    def steps_left(self) -> int:
        """How many more :meth:`step` calls the cache has room for (0 before :meth:`load_prefill`)."""
        return 0 if self._state is None else self._state.steps_left

    def release(self) -> None:
        """Free the KV caches, buffers and captured graph (the next :meth:`load_prefill` allocates anew)."""
        self._state = None

    @property
    def cache_seqlens(self) -> torch.Tensor | None:
        """int32 ``[B]``: tokens cached per row (the prefill's valid tokens + the steps taken)."""
        return None if self._state is None else self._state.cache_seqlens[:self._state.batch]

    # --- the step body (what the CUDA graph captures: no validation on values, no host sync) -------------------

    def _body(self, st: _State) -> tuple[torch.Tensor, torch.Tensor]:
        if st.fused is not None:
            return fused_body(self, st, st.fused)
        c, be = self.config, self.backend
        nq, nk, d, eps = c.num_heads, c.num_kv_heads, c.head_dim, c.rms_norm_eps
        T = st.bucket
        norm = partial(mtp_layers.add_rms_norm_, eps=eps, backend=be)
        resid = st.x.clone()  # the residual stream, updated in place by add_rms_norm_
        x = norm(resid, None, self.layers[0].input_norm)
        for i, (layer, (kc, vc)) in enumerate(zip(self.layers, st.caches)):
            q = F.linear(x, layer.q, layer.q_bias).view(T, nq, d)
            k = F.linear(x, layer.k, layer.k_bias).view(T, nk, d)
            v = F.linear(x, layer.v, layer.v_bias).view(T, 1, nk, d)
            self._rope(q, k, layer, st.pos)
            attn = ops.flash_attn_with_kvcache(q.view(T, 1, nq, d), kc, vc, k=k.view(T, 1, nk, d),
                                               v=v, cache_seqlens=st.cache_seqlens, causal=True,
                                               softmax_scale=d ** -0.5, backend=be)
            x = norm(resid, F.linear(attn.view(T, nq * d), layer.o, layer.o_bias), layer.post_norm)
            if layer.moe:
                mlp = ops.moe_block(x, layer.router, layer.w13, layer.w2, layer.top_k, renormalize=layer.renormalize,
                                    shared_w13=layer.shared_w13, shared_w2=layer.shared_w2,
                                    shared_gate_weight=layer.shared_gate, backend=be)
            else:
                mlp = F.linear(mtp_layers.silu_mul(F.linear(x, layer.gate_up), backend=be), layer.down)
            nxt = self.layers[i + 1].input_norm if i + 1 < len(self.layers) else self.norm
            x = norm(resid, mlp, nxt)
            if i + 1 in st.recorded:  # resid is layer i's output now
                st.recorded[i + 1].copy_(resid)
        st.cache_seqlens.add_(1)  # every layer appended this token
        return (None if self.head is None else F.linear(x, self.head)), x

    def _rope(self, q, k, layer, pos):
        c = self.config
        kw = dict(eps=c.rms_norm_eps, mrope_section=c.mrope_section, interleaved=c.interleaved,
                  attention_scaling=c.attention_scaling, inv_freq=self.inv_freq)
        if layer.q_norm is None:  # Qwen2.5-Omni: RoPE alone
            del kw["eps"]
            if pos.is_floating_point():
                ref_rope.mrope(q, k, pos, **kw)
            else:
                ops.mrope(q, k, pos, backend=self.backend, **kw)
        elif pos.is_floating_point():  # fractional positions: transformers' cos/sin math in PyTorch
            ref_rope.qk_norm_mrope(q, k, layer.q_norm, layer.k_norm, pos, **kw)
        else:
            ops.qk_norm_mrope(q, k, layer.q_norm, layer.k_norm, pos, backend=self.backend, **kw)

    def _capture(self, st: _State) -> None:
        """Warm up on a side stream (JIT-compiles every kernel), then capture one step; resets the cache lengths
        (the warm-up steps advanced them) so that :meth:`load_prefill` starts from a clean state."""
        st.graph, (st.logits, st.hidden) = capture(lambda: self._body(st), self.device,
                                                   after_warmup=st.cache_seqlens.zero_)
        st.cache_seqlens.zero_()


def opt_in_decoder(text_model: torch.nn.Module, lm_head: torch.nn.Module | torch.Tensor | None, *,
                   backend: str | None = None) -> MoeTextDecoder:
    """:meth:`MoeTextDecoder.from_transformers` as the pipeline and ``patch`` build it: with the phase-fused step
    where the ``fused_step`` fast path is on (:mod:`omni_fast.fast_paths`, ``OMNI_FAST_FUSED_STEP=1``) and the
    decoder supports it. A decoder it cannot run (dense layers, quantized experts, attention biases, ...) keeps the
    ops path with no error; ``decoder.fused_fallback`` then says why (None otherwise)."""
    from .. import fast_paths

    dec = MoeTextDecoder.from_transformers(text_model, lm_head, backend=backend)
    if fast_paths.enabled("fused_step"):
        why = fused_unsupported(dec)
        if why is None:
            dec.fused = True  # read when load_prefill builds the state: nothing built yet
        else:
            dec.fused_fallback = why
    return dec


def _cache_tensors(cache: Any, n_layers: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer keys / values ``[B, Hk, S, D]`` of a transformers cache (``Cache.layers[i].keys`` in
    transformers >= 4.56; the older ``key_cache`` lists too)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        keys, values = [lay.keys for lay in layers], [lay.values for lay in layers]
    elif hasattr(cache, "key_cache"):
        keys, values = list(cache.key_cache), list(cache.value_cache)
    else:
        raise TypeError(f"expected a transformers Cache, got {type(cache).__name__}")
    if len(keys) != n_layers or any(k is None or not isinstance(k, torch.Tensor) or k.dim() != 4 for k in keys):
        raise ValueError(f"the cache must hold keys of all {n_layers} layers after the prefill")
    return keys, values


__all__ = ["MoeTextDecoder", "TextDecoderConfig", "opt_in_decoder"]
