"""Qwen3-Omni's MTP code predictor as one batched, graph-capturable frame step.

Per 80 ms frame the Talker emits codebook 0 (``c0``) and its last hidden state ``h``; the code predictor (a small
dense decoder: RMSNorm, GQA attention with per-head q/k RMSNorm and 1-D RoPE, SwiGLU) then fills codebooks
1..G-1 autoregressively, exactly as transformers' ``Qwen3OmniMoeTalkerCodePredictorModelForConditionalGeneration
.generate`` does when called from ``Qwen3OmniMoeTalkerForConditionalGeneration.prepare_inputs_for_generation``:

- prefill 2 tokens ``[h, talker_embed(c0)]`` at positions 0, 1 -> ``lm_head[0]`` on the last -> ``c1``;
- step g = 2..G-1: token ``embed[g-2](c_{g-1})`` at position g -> ``lm_head[g-1]`` -> ``c_g``;
- the Talker's next input is ``talker_embed(c0) + sum_{g>=1} embed[g-1](c_g)`` (:func:`omni_fast.ops.rvq_embed`).

The KV cache is a static ``[B, Hkv, G, d]`` buffer per layer, fresh every frame (at most G = 16 tokens). Every
shape and slice of a frame is fixed, so on CUDA the whole frame (prefill + G-2 steps, sampling included) is
captured as ONE CUDA graph per batch bucket (1, 2, 4, 8, 16, 32, 64) and replayed with no Python per step.
Two layer paths (``fused``, default True):

- fused, 5 launches per layer: ``norm_linear`` (input RMSNorm + qkv GEMV) -> ``cached_attention`` with the q/k
  RMSNorm + RoPE + cache write fused in -> ``linear_residual_`` (o-proj + residual) -> ``norm_linear`` with the
  SwiGLU epilogue (post-attention RMSNorm + gate/up GEMV + silu * up) -> ``linear_residual_`` (down + residual);
  the final norm runs in the prologue of the lm_head GEMV (:mod:`omni_fast.ops.mtp_layers`, Triton GEMV kernels);
- unfused, 9 per layer: cuBLAS ``F.linear`` for the four matmuls, :func:`omni_fast.ops.qk_norm_mrope`,
  ``cached_attention``, ``add_rms_norm_`` (x2), ``silu_mul``; kept so a GPU benchmark can compare the two.
- ``persistent=True`` (opt-in, on top of fused): the whole frame (prefill, 14 steps, sampling, next input) as ONE
  launch of a persistent kernel running an instruction queue with dependency counters (docs/persistent.md); the
  same tile functions, so the same codes bit for bit on the interpreter. Default off until a GPU run passes its
  gpu-marked tests.

Per step both then sample (:func:`omni_fast.ops.sample`: top-k/top-p/greedy with a counter-based RNG keyed by
(seed, step, and the row index for one shared seed; per-row seeds leave the row index out, so a frame draws the
same codes wherever it sits in the batch) and gather the next codebook's embedding; the frame ends with
:func:`omni_fast.ops.rvq_embed` (one fp32 sum of the G embeddings, rounded once, as transformers' ``.sum(1)``).

Batch invariance: on the fused path every kernel computes a row the same way whatever the batch (the GEMVs use one
tile config for every M; attention, norms and the sampler work per row), so with per-row seeds (or greedy) row i
of a batch gets bit-identical codes and ``next_input`` to the same frame run alone. The unfused path's cuBLAS
matmuls pick their algorithm by M and do not promise this.

Backend: ``predict_frame(backend=...)`` applies to the whole frame like a ``use_backend`` block (the ops without a
CUDA C++ version run on triton under ``"cuda"``: :func:`omni_fast.backend.resolve_backend`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from .. import ops
from .._cache_memory import copy_changed
from .._device import on_device
from ..backend import graph_capturable, requested_backend, triton_interpreter_enabled, use_backend
from ..ops import mtp_layers
from ..reference import rope as ref_rope
from ..reference import rvq as ref_rvq
from ..reference.rope import rope_inv_freq
from ..validation import (INT_DTYPES, REAL_DTYPES, check_bool, check_device, check_float, check_positive_int,
                          check_seed, check_tensor, values_checkable)
from .cuda_graphs import ReplayGuard, weights_key
from .frame_graph import FrameGraph

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def unsupported_setting(config: Any) -> str | None:
    """What in a transformers code-predictor config (or a dict of its fields) :class:`CodePredictor` would not
    compute as transformers does, or None. It runs Qwen3-Omni's predictor: SiLU SwiGLU MLP, projections without
    biases, default RoPE of ``rope_theta``, full attention over the frame. Settings the config allows beyond that
    were silently dropped (the biases' state-dict keys were never read, other RoPE types ran as the default); a
    sliding window no shorter than the frame (``num_code_groups + 1`` positions) changes nothing and is accepted."""
    get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
    if get("hidden_act", "silu") != "silu":
        return f"hidden_act {get('hidden_act')!r} (the predictor's MLP is SiLU SwiGLU)"
    if get("attention_bias", False):
        return "attention_bias=True (the predictor's projections have no biases)"
    rope = get("rope_parameters") or get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, Mapping) else None
    if kind not in (None, "default"):
        return f"rope_type {kind!r} (the predictor runs the default RoPE)"
    window, frame = get("sliding_window"), get("num_code_groups", CodePredictorConfig.num_code_groups) + 1
    if "sliding_attention" in (get("layer_types") or ()) and window is not None and window < frame:
        return f"sliding_window={window} shorter than a frame ({frame} positions; the predictor attends to all)"
    return None


@dataclass(frozen=True)
class CodePredictorConfig:
    """The MTP code predictor's sizes (defaults: Qwen3-Omni's): hidden size H, MLP width, layers, q / kv heads of
    ``head_dim``, codec vocabulary V, codebooks per frame G, RMSNorm eps and RoPE theta."""

    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 5
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    vocab_size: int = 2048
    num_code_groups: int = 16
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6

    @classmethod
    def from_any(cls, config: Any) -> "CodePredictorConfig":
        """From this class, a dict, or a transformers ``Qwen3OmniMoeTalkerCodePredictorConfig``. ValueError for
        settings the predictor does not run (:func:`unsupported_setting`)."""
        if isinstance(config, cls):
            return config
        reason = unsupported_setting(config)
        if reason is not None:
            raise ValueError(f"config: {reason}")
        get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
        rope = get("rope_parameters") or {}
        theta = rope.get("rope_theta") if isinstance(rope, Mapping) else None
        theta = theta if theta is not None else get("rope_theta", 1e6)
        heads = get("num_attention_heads", cls.num_attention_heads)
        hidden = get("hidden_size", cls.hidden_size)
        return cls(
            hidden_size=hidden,
            intermediate_size=get("intermediate_size", cls.intermediate_size),
            num_hidden_layers=get("num_hidden_layers", cls.num_hidden_layers),
            num_attention_heads=heads,
            num_key_value_heads=get("num_key_value_heads", None) or heads,
            head_dim=get("head_dim", None) or hidden // heads,
            vocab_size=get("vocab_size", cls.vocab_size),
            num_code_groups=get("num_code_groups", cls.num_code_groups),
            rms_norm_eps=get("rms_norm_eps", cls.rms_norm_eps),
            rope_theta=float(theta),
        )


class _Layer(torch.nn.Module):
    def __init__(self, c: CodePredictorConfig, dtype, device):
        super().__init__()
        H, d = c.hidden_size, c.head_dim
        qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * d
        kw = dict(dtype=dtype, device=device)
        self.input_norm = torch.nn.Parameter(torch.ones(H, **kw), requires_grad=False)
        self.qkv = torch.nn.Parameter(torch.empty(qkv, H, **kw), requires_grad=False)  # [q; k; v] rows
        self.q_norm = torch.nn.Parameter(torch.ones(d, **kw), requires_grad=False)
        self.k_norm = torch.nn.Parameter(torch.ones(d, **kw), requires_grad=False)
        self.o = torch.nn.Parameter(torch.empty(H, c.num_attention_heads * d, **kw), requires_grad=False)
        self.post_norm = torch.nn.Parameter(torch.ones(H, **kw), requires_grad=False)
        self.gate_up = torch.nn.Parameter(torch.empty(2 * c.intermediate_size, H, **kw), requires_grad=False)
        self.down = torch.nn.Parameter(torch.empty(H, c.intermediate_size, **kw), requires_grad=False)


class CodePredictor(torch.nn.Module):
    """The MTP code predictor with a static KV cache and a per-batch-bucket CUDA graph of the whole frame.

    Build with :meth:`from_transformers` or :meth:`from_state_dict`; run :meth:`predict_frame`.
    """

    def __init__(self, config: Any = None, *, dtype=torch.float32, device="cpu", codec_vocab_size: int = 0,
                 fused: bool = True, persistent: bool | None = None):
        super().__init__()
        # Fused GEMV layer kernels (5 launches per layer) or the cuBLAS + small-op path (9); see the module doc.
        self.fused = bool(fused)
        # Opt-in: the whole frame as ONE launch of the persistent kernel (docs/persistent.md); not yet proven on a
        # GPU, so the graph-of-kernels path stays the default and the fallback. True / False set here (or assigned
        # later) is this object's own choice and wins over the persistent_mtp fast path; None follows the fast path
        # where the pipeline / patch apply it (follow_fast_path), and is off elsewhere.
        self._persistent_own: bool | None = None if persistent is None else bool(persistent)
        self._persistent_followed = False
        self._persistent: dict[tuple, Any] = {}
        c = self.config = CodePredictorConfig.from_any(config or CodePredictorConfig())
        G, V, H = c.num_code_groups, c.vocab_size, c.hidden_size
        kw = dict(dtype=dtype, device=device)
        self.layers = torch.nn.ModuleList(_Layer(c, dtype, device) for _ in range(c.num_hidden_layers))
        self.norm = torch.nn.Parameter(torch.ones(H, **kw), requires_grad=False)
        # One table for every codebook: rows [0, V0) are the Talker's codebook-0 table (absent when V0 = 0), then
        # the G-1 predictor tables; offsets[g] is codebook g's first row.
        self.codec_vocab_size = int(codec_vocab_size)
        self.table = torch.nn.Parameter(torch.zeros(self.codec_vocab_size + (G - 1) * V, H, **kw),
                                        requires_grad=False)
        self.lm_head = torch.nn.Parameter(torch.empty(G - 1, V, H, **kw), requires_grad=False)
        offs = [0] + [self.codec_vocab_size + g * V for g in range(G - 1)]
        self.register_buffer("offsets", torch.tensor(offs, dtype=torch.long, device=device), persistent=False)
        self._graphs: dict[tuple, FrameGraph] = {}
        self._graphs_weights: tuple | None = None  # weights_key(self) the graphs were captured with
        self._consts: dict[tuple, Any] = {}
        # The frame graphs' static buffers and the persistent frames' workspaces are shared by every request: one
        # frame at a time through them, from the copy-in to the copy-out (threads of a server, any streams)
        self._shared = ReplayGuard()

    # --- construction ---------------------------------------------------------------------------------------

    @classmethod
    def from_state_dict(cls, config: Any, sd: Mapping[str, torch.Tensor], *, codec_embedding=None, dtype=None,
                        device=None, fused: bool = True, persistent: bool | None = None) -> "CodePredictor":
        """From a state dict with transformers' key names (``model.layers.{i}.self_attn.q_proj.weight``, ...,
        ``model.codec_embedding.{g}.weight``, ``lm_head.{g}.weight``; a ``talker.code_predictor.`` or
        ``code_predictor.`` prefix is stripped). ``codec_embedding``: the Talker's codebook-0 table (an
        ``nn.Embedding`` or a ``[V0, H]`` tensor), needed to embed ``c0``. ``fused``: the layer path (module doc).
        ``persistent`` (opt-in, fused path only): the whole frame as ONE launch of the persistent kernel
        (:mod:`omni_fast.models.persistent`, docs/persistent.md); fp64 and the reference backend keep the op path.
        None (default): off, unless the pipeline / ``patch`` that built it follow the ``persistent_mtp`` fast path
        (:attr:`persistent`)."""
        config = CodePredictorConfig.from_any(config)  # (its refusals before any key is read)
        sd = {_strip(k): v for k, v in sd.items()}
        ref = sd["model.norm.weight"]
        dtype = dtype or ref.dtype
        device = ref.device if device is None else check_device("device", device)  # (0 is cuda:0, not None)
        c0 = _table(codec_embedding)
        self = cls(config, dtype=dtype, device=device, codec_vocab_size=0 if c0 is None else c0.shape[0],
                   fused=fused, persistent=persistent)
        c = self.config
        groups = sum(1 for k in sd if k.startswith("lm_head.") and k.endswith(".weight"))
        tables = sum(1 for k in sd if k.startswith("model.codec_embedding.") and k.endswith(".weight"))
        if groups != c.num_code_groups - 1 or tables != c.num_code_groups - 1:
            raise ValueError(f"state dict has {tables} codec embeddings and {groups} lm_heads, the config's "
                             f"num_code_groups={c.num_code_groups} needs {c.num_code_groups - 1} of each")
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                p = f"model.layers.{i}."
                layer.input_norm.copy_(sd[p + "input_layernorm.weight"])
                layer.post_norm.copy_(sd[p + "post_attention_layernorm.weight"])
                layer.qkv.copy_(torch.cat([sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"], 0))
                layer.q_norm.copy_(sd[p + "self_attn.q_norm.weight"])
                layer.k_norm.copy_(sd[p + "self_attn.k_norm.weight"])
                layer.o.copy_(sd[p + "self_attn.o_proj.weight"])
                layer.gate_up.copy_(torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]], 0))
                layer.down.copy_(sd[p + "mlp.down_proj.weight"])
            self.norm.copy_(sd["model.norm.weight"])
            V0 = self.codec_vocab_size
            if c0 is not None:
                self.table[:V0].copy_(c0)
            for g in range(c.num_code_groups - 1):
                self.table[V0 + g * c.vocab_size: V0 + (g + 1) * c.vocab_size].copy_(
                    sd[f"model.codec_embedding.{g}.weight"])
                self.lm_head[g].copy_(sd[f"lm_head.{g}.weight"])
        return self

    @classmethod
    def from_transformers(cls, module: torch.nn.Module, codec_embedding=None, *, fused: bool = True,
                          persistent: bool | None = None) -> "CodePredictor":
        """From a transformers ``Qwen3OmniMoeTalkerCodePredictorModelForConditionalGeneration`` (weights copied)
        and optionally the Talker's codebook-0 embedding (``talker.get_input_embeddings()``)."""
        return cls.from_state_dict(module.config, module.state_dict(), codec_embedding=codec_embedding, fused=fused,
                                   persistent=persistent)

    @property
    def persistent(self) -> bool:
        """Whether frames run as one persistent launch: this object's own setting (constructor or assignment) when
        it has one, else the ``persistent_mtp`` fast path as :meth:`follow_fast_path` last read it (False when
        never). Assigning True / False makes it this object's own choice, which the fast path no longer changes;
        assigning None hands it back to the fast path."""
        own = self.__dict__.get("_persistent_own", self.__dict__.get("persistent"))  # (a pickle of an older version
        # kept a plain ``persistent`` attribute: it counts as the object's own setting)
        return self.__dict__.get("_persistent_followed", False) if own is None else bool(own)

    @persistent.setter
    def persistent(self, value: bool | None) -> None:
        self._persistent_own = None if value is None else bool(value)

    def follow_fast_path(self) -> "CodePredictor":
        """Read the ``persistent_mtp`` fast path (:mod:`omni_fast.fast_paths`) for :attr:`persistent` (the pipeline
        and ``patch`` call this before each stream / frame); an own setting still wins. Returns self."""
        from .. import fast_paths

        self._persistent_followed = fast_paths.enabled("persistent_mtp")
        return self

    # --- one frame ------------------------------------------------------------------------------------------

    def predict_frame(
        self,
        talker_hidden: torch.Tensor,
        c0: torch.Tensor,
        *,
        do_sample: bool = True,
        top_k: int = 50,
        top_p: float = 0.8,
        temperature: float = 1.0,
        seed: int | torch.Tensor | None = None,
        c0_embed: torch.Tensor | None = None,
        use_graph: bool | None = None,
        backend: str | None = None,
        fused: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Fill codebooks 1..G-1 for a batch of frames.

        talker_hidden: ``[B, H]`` (the Talker's last-layer hidden state of the token that produced ``c0``);
        c0: int ``[B]``. ``c0_embed`` ``[B, H]`` replaces the codebook-0 lookup (needed when the predictor was
        built without ``codec_embedding``: the prefill's second token IS the codebook-0 embedding, so a frame
        cannot run without one or the other; ValueError). seed: int or int64 tensor: one value (``[]``/``[1]``:
        shared by the batch, rows told apart by their index) or ``[B]`` (per-row streams: a row's codes do not
        depend on its place in the batch); draws of step g use RNG offset g, so pass a fresh seed per frame.
        Returns ``codes`` int64 ``[B, G]`` (``codes[:, 0] = c0``) and ``next_input`` ``[B, H]``, the sum of the G
        codebook embeddings (codebook 0 from ``codec_embedding`` or ``c0_embed``), accumulated in fp32 and
        rounded once like transformers' ``.sum(1)``. ``use_graph`` (default: on CUDA) replays one captured CUDA
        graph per batch bucket (sampling settings are baked in: one graph per (bucket, settings), at most 32 kept;
        all are dropped when the weights move or change); on a CPU ``use_graph=True`` emulates the replay.
        ``backend`` runs the whole frame as in a ``use_backend(backend)`` block (per-op fallback from cuda to
        triton). ``fused`` overrides the model's layer path for this call.
        """
        self._check_frame_inputs(talker_hidden, c0, c0_embed)
        B = talker_hidden.shape[0]
        do_sample = check_bool("do_sample", do_sample)
        top_k = check_positive_int("top_k", top_k, minimum=0)
        top_p = check_float("top_p", top_p, minimum=0.0, maximum=1.0, min_open=True)
        temperature = check_float("temperature", temperature, minimum=0.0, min_open=True)
        seed = _frame_seed(seed, B, talker_hidden.device)
        sampling = (do_sample, top_k, top_p, temperature)
        fused = self.fused if fused is None else bool(fused)
        x = talker_hidden.to(self.table.dtype)
        # The model-level backend is an ambient choice (a use_backend block), not a per-op pin: ops without a CUDA
        # C++ version fall back to triton under "cuda", and the sampler / RoPE take their CUDA twins.
        # (on the model's device: the frame graphs capture, replay and record events there, the current device
        # may be another: docs/reliability.md, "Several GPUs")
        with on_device(x.device), use_backend(backend) if backend is not None else contextlib.nullcontext():
            if use_graph is None:
                use_graph = (talker_hidden.device.type == "cuda" and not torch.compiler.is_compiling()
                             and graph_capturable())
            if use_graph and B > 0:
                return self._graph_frame(x, c0.long(), c0_embed, seed, sampling, fused)
            seed_t = seed if isinstance(seed, torch.Tensor) else torch.tensor([seed], dtype=torch.long,
                                                                               device=x.device)
            return self.frame(x, c0.long(), c0_embed, seed_t, sampling, None, fused)

    def _check_frame_inputs(self, talker_hidden: torch.Tensor, c0: torch.Tensor, c0_embed) -> None:
        """:meth:`predict_frame`'s tensors: dtypes, shapes, the model's device, ``c0`` in the codec vocabulary
        (a value check: CPU tensors only)."""
        c = self.config
        dev = self.table.device
        check_tensor("talker_hidden", talker_hidden, dtypes=REAL_DTYPES, ndim=2)
        B, H = talker_hidden.shape
        if isinstance(c0, torch.Tensor) and (c0.is_floating_point() or c0.dtype == torch.bool):
            raise TypeError(f"c0 must be an integer tensor, got {c0.dtype}")
        check_tensor("c0", c0, dtypes=INT_DTYPES)
        if talker_hidden.device != dev or c0.device != dev:
            raise ValueError(f"talker_hidden and c0 must be on the model's device {dev}, got "
                             f"{talker_hidden.device} and {c0.device}")
        if H != c.hidden_size:
            raise ValueError(f"talker_hidden must have hidden size {c.hidden_size}, got {tuple(talker_hidden.shape)}")
        if c0.shape != (B,):
            raise ValueError(f"c0 must have shape [B] = [{B}], got {tuple(c0.shape)}")
        if c0_embed is None and self.codec_vocab_size == 0:
            raise ValueError("no codec_embedding was given at construction: the prefill embeds c0, pass c0_embed "
                             "[B, H]")
        if c0_embed is not None:
            check_tensor("c0_embed", c0_embed, dtypes=REAL_DTYPES, shape=(B, H), device=dev)
        if self.codec_vocab_size and B and values_checkable(c0):  # a value check syncs: CPU tensors only
            lo, hi = int(c0.min()), int(c0.max())
            if lo < 0 or hi >= self.codec_vocab_size:
                raise ValueError(f"c0 must lie in [0, {self.codec_vocab_size}), got values in [{lo}, {hi}]")

    def frame(self, x: torch.Tensor, c0: torch.Tensor, c0_embed: torch.Tensor | None, seed: torch.Tensor,
              sampling: tuple[bool, int, float, float], backend: str | None = None, fused: bool | None = None):
        """The frame body (no validation, no host sync): what the CUDA graph captures. See :meth:`predict_frame`.

        ``backend`` here is every op's ``backend=`` (``"cuda"``: the CUDA C++ twin where an op has one, triton
        elsewhere); None takes the ambient one."""
        fused = self.fused if fused is None else fused
        # (a CPU tensor without the interpreter resolves "auto" to the reference ops: the op path then)
        if self.persistent and fused and x.dtype != torch.float64 and x.shape[0] > 0 and \
                requested_backend(backend) != "reference" and (x.is_cuda or triton_interpreter_enabled()):
            return self._persistent_frame(x, c0, c0_embed, seed, sampling)
        c = self.config
        G, V0 = c.num_code_groups, self.codec_vocab_size
        B = x.shape[0]
        do_sample, top_k, top_p, temperature = sampling
        consts = self._constants(x.device, B, x.dtype)
        caches = [(x.new_empty(B, c.num_key_value_heads, G, c.head_dim),
                   x.new_empty(B, c.num_key_value_heads, G, c.head_dim)) for _ in self.layers]
        e0 = F.embedding(c0, self.table[:V0]) if c0_embed is None else c0_embed.to(x.dtype)
        h = torch.stack((x, e0), 1)  # [B, 2, H] prefill tokens
        codes = [c0]
        step = self._step_fused if fused else self._step
        for g in range(1, G):
            start = 0 if g == 1 else g
            logits = step(h, start, caches, consts, self.lm_head[g - 1], backend)  # [B, T, H] -> [B, V]
            # The sampler upcasts to fp32 exactly as transformers.
            if logits.dtype == torch.float64:
                logits = logits.float()  # transformers: logits[:, -1].to(float32)
            code = ops.sample(logits, temperature=temperature, top_k=top_k if do_sample else 0,
                              top_p=top_p if do_sample else 1.0, seed=seed, offset=consts["offsets"][g],
                              greedy=not do_sample, backend=backend)
            codes.append(code)
            if g < G - 1:
                row0 = V0 + (g - 1) * c.vocab_size
                h = (self.table[row0: row0 + c.vocab_size], code)  # the next token: this codebook's embedding
        codes_t = torch.stack(codes, 1)
        rvq = ref_rvq.rvq_embed if x.dtype == torch.float64 else partial(ops.rvq_embed, backend=backend)
        if c0_embed is None:
            nxt = rvq(codes_t, self.table, offsets=self.offsets)
        else:
            # One sum of the G rows (fp32, rounded once, as transformers' cat(...).sum(1)): e0 enters as a [B, H]
            # table read at row b by frame b, the other codebooks as views of the shared table.
            tables = [e0.contiguous()] + [self.table[V0 + g * c.vocab_size: V0 + (g + 1) * c.vocab_size]
                                          for g in range(G - 1)]
            nxt = rvq(torch.cat((consts["rows"][:, None], codes_t[:, 1:]), 1), tables)
        return codes_t, nxt

    def reset_persistent(self) -> int:
        """After a :class:`~omni_fast.models.persistent.PersistentError`: reset every persistent frame this model
        built (counters, error flag, recorded flag; stream-ordered, no host sync). Returns how many."""
        with self._shared.hold(self.table.device):  # (another thread's request may be building a frame)
            for frame in self._persistent.values():
                frame.reset()
            return len(self._persistent)

    def _persistent_frame(self, x, c0, c0_embed, seed, sampling):
        """The frame as one launch of the persistent kernel (:mod:`omni_fast.models.persistent`), one compiled
        schedule + workspace per (weights, B, dtype, device, sampling, seed form, codebook-0 source)."""
        from .persistent import PersistentFrame

        key = (weights_key(self), x.shape[0], x.dtype, str(x.device), sampling, seed.numel() > 1, c0_embed is None)
        with self._shared.hold(x.device):
            frame = self._persistent.get(key)
            if frame is None:
                if len(self._persistent) >= 32 or any(k[0] != key[0] for k in self._persistent):  # full, or stale
                    self._shared.drain(x.device)  # (another stream's launch may still use a workspace)
                    self._persistent.clear()
                frame = self._persistent[key] = PersistentFrame(self, x.shape[0], x.dtype, x.device, sampling,
                                                                seed.numel() > 1, c0_embed is not None)
                copy_changed(self)  # (new tensors, made on this stream: every stream's next lookup records them)
            self._last_persistent = frame  # (a FrameGraph being built watches the frame its body launches)
            return frame(x.contiguous(), c0, None if c0_embed is None else c0_embed.to(x.dtype).contiguous(), seed)

    def _constants(self, device, B, dtype) -> dict:
        key = (str(device), B, dtype)
        got = self._consts.get(key)
        if got is None:
            c = self.config
            G = c.num_code_groups
            inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, device)
            cos, sin = mtp_layers.rope_tables(G, inv_freq, dtype)  # positions 0..G-1 (fused attention)
            got = {
                "pos": {0: torch.arange(2, device=device).repeat(B)}
                | {g: torch.full((B,), g, dtype=torch.long, device=device) for g in range(2, G)},
                "offsets": [torch.tensor([g], dtype=torch.long, device=device) for g in range(G)],
                "rows": torch.arange(B, device=device),  # c0_embed's row of each frame (the next-input sum)
                "inv_freq": inv_freq,
                "cos": cos,
                "sin": sin,
            }
            self._consts[key] = got
            copy_changed(self)  # (new tensors, made on this stream: every stream's next lookup records them)
        return got

    def _step(self, h, start, caches, consts, lm_head, backend):
        """Unfused decoder step on tokens ``h`` ``[B, T, H]`` at positions start..start+T-1 (or ``(table, ids)``: one
        token per sequence, ``table[ids]``): the logits ``[B, V]`` of the LAST token (cuBLAS matmuls + small fused
        ops, 9 launches per layer, plus the embedding gather)."""
        c = self.config
        if isinstance(h, tuple):
            h = F.embedding(h[1], h[0])[:, None]  # [B, 1, H]
        B, T, H = h.shape
        nq, nk, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        f = _Fns(h.dtype, backend)
        eps = c.rms_norm_eps
        resid = h.reshape(B * T, H).contiguous()  # the residual stream, updated in place by add_rms_norm_
        x = f.add_rms_norm(resid, None, self.layers[0].input_norm, eps=eps)
        for i, (layer, (kc, vc)) in enumerate(zip(self.layers, caches)):
            qkv = F.linear(x, layer.qkv).view(B * T, nq + 2 * nk, d)
            q, k, v = qkv[:, :nq], qkv[:, nq: nq + nk], qkv[:, nq + nk:]
            f.qk_norm_rope(q, k, layer.q_norm, layer.k_norm, consts["pos"][start], eps=eps,
                           mrope_section=(d // 2, 0, 0), interleaved=False, inv_freq=consts["inv_freq"])
            attn = f.attention(q.view(B, T, nq, d), k.view(B, T, nk, d), v.view(B, T, nk, d), kc, vc, start=start,
                               scale=d**-0.5)
            x = f.add_rms_norm(resid, F.linear(attn.reshape(B * T, nq * d), layer.o), layer.post_norm, eps=eps)
            mlp = F.linear(f.silu_mul(F.linear(x, layer.gate_up)), layer.down)
            nxt = self.layers[i + 1].input_norm if i + 1 < len(self.layers) else self.norm
            x = f.add_rms_norm(resid, mlp, nxt, eps=eps)
        return F.linear(x.view(B, T, H)[:, -1], lm_head)

    def _step_fused(self, h, start, caches, consts, lm_head, backend):
        """:meth:`_step` with the fused GEMV kernels: 5 launches per layer + the lm_head GEMV (final norm fused); a
        ``(table, ids)`` token is gathered in the prologue of the first qkv GEMV (no embedding launch)."""
        c = self.config
        nq, nk, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        eps = c.rms_norm_eps
        if isinstance(h, tuple):
            table, ids = h
            B, T, H = ids.shape[0], 1, table.shape[1]
            resid = table.new_empty(B, H)  # the residual stream, written by the first GEMV's gather
            first = dict(x=table, rows=ids, gathered=resid)
        else:
            B, T, H = h.shape
            resid = h.reshape(B * T, H).contiguous()  # the residual stream, updated in place by linear_residual_
            first = dict(x=resid)
        f = _Fns(resid.dtype, backend)
        for i, (layer, (kc, vc)) in enumerate(zip(self.layers, caches)):
            src = first if i == 0 else dict(x=resid)
            qkv = f.norm_linear(norm_weight=layer.input_norm, weight=layer.qkv, eps=eps, swiglu=False, **src)
            qkv = qkv.view(B, T, nq + 2 * nk, d)
            attn = f.attention(qkv[:, :, :nq], qkv[:, :, nq: nq + nk], qkv[:, :, nq + nk:], kc, vc, start=start,
                               scale=d**-0.5, q_norm=layer.q_norm, k_norm=layer.k_norm, cos=consts["cos"],
                               sin=consts["sin"], eps=eps)
            f.linear_residual(resid, attn.view(B * T, nq * d), layer.o)
            act = f.norm_linear(resid, layer.post_norm, layer.gate_up, eps=eps, swiglu=True)
            f.linear_residual(resid, act, layer.down)
        # Final norm in the lm_head GEMV's prologue, on the last token of each sequence only (a strided view).
        return f.norm_linear(resid.view(B, T, H)[:, -1], self.norm, lm_head, eps=eps, swiglu=False)

    # --- CUDA graph -----------------------------------------------------------------------------------------

    def _graph_frame(self, x, c0, c0_embed, seed, sampling, fused):
        B = x.shape[0]
        # Buckets 1, 2, 4, ..., 64 (and, above, the next power of two: one batch keeps its RNG row indices).
        bucket = next((b for b in BATCH_BUCKETS if b >= B), None) or 1 << (B - 1).bit_length()
        # One shared seed ([1]: rows keyed by their index) or per-row seeds ([B]: no row index): two graphs.
        per_row = isinstance(seed, torch.Tensor) and seed.numel() > 1
        # the backend as requested now (argument, use_backend block, environment): a graph of one ambient choice
        # never replays under another; nor one of inference mode outside it (inference tensors as static buffers)
        key = (bucket, sampling, c0_embed is None, per_row, str(x.device), x.dtype, requested_backend(),
               self.persistent, torch.is_inference_mode_enabled(), fused)
        with self._shared.hold(x.device):  # the lookup, any capture, the copies in, the replay, the copies out
            # graphs read the weights by address: moved (.to()), reloaded or updated weights make them all stale;
            # > 32 graphs (settings are baked in: a server's per-request temperatures) are dropped too, bounded
            weights = weights_key(self)
            if weights != self._graphs_weights or (len(self._graphs) >= 32 and key not in self._graphs):
                self._shared.drain(x.device)  # (another stream's replay may still read their static inputs)
                self._graphs.clear()
                self._graphs_weights = weights
            graph = self._graphs.get(key)
            if graph is None:
                graph = self._graphs[key] = FrameGraph(self, bucket, x.device, x.dtype, c0_embed is None, sampling,
                                                       fused, per_row)
                copy_changed(self)  # (its static buffers: every stream's next lookup records them)
            return graph.run(x, c0, c0_embed, seed)


class _Fns:
    """The layer ops for one dtype/backend. fp64 (exactness tests against transformers only) calls the reference
    implementations directly: the dispatched ops take fp16/bf16/fp32."""

    def __init__(self, dtype: torch.dtype, backend: str | None):
        if dtype == torch.float64:
            self.add_rms_norm = lambda h, delta, w, eps: mtp_layers._add_rms_norm_reference(h, delta, w, eps)
            self.silu_mul = mtp_layers._silu_mul_reference
            self.attention = _reference_attention
            self.qk_norm_rope = ref_rope.qk_norm_mrope
            self.norm_linear = _reference_norm_linear
            self.linear_residual = mtp_layers._linear_residual_reference
        else:
            self.add_rms_norm = partial(mtp_layers.add_rms_norm_, backend=backend)
            self.silu_mul = partial(mtp_layers.silu_mul, backend=backend)
            self.attention = partial(mtp_layers.cached_attention, backend=backend)
            self.qk_norm_rope = partial(ops.qk_norm_mrope, backend=backend)
            self.norm_linear = partial(mtp_layers.norm_linear, backend=backend)
            self.linear_residual = partial(mtp_layers.linear_residual_, backend=backend)


def _reference_norm_linear(x, norm_weight, weight, eps, swiglu, rows=None, gathered=None):
    return mtp_layers._norm_linear_reference(x, norm_weight, weight, eps, swiglu, rows, gathered)


def _reference_attention(q, k, v, kc, vc, start, scale, q_norm=None, k_norm=None, cos=None, sin=None, eps=0.0):
    return mtp_layers._attn_reference(q, k, v, kc, vc, start, scale, q_norm, k_norm, cos, sin, eps)


def _strip(key: str) -> str:
    for p in ("talker.code_predictor.", "code_predictor."):
        if key.startswith(p):
            return key[len(p):]
    return key


def _table(codec_embedding) -> torch.Tensor | None:
    if codec_embedding is None:
        return None
    if isinstance(codec_embedding, torch.nn.Embedding):
        return codec_embedding.weight.detach()
    if isinstance(codec_embedding, torch.Tensor):
        return codec_embedding.detach()
    raise TypeError(f"codec_embedding must be an nn.Embedding or a [V0, H] tensor, got {type(codec_embedding)}")


def _frame_seed(seed, B: int, device: torch.device) -> int | torch.Tensor:
    """:meth:`CodePredictor.predict_frame`'s seed: None draws one; an int (numpy ints too) is checked; an integer
    tensor of one value or ``[B]`` becomes int64 ``[1]`` / ``[B]`` on ``device``."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    if isinstance(seed, torch.Tensor):
        if seed.is_floating_point() or seed.dtype == torch.bool or seed.is_complex():
            raise TypeError(f"seed must be an int or an integer tensor, got a {seed.dtype} tensor")
        if seed.numel() not in (1, B) or seed.dim() > 1:
            raise ValueError(f"seed must hold one value or one per row (B={B}), got shape {tuple(seed.shape)}")
        seed = seed.reshape(-1).to(device=device, dtype=torch.long).contiguous()
    else:
        seed = check_seed("seed", seed)  # ints and numpy ints; outside int64 -> ValueError naming the seed
    return seed
