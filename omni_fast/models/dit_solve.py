"""Qwen2.5-Omni Token2Wav DiT: the whole ODE solve (every RK4 step of transformers' ``RungeKutta4ODESolver``, every
DiT forward of every step) as ONE CUDA graph per length bucket.

transformers' ``Qwen2_5OmniToken2WavDiTModel.sample`` runs ``4 * (num_steps - 1)`` DiT forwards from Python (each a
few hundred launches), recomputing step-invariant work every time (the ECAPA speaker encoder on the reference
mel, the code embeddings, the RoPE table, the ``[S, S]`` block mask). Here:

- the speaker encoder runs once, eagerly, before the graph (its input, the reference mel, has its own length);
- the graph holds everything else: code embeddings and RoPE once, then every step's four DiT forwards with the
  CFG batch (``2B`` rows) and the RK4 arithmetic written exactly as transformers writes it (same expression
  order, so the same fp32 roundings), time points from ``torch.linspace`` + the sway formula on the device;
- the mel length ``L = codes * repeats`` is padded to the bucket's ``S``; attention masks keys past ``L``
  (:func:`omni_fast.ops.block_attention` ``seq_lens``, a device tensor: no host sync), and every other DiT op is
  row-wise, so rows ``< L`` are the unpadded solve's. Two lengths of one bucket replay the same graph.
- the initial noise is drawn with transformers' own call (``torch.randn([B, L, mel_dim])`` on the global RNG)
  outside the graph, so a seed gives transformers' noise.

All of a DiT's graphs (every bucket; :func:`sample`'s and :func:`synthesize`'s) share ONE memory pool
(:class:`_SharedPool`: why that is safe, and the replay contract that keeps it so).

Without CUDA, "replay" runs the captured function eagerly on the same static buffers (the bucket, padding and
length logic stay testable on the CPU).
"""

from __future__ import annotations

import contextlib
import math
import weakref

import torch

from .. import fast_paths
from ..backend import requested_backend
from ..validation import check_positive_int, check_tensor
from . import bigvgan_padded, dit_layers
from .._device import on_device
from .cuda_graphs import ModelRef, ReplayGuard, capture, key_devices, weights_key

# Codec tokens per solve (mel frames = x repeats): four buckets per octave, 16 ... 4096 (16, 19, 23, 27, 32, 38, ...),
# each rounded up to whole attention blocks when used. Every op of the solve (and of the vocoder in the same graph)
# runs over the bucket, so the padding is paid in full: powers of two padded 0.5-30 s replies by 48 % on average
# (up to 2.2x), these by 9 % (predicted; docs/token2wav.md, "Padding: what the bucket costs").
CODE_BUCKETS = tuple(sorted({round(16 * 2 ** (i / 4)) for i in range(33)}))
_CACHE = "_omni_fast_dit_graphs"  # on the DiT module: {key: _SolveGraph}, plus the weights key they were built on
# Solve graphs kept per DiT and cache (mel-only / mel + waveform), least recently used dropped first: a server's
# requests vary the key (batch size, length bucket, num_steps, guidance_scale, sway_coefficient)
MAX_SOLVE_GRAPHS = 64
_POOL = "_omni_fast_dit_pool"  # on the DiT module: the one _SharedPool of all its solve graphs (both caches)


class _GraphCache(dict):
    """The per-DiT graph cache: pickles and deep-copies as an EMPTY cache (captured graphs, their static buffers and
    closures are bound to this module's weights and device: a saved / copied patched model rebuilds its own)."""

    def __reduce__(self):
        return _GraphCache, ()


