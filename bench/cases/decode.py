"""One thinker / talker decode step (all layers + head) for a batch of B tokens, at the real layer shapes.

Providers (bf16, random weights, a prompt of ``PROMPT`` tokens already in the KV cache): ``transformers`` (the
text model's forward with its ``DynamicCache`` and padding mask, then the head: what the pipeline runs without
``graph_decode``; the new token is cropped off the cache after each call), ``eager``
(:class:`omni_fast.models.MoeTextDecoder`'s step body run op by op), ``omni_fast`` (the same step replayed as
one CUDA graph), ``fused`` (``MoeTextDecoder(fused=True)``: 3 phase-fused launches per layer, graph-replayed) and
``fused-pdl`` (the same, the phases chained by programmatic dependent launch: opt-in ``OMNI_FAST_PDL=1``).
Each omni-fast call rewinds the cache by one token, so every call decodes at the same length.
The thinker is trimmed to ``THINKER_LAYERS`` layers (1.16 GiB each; decode time is per-layer linear, plus the
0.6 GiB lm_head); the talker has all 20.

``bytes``: the weights one step must read (attention, router, the experts the batch touches in expectation,
``E * (1 - (1 - k/E) ** B)`` per layer, the shared expert, the head) + the KV cache read; ``flops``: 2 x the active
parameters x B.
"""

from __future__ import annotations

import torch

from omni_fast.bench.case import Case, Unavailable, dtype_name
from omni_fast.integrations.hf_compat import with_cache  # the cache keyword of the installed transformers

PROMPT = 512
THINKER_LAYERS = 4
# part -> (hidden, layers, q heads, kv heads, head_dim, experts, top_k, expert inter, shared inter, vocab)
SHAPES = {"thinker": (2048, THINKER_LAYERS, 32, 4, 128, 128, 8, 768, 0, 152064),
          "talker": (1024, 20, 16, 2, 128, 128, 6, 384, 768, 3072)}
# the tiny config's (omni_fast.models.presets.tiny_qwen3_omni_config: 2 layers, fp32) for the smoke preset
TINY_SHAPES = {"thinker": (32, 2, 2, 1, 16, 8, 2, 24, 0, 160), "talker": (32, 2, 2, 1, 16, 8, 2, 24, 40, 1088)}
PRESETS = {"quick": dict(tiny=False, prompt=PROMPT, batches=(1, 8)),
           "full": dict(tiny=False, prompt=PROMPT, batches=(1, 4, 8, 32)),
           "smoke": dict(tiny=True, prompt=6, batches=(1, 3))}


def _build(part: str, device, dtype=torch.bfloat16, layers: int | None = None, tiny: bool = False):
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as q3

    from omni_fast.models.presets import full_qwen3_omni_config, tiny_qwen3_omni_config

    cfg = tiny_qwen3_omni_config() if tiny else full_qwen3_omni_config(thinker_layers=layers or THINKER_LAYERS)
    text = cfg.thinker_config.text_config if part == "thinker" else cfg.talker_config.text_config
    cls = q3.Qwen3OmniMoeThinkerTextModel if part == "thinker" else q3.Qwen3OmniMoeTalkerModel
    torch.manual_seed(0)
    with torch.device(device):
        m = cls._from_config(text, dtype=dtype).eval()
        head = torch.nn.Linear(text.hidden_size, text.vocab_size, bias=False, dtype=dtype)
    if tiny:
        from omni_fast.testing import randomize_

        randomize_(m, head)
    return m, head


def _prefill(m, B: int, S: int):
    """transformers' prefill of a left-padded batch (row i is i tokens shorter, capped at half the prompt)."""
    from transformers import DynamicCache

    dev, dt = m.norm.weight.device, m.norm.weight.dtype
    mask = torch.ones(B, S, dtype=torch.long, device=dev)
    for i in range(B):
        mask[i, :min(i, S // 2)] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)[None].expand(3, B, S)
    cache = DynamicCache(config=m.config)
    with torch.no_grad():
        m(inputs_embeds=torch.randn(B, S, m.config.hidden_size, device=dev, dtype=dt), attention_mask=mask,
          position_ids=pos, **with_cache(cache, use_cache=True))
    return cache, mask, pos[:, :, -1] + 1


def _setup(part: str, B: int, tiny: bool = False, prompt: int = PROMPT):
    def setup(device: torch.device):
        from omni_fast.models import MoeTextDecoder

        m, head = _build(part, device, torch.float32 if tiny else torch.bfloat16, tiny=tiny)
        cache, mask, nxt = _prefill(m, B, prompt)
        x = torch.randn(B, m.config.hidden_size, device=device, dtype=m.norm.weight.dtype)
        full_mask = torch.cat([mask, mask.new_ones(B, 1)], 1)

        @torch.no_grad()
        def hf():
            o = m(inputs_embeds=x[:, None], attention_mask=full_mask, position_ids=nxt[:, :, None],
                  **with_cache(cache, use_cache=True))
            cache.crop(-1)  # back to the prompt (a negative count drops tokens in every transformers version)
            return head(o.last_hidden_state[:, -1])

        def provider(use_graph: bool, fused: bool = False, pdl: bool = False):
            from omni_fast import fast_paths

            dec = MoeTextDecoder.from_transformers(m, head, fused=fused)
            with fast_paths.enable("fused_pdl", pdl):  # read when load_prefill captures
                dec.load_prefill(cache, mask, max_new_tokens=8, use_graph=use_graph)

            def step():
                out = dec.step(x, nxt[0])
                dec.rewind(1)
                return out

            return step

        graph = device.type == "cuda"
        no_graph = Unavailable("CUDA-graph replay needs CUDA")
        return {"transformers": hf, "eager": provider(False),
                "omni_fast": provider(True) if graph else no_graph,
                # the phase-fused step (3 launches per layer), graph-replayed
                "fused": provider(True, fused=True) if graph else no_graph,
                # the same with programmatic dependent launch between the phases (opt-in, sm_90+)
                "fused-pdl": provider(True, fused=True, pdl=True) if graph else no_graph}

    return setup


def _bytes_flops(part: str, B: int, tiny: bool = False, prompt: int = PROMPT) -> tuple[float, float]:
    """(bytes, flops) of one step; bytes at 2 per element (bf16; 4 for the fp32 tiny config)."""
    H, L, nq, nk, d, E, k, inter, shared, V = (TINY_SHAPES if tiny else SHAPES)[part]
    elem = 4.0 if tiny else 2.0
    attn = (nq + 2 * nk) * d * H + nq * d * H
    expert = 3 * inter * H
    touched = E * (1 - (1 - k / E) ** B)
    per_layer_read = attn + E * H + touched * expert + 3 * shared * H + (H if shared else 0)
    per_layer_active = attn + E * H + k * expert + 3 * shared * H
    kv = L * 2 * nk * d * prompt * B
    return elem * (L * per_layer_read + V * H) + elem * kv, 2.0 * B * (L * per_layer_active + V * H)


def _check():
    """Tiny configs on the CPU: the Triton step equals transformers' text-model step (fp32)."""
    from omni_fast.models import MoeTextDecoder

    for part in ("thinker", "talker"):
        m, head = _build(part, "cpu", torch.float32, tiny=True)
        cache, mask, nxt = _prefill(m, 2, 6)
        dec = MoeTextDecoder.from_transformers(m, head, backend="triton")
        dec.load_prefill(cache, mask, max_new_tokens=1)
        x = torch.randn(2, m.config.hidden_size)
        got, _ = dec.step(x, nxt[0])
        with torch.no_grad():
            o = m(inputs_embeds=x[:, None], attention_mask=torch.cat([mask, mask.new_ones(2, 1)], 1),
                  position_ids=nxt[:, :, None], **with_cache(cache, use_cache=True))
            want = head(o.last_hidden_state[:, -1])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


def cases(preset: str) -> list[Case]:
    """The benchmark cases of one decode step of the talker then the thinker per batch B of ``preset`` (bf16 real
    shapes; smoke: fp32, tiny)."""
    p = PRESETS[preset]
    tiny, prompt, batches = p["tiny"], p["prompt"], p["batches"]
    out = []
    for part in ("talker", "thinker"):  # the talker first: a deadline-cut run (the first-light box) keeps it
        H, L, *_ = (TINY_SHAPES if tiny else SHAPES)[part]
        for B in batches:
            nbytes, flops = _bytes_flops(part, B, tiny, prompt)
            out.append(Case(op="decode", name=f"{part} step B={B}",
                            params=dict(part=part, B=B, layers=L, hidden=H, prompt=prompt,
                                        dtype=dtype_name(torch.float32 if tiny else torch.bfloat16)),
                            setup=_setup(part, B, tiny, prompt), flops=flops, bytes=nbytes, bound="memory",
                            check=_check if (part, B) == ("thinker", batches[0]) else None, tags=("decode",)))
    return out