class _SharedPool(ReplayGuard):
    """ONE CUDA-graph memory pool for all of a DiT's solve graphs (every bucket, :func:`sample`'s and
    :func:`synthesize`'s), as ``Code2WavStream`` shares one per stream; pickles / deep-copies as a fresh one.

    Why sharing is safe. A graph captured into a shared pool may be handed the blocks that an EARLIER capture freed
    (its scratch), never blocks still alive: each graph's static outputs (``_SolveGraph.out``, allocated in the pool
    during its capture) stay alive with the graph, and its static inputs are allocated before the capture, outside
    the pool. So a replay overwrites its own scratch (possibly another graph's scratch: harmless) and its own
    outputs, and may overwrite the static OUTPUTS of a graph captured after it (they can sit in its scratch). The
    contract that makes this safe, whatever the replay order:

    - replays never overlap: :func:`_solve` holds ``lock`` from the cache lookup (and any capture) to the end of the
      replay and makes the current stream wait for ``done`` (the previous replay's end, recorded on its stream), so
      calls from several threads or streams are serialised on the device as on the host;
    - a replay's outputs are consumed before the next replay: ``_SolveGraph.run`` clones them (the slices the
      caller gets) on the replay's stream right after it, inside the lock. Nothing outside ``run`` reads ``out``.

    What it saves: the pool is the largest solve's peak activations (plus every graph's small static outputs)
    instead of the sum over the ~23 buckets a 0.5-30 s workload captures (not measured: no GPU has run it).
    """

    def __init__(self):
        super().__init__()  # the lock and the previous replay's event (ReplayGuard)
        self.handle = None
        self.graphs = weakref.WeakSet()  # the live graphs captured into ``handle``

    def pool(self, graph) -> object:
        """The pool handle ``graph`` is captured into: the live graphs' one, or a new one when none lives (torch
        asserts a pool's use count > 0 when a capture joins it: a pool whose graphs all died, e.g. dropped after new
        weights, is never joined again)."""
        if not self.graphs:
            self.handle = torch.cuda.graph_pool_handle()
        self.graphs.add(graph)
        return self.handle


def _captures(device) -> bool:
    """Whether solves on ``device`` are captured as CUDA graphs (elsewhere: emulated replay)."""
    return torch.device(device).type == "cuda"


def bucket_for(codes: int, buckets=CODE_BUCKETS) -> int:
    """The smallest bucket holding ``codes`` codec tokens (beyond the largest: the next power of two)."""
    return next((b for b in sorted(buckets) if b >= codes), None) or 1 << (codes - 1).bit_length()


def _page_aligned(codes: int, dit) -> int:
    """``codes`` rounded up so that the padded mel length ``codes * repeats`` is whole attention blocks (the block
    attention then reads K/V as pages in place, no per-layer padding copy; the extra rows are masked padding)."""
    step = dit.block_size // math.gcd(dit.block_size, dit.repeats)
    return -(-codes // step) * step


def _attention(attn, h, cos, sin, lens, block, backend):
    """transformers' ``DiTAttention`` (RoPE on the first head only, interleaved layout) with the block-masked SDPA
    as one :func:`omni_fast.ops.block_attention` launch that masks keys past ``lens`` ([rows] int32)."""
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import apply_rotary_pos_emb, deinterleave_head_dim

    from .. import ops

    B = h.shape[0]
    q, k, v = (lin(h).view(B, -1, attn.heads, attn.inner_dim // attn.heads) for lin in (attn.to_q, attn.to_k,
                                                                                       attn.to_v))
    q0, k0 = apply_rotary_pos_emb(deinterleave_head_dim(q[:, :, :1].transpose(1, 2)),
                                  deinterleave_head_dim(k[:, :, :1].transpose(1, 2)), cos, sin)
    q = torch.cat([q0.transpose(1, 2), q[:, :, 1:]], dim=2).contiguous()
    k = torch.cat([k0.transpose(1, 2), k[:, :, 1:]], dim=2).contiguous()
    out = ops.block_attention(q, k, v.contiguous(), block_size=block[0], look_backward=block[1],
                              look_ahead=block[2], seq_lens=lens, backend=backend)
    return attn.to_out[1](attn.to_out[0](out.reshape(B, -1, attn.inner_dim)))


def _dit_forward(dit, x, t, static, backend):
    """One DiT forward (``Qwen2_5OmniToken2WavDiTModel.forward``) on the solve's precomputed step invariants.
    x ``[B, S, mel]``, t 0-dim; returns the velocity ``[B, S, mel]`` (CFG-guided when the solve uses CFG)."""
    cfg = static["cfg"]
    rows = x.shape[0] * (2 if cfg else 1)
    time_embedding = dit.time_embed(t.repeat(rows))
    h = torch.cat([x, x], dim=0) if cfg else x
    h = dit.input_embed.proj(torch.cat((h, static["spk"], static["code"], static["cond"]), dim=-1))
    if static["fused"] is not None:  # 9 launches per layer (omni_fast.models.dit_layers)
        out = dit.proj_out(dit_layers.layers_forward(dit, h, time_embedding, static, backend))
    else:
        out = _unfused_layers(dit, h, time_embedding, static, backend)
    if not cfg:
        return out
    guided, null = torch.chunk(out, 2, dim=0)
    return guided + (guided - null) * static["guidance_scale"]


def _unfused_layers(dit, h, time_embedding, static, backend):
    """The layers module by module (a DiT :func:`dit_layers.fusable` refuses, e.g. a linear without bias)."""
    cos, sin = static["rope"]
    for layer in dit.transformer_blocks:
        norm, gate_msa, shift_mlp, scale_mlp, gate_mlp = layer.attn_norm(h, emb=time_embedding)
        block = (dit.block_size, layer.look_backward_block, layer.look_ahead_block)
        h = h + gate_msa.unsqueeze(1) * _attention(layer.attn, norm, cos, sin, static["lens"], block, backend)
        norm = layer.ff_norm(h) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        h = h + gate_mlp.unsqueeze(1) * layer.ff(norm)
    return dit.proj_out(dit.norm_out(h, time_embedding))


def _invariants(dit, code, cond, spk, lens, guidance_scale):
    """The step-invariant DiT inputs, built on the device: code embeddings (CFG: real / dropped), the repeated
    speaker conditioning, the encoded reference mel, RoPE, the per-row lengths."""
    S = code.shape[1] * dit.repeats
    cfg = guidance_scale >= 1e-5  # transformers' test (``guidance_scale < 1e-5``: no CFG)
    code_embed = dit.text_embed(code, drop_code=False)
    cond = cond.unsqueeze(1).repeat(1, S, 1)
    if cfg:
        code_embed = torch.cat([code_embed, dit.text_embed(code, drop_code=True)], dim=0)
        cond = torch.cat([cond, torch.zeros_like(cond)], dim=0)
        lens = torch.cat([lens, lens])
    spk = spk.unsqueeze(1).repeat(1, S, 1)
    position_ids = torch.arange(S, device=code.device)[None, :].repeat(spk.shape[0], 1)
    rope = dit.rotary_embed(spk, position_ids)
    fused = dit_layers.fuse_weights(dit) if dit_layers.fusable(dit) else None  # (no device work once built)
    plans = dit_layers.attention_plans(dit, spk.shape[0], S, lens) if fused is not None else None
    return dict(cfg=cfg, code=code_embed, cond=cond, spk=spk, rope=rope, lens=lens, guidance_scale=guidance_scale,
                fused=fused, plans=plans)


def solve(dit, noise, code, cond, spk, lens, *, num_steps: int, guidance_scale: float, sway_coefficient,
          backend: str | None = None) -> torch.Tensor:
    """The ODE solve of ``sample`` (RK4, ``num_steps`` time points), no host sync: the function the graph captures.

    noise ``[B, S, mel]`` (the initial state, padded), code long ``[B, S / repeats]``, cond ``[B, enc_emb_dim]``
    (``sample``'s ``conditioning``), spk ``[B or 2B, enc_dim]`` (the speaker encoder's output on the reference mel,
    with the CFG zero rows), lens int32 ``[B]`` (real mel frames). Returns the final state ``[B, S, mel]``."""
    static = _invariants(dit, code, cond, spk, lens, guidance_scale)
    times = torch.linspace(0, 1, num_steps, device=code.device, dtype=cond.dtype)
    if sway_coefficient is not None:
        times += sway_coefficient * (torch.cos(torch.pi / 2 * times) - 1 + times)
    f = lambda t, y: _dit_forward(dit, y, t, static, backend)  # noqa: E731
    one_third, two_thirds = 1 / 3, 2 / 3
    y = noise
    for i in range(num_steps - 1):  # RungeKutta4ODESolver._rk4_step, term for term (the same fp32 roundings)
        t0, t1 = times[i], times[i + 1]
        dt = t1 - t0
        k1 = f(t0, y)
        k2 = f(t0 + dt * one_third, y + dt * k1 * one_third)
        k3 = f(t0 + dt * two_thirds, y + dt * (k2 - k1 * one_third))
        k4 = f(t1, y + dt * (k1 - k2 + k3))
        y = y + (k1 + 3 * (k2 + k3) + k4) * dt / 8
    return y


def _tf32_flag() -> tuple[str, object]:
    """The cuBLAS fp32-math flag of this torch (``fp32_precision`` where it exists, else ``allow_tf32``) and its
    TF32 value: the one place that decides which flag :func:`_matmul_math` sets and the graph key reads."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        return "fp32_precision", "tf32"
    return "allow_tf32", True


@contextlib.contextmanager
def _matmul_math(tf32: bool):
    """cuBLAS fp32 GEMMs as TF32 inside (fast path ``dit_tf32``), restored after; a captured graph keeps the math
    it was captured with. Nothing changes on the CPU (the flag is CUDA's)."""
    if not tf32:
        yield
        return
    m = torch.backends.cuda.matmul
    name, value = _tf32_flag()
    old = getattr(m, name)
    setattr(m, name, value)
    try:
        yield
    finally:
        setattr(m, name, old)


class _SolveGraph:
    """One captured solve for (batch, bucket, steps, guidance, sway, dtype, device, backend), optionally followed by
    the vocoder on the padded mel (:func:`synthesize`): static inputs, the graph, the static outputs."""

    def __init__(self, dit, batch, codes, spk_rows, dtype, device, settings, backend, vocoder=None, tf32=False, *,
                 pool: _SharedPool | None = None):
        cfg = dit.config
        S = codes * dit.repeats
        self.noise = torch.zeros(batch, S, dit.mel_dim, device=device, dtype=dtype)
        self.code = torch.zeros(batch, codes, device=device, dtype=torch.long)
        self.cond = torch.zeros(batch, cfg.enc_emb_dim, device=device, dtype=dtype)
        self.spk = torch.zeros(spk_rows, cfg.enc_dim, device=device, dtype=dtype)
        self.lens = torch.full((batch,), S, device=device, dtype=torch.int32)
        # the DiT weakly (it keeps this graph in its cache: a cycle would hold the DiT's weights, this graph and its
        # pool until a full gc); no closure over self either (the same cycle through the graph itself)
        self._dit, self.vocoder, self.settings, self.backend = ModelRef(dit, "DiT"), vocoder, settings, backend
        self.tf32, self.device = tf32, device
        self.shared = pool if pool is not None else _SharedPool()
        if not _captures(device):  # emulated replay: the same function on the same buffers, first run at the first
            # replay (it makes ``out``): a capture-time run too only doubled a first solve's interpreter time
            self.graph, self.out = None, None
            return
        with _matmul_math(tf32):
            self.graph, self.out = capture(self._run, device, pool=self.shared.pool(self))

    def _run(self) -> tuple[torch.Tensor, ...]:
        """The solve (and vocoder) on the static buffers: what the graph captures."""
        steps, guidance, sway = self.settings
        y = solve(self._dit.get(), self.noise, self.code, self.cond, self.spk, self.lens, num_steps=steps,
                  guidance_scale=guidance, sway_coefficient=sway, backend=self.backend)
        if self.vocoder is None:
            return (y,)
        return y, bigvgan_padded.vocode(self.vocoder, y.permute(0, 2, 1), self.lens, backend=self.backend)

    def run(self, noise, code, cond, spk, length) -> tuple[torch.Tensor, ...]:
        """(mel state ``[B, L, mel]``,) or (that, waveform ``[B, L * samples per frame]``), fresh tensors: the
        static outputs are cloned right after the replay (the shared pool's contract, :class:`_SharedPool`). Called
        inside :func:`_solve`'s hold of ``self.shared``, which covers the lookup, any capture and this replay."""
        return self._replay(noise, code, cond, spk, length)

    def _replay(self, noise, code, cond, spk, length) -> tuple[torch.Tensor, ...]:
        self._dit.get()  # a ReferenceError, not a replay over freed weights, for a graph kept past its DiT
        L, n = noise.shape[1], code.shape[1]
        self.noise.zero_()
        self.noise[:, :L].copy_(noise)
        self.code.zero_()
        self.code[:, :n].copy_(code)
        self.cond.copy_(cond)
        self.spk.copy_(spk)
        self.lens.fill_(length)
        if self.graph is None:
            with _matmul_math(self.tf32):
                fresh = self._run()
            if self.out is None:  # the first emulated replay: its outputs are the static ones
                self.out = fresh
            else:
                for static, new in zip(self.out, fresh):
                    static.copy_(new)
        else:
            self.graph.replay()
        per = self.out[1].shape[-1] // self.noise.shape[1] if len(self.out) > 1 else 0
        return (self.out[0][:, :L].clone(),) + tuple(w[:, :L * per].clone() for w in self.out[1:])


def _solve(dit, conditioning, reference_mel, code, num_steps, guidance_scale, sway_coefficient, buckets, backend,
           vocoder=None):
    """The graph lookup and replay shared by :func:`sample` and :func:`synthesize`."""
    check_tensor("code", code, dtypes=(torch.int64, torch.int32), ndim=2)
    B, n = code.shape
    check_positive_int("code length", n)
    check_tensor("reference_mel", reference_mel, ndim=3, shape=(B, None, dit.mel_dim))
    check_tensor("conditioning", conditioning, ndim=2, shape=(B, dit.config.enc_emb_dim))
    steps = check_positive_int("num_steps", num_steps, minimum=2)
    L = n * dit.repeats
    if L > dit.config.max_position_embeddings:
        raise ValueError(f"Requested mel length ({L}) exceeds `dit_config.max_position_embeddings` "
                         f"({dit.config.max_position_embeddings}). Provide shorter `quantized_code`.")
    weights = _resident_weights(dit, vocoder)  # (before the noise draw and the fusing: a refusal changes nothing)
    noise = torch.randn([B, L, dit.mel_dim], dtype=reference_mel.dtype, device=code.device)  # transformers' draw
    cfg = guidance_scale >= 1e-5
    ref = torch.cat([reference_mel, torch.zeros_like(reference_mel)], dim=0) if cfg else reference_mel
    spk = dit.input_embed.spk_encoder(ref)  # step-invariant: once per solve, outside the graph
    codes = _page_aligned(bucket_for(n, buckets), dit)
    settings = (steps, float(guidance_scale), None if sway_coefficient is None else float(sway_coefficient))
    # the backend as requested now: a graph captured under one ambient choice must not replay under another
    tf32 = fast_paths.enabled("dit_tf32") and conditioning.dtype == torch.float32
    # the ambient cuBLAS fp32 math too: a graph captured under the user's own TF32 setting keeps it when replayed
    ambient = getattr(torch.backends.cuda.matmul, _tf32_flag()[0])
    # and the inference mode: static buffers made under torch.inference_mode() cannot be written outside it
    key = (B, codes, settings, conditioning.dtype, str(code.device), backend or requested_backend(), id(vocoder),
           torch.is_inference_mode_enabled(), tf32, ambient)
    shared = dit.__dict__.setdefault(_POOL, _SharedPool())  # one pool for both caches' graphs, every bucket
    # weights, cache, any capture, the replay: one solve at a time per DiT (_SharedPool), the device ordered too
    with on_device(code.device), shared.hold(code.device):  # (on the DiT's device, whichever is current)
        cache = _graph_cache(dit, vocoder, shared, code.device, weights)
        graph = cache.pop(key, None)  # (re-inserted below: the dict's order is the least recently used first)
        if graph is None:
            _evict(cache, shared, code.device)
            graph = cache[key] = _SolveGraph(dit, B, codes, spk.shape[0], conditioning.dtype, code.device,
                                             settings, backend, vocoder, tf32, pool=shared)
        else:
            cache[key] = graph
        return graph.run(noise, code, conditioning, spk, L)


def _evict(cache: _GraphCache, shared: ReplayGuard, device) -> None:
    """Before a new graph joins ``cache``: keep at most :data:`MAX_SOLVE_GRAPHS` (the keys come from requests: batch
    size, bucket, steps, guidance and sway values), dropping the least recently used ones after ``shared.drain``
    (another stream's replay may still read a dropped graph's buffers; a capture syncs the device anyway)."""
    graphs = [k for k in cache if k != "weights"]
    if len(graphs) >= MAX_SOLVE_GRAPHS:
        shared.drain(device)
        for k in graphs[:len(graphs) - MAX_SOLVE_GRAPHS + 1]:
            del cache[k]


class WeightsElsewhere(ValueError):
    """The DiT's (and vocoder's) weights are not all on one device: offloaded by accelerate's ``device_map`` (CPU /
    disk: on the meta device outside each submodule's own hooked forward, which loads them for that forward only),
    or split over devices. The solve graph reads every weight directly, on one device: the patched callers run
    transformers' forward instead (raised before anything was drawn, fused or run)."""


def _resident_weights(dit, vocoder) -> tuple:
    """``(fused, key)``: the DiT's fused weights before this call (or None) and the :func:`weights_key` of the DiT
    (and vocoder), the one walk over their tensors per solve; :class:`WeightsElsewhere` unless they sit on one
    device that is not meta."""
    fused = dit_layers.fused_now(dit)
    key = weights_key(dit) if vocoder is None else weights_key(dit, vocoder)
    devices = key_devices(key)
    if len(devices) != 1 or torch.device("meta") in devices:
        why = "offloaded by device_map (on meta)" if torch.device("meta") in devices else "split over devices"
        raise WeightsElsewhere(f"DiT / vocoder weights {why}: {sorted(map(str, devices))}")
    return fused, key


def _graph_cache(dit, vocoder, shared: ReplayGuard, device, weights: tuple) -> _GraphCache:
    """The DiT's graph cache for mel-only (``vocoder`` None) or mel + waveform graphs, emptied when the weights
    changed (after ``shared.drain``: another stream's replay may still read the graphs' buffers); fuses the DiT's
    weights first where it can. ``weights``: :func:`_resident_weights` (taken before the fusing, retaken when it
    rebound the parameters to fused slices: on first use, or after ``.to()`` / reassigned parameters)."""
    fused, weights = weights
    if dit_layers.fusable(dit) and dit_layers.fuse_weights(dit) is not fused:  # (before any capture)
        weights = weights_key(dit) if vocoder is None else weights_key(dit, vocoder)
    # (mel-only and mel + waveform graphs in separate caches: alternating calls must not drop each other's)
    cache = dit.__dict__.setdefault(_CACHE if vocoder is None else _CACHE + "_wave", _GraphCache())
    if cache.get("weights") != weights:  # graphs read the weights by address: stale after .to() / reload
        shared.drain(device)
        cache.clear()
        cache["weights"] = weights
    return cache


def sample(dit, conditioning, reference_mel, code, num_steps: int = 10, guidance_scale: float = 0.5,
           sway_coefficient=-1.0, *, buckets=CODE_BUCKETS, backend: str | None = None) -> torch.Tensor:
    """``Qwen2_5OmniToken2WavDiTModel.sample`` on a per-bucket graph: conditioning ``[B, enc_emb_dim]``,
    reference_mel ``[B, T_ref, mel_dim]``, code long ``[B, n]`` -> mel ``[B, mel_dim, n * repeats]`` (the same noise
    as transformers for a given seed: drawn by the same ``torch.randn`` call)."""
    return _solve(dit, conditioning, reference_mel, code, num_steps, guidance_scale, sway_coefficient, buckets,
                  backend)[0].permute(0, 2, 1)


def synthesize(dit, vocoder, conditioning, reference_mel, code, num_steps: int = 10, guidance_scale: float = 0.5,
               sway_coefficient=-1.0, *, buckets=CODE_BUCKETS, backend: str | None = None) -> torch.Tensor:
    """``Qwen2_5OmniToken2WavModel.forward`` (the DiT solve, then the BigVGAN ``vocoder``) with BOTH in one graph
    per bucket: the vocoder runs on the padded mel with the device-side length
    (:func:`omni_fast.models.bigvgan_padded.vocode`). Arguments as :func:`sample`; returns the waveform ``[B, n *
    repeats * prod(upsample_rates)]`` on the device (transformers: ``.squeeze().cpu()`` of it)."""
    if not bigvgan_padded.supported(vocoder):
        raise ValueError("vocoder: this BigVGAN variant is not covered by the padded vocoder")
    return _solve(dit, conditioning, reference_mel, code, num_steps, guidance_scale, sway_coefficient, buckets,
                  backend, vocoder)[1]
