"""No same-name trap (issue 14): a public function of ``omni_fast.ops`` that carries a peer's name (FlashAttention-2,
vLLM) takes the peer's call exactly, as fixed by the signatures of :mod:`omni_fast.compat` (whose own signature
tests, ``tests/test_compat_*.py::test_signature_*``, fix them against the peers' sources).

Rule checked here for every such name: the peer's positional-or-keyword parameters are ours, in the same order with
the same defaults; the peer's keyword-only parameters are ours too; anything we add is keyword-only with a default.
So every call written for the peer binds the same way here. vLLM's names are the very objects of
``omni_fast.compat.vllm``.
"""

import inspect
import types

import pytest
import torch

from omni_fast import ops
from omni_fast.compat import flash_attn as cfa
from omni_fast.compat import vllm as cvllm

P = inspect.Parameter
PEERS = {"flash_attn": cfa, "vllm": cvllm}

# Peer names with no compat function (yet): ops must not carry them at all. vLLM's ``fused_moe(hidden_states, w1,
# w2, gating_output, topk, renormalize, ...)`` (dropped in vLLM 0.11) and its other routers (read in vLLM's
# ``fused_moe.py``); FlashAttention's rotary helper (``flash_attn.layers.rotary``).
PEER_NAMES_NOT_SHIPPED = {
    "vllm": ["fused_moe", "grouped_topk", "fused_grouped_topk", "fused_topk_bias", "invoke_fused_moe_kernel"],
    "flash_attn": ["apply_rotary_emb"],
}


def _peer_functions(module) -> dict:
    return {n: getattr(module, n) for n in module.__all__ if callable(getattr(module, n))}


def _ops_public_functions() -> dict:
    """Every public callable reachable as ``omni_fast.ops.<name>`` (``__all__`` and anything else imported)."""
    names = set(ops.__all__) | {n for n in vars(ops) if not n.startswith("_")}
    out = {}
    for n in names:
        obj = getattr(ops, n)
        if callable(obj) and not isinstance(obj, (types.ModuleType, type)):
            out[n] = obj
    return out


def _shared_names():
    fns = _ops_public_functions()
    return [(peer, n) for peer, mod in PEERS.items() for n in _peer_functions(mod) if n in fns]


def test_the_shared_names_are_the_expected_ones():
    # a new ops function with a peer's name must be added knowingly (and then pass the rule below)
    assert sorted(n for _, n in _shared_names()) == ["flash_attn_with_kvcache", "moe_align_block_size",
                                                        "topk_softmax"]


@pytest.mark.parametrize("peer,name", _shared_names())
def test_ops_function_with_a_peer_name_has_the_peer_signature(peer, name):
    ours = inspect.signature(getattr(ops, name)).parameters
    theirs = inspect.signature(getattr(PEERS[peer], name)).parameters
    positional = [(p.name, p.default) for p in ours.values() if p.kind == P.POSITIONAL_OR_KEYWORD]
    assert positional == [(p.name, p.default) for p in theirs.values() if p.kind == P.POSITIONAL_OR_KEYWORD]
    assert not any(p.kind in (P.POSITIONAL_ONLY, P.VAR_POSITIONAL) for p in ours.values())
    for p in theirs.values():
        if p.kind == P.KEYWORD_ONLY:
            assert p.name in ours and ours[p.name].kind == P.KEYWORD_ONLY and ours[p.name].default == p.default
    extra = [p for p in ours.values() if p.name not in theirs]
    assert all(p.kind == P.KEYWORD_ONLY and p.default is not P.empty for p in extra), extra


@pytest.mark.parametrize("name", ["topk_softmax", "moe_align_block_size"])
def test_vllm_names_are_the_compat_objects(name):
    assert getattr(ops, name) is getattr(cvllm, name)


@pytest.mark.parametrize("peer,name", [(p, n) for p, ns in PEER_NAMES_NOT_SHIPPED.items() for n in ns])
def test_peer_names_without_compat_function_are_absent(peer, name):
    assert name not in _ops_public_functions()
    assert name not in _peer_functions(PEERS[peer])  # else it belongs in the rule above, not here


def test_native_moe_names_are_no_peer_names():
    peer_names = {n for mod in PEERS.values() for n in _peer_functions(mod)}
    peer_names |= {n for ns in PEER_NAMES_NOT_SHIPPED.values() for n in ns}
    for name in ("route_topk", "align_moe_blocks", "moe_experts", "moe_block", "flash_attn_varlen"):
        assert callable(getattr(ops, name)) and name not in peer_names


def test_old_fused_moe_name_raises_with_the_new_name():
    with pytest.raises(AttributeError, match="moe_experts"):
        ops.fused_moe  # noqa: B018
    assert not hasattr(ops, "fused_moe")


def test_vllm_call_forms_on_ops():
    """The calls vLLM users write: out-parameter routing with vLLM's default ``renormalize=False``, alignment with
    vLLM's length and sentinels (padding = numel, unused blocks -1, as vLLM 0.34)."""
    torch.manual_seed(0)
    logits = torch.randn(5, 8)
    w, ids, tei = torch.empty(5, 2), torch.empty(5, 2, dtype=torch.int32), torch.empty(5, 2, dtype=torch.int32)
    assert ops.topk_softmax(w, ids, tei, logits) is None
    probs = logits.softmax(-1)
    top = probs.topk(2, dim=-1)
    torch.testing.assert_close(w, top.values)  # not renormalised
    assert torch.equal(ids.long(), top.indices)
    assert torch.equal(tei, torch.arange(10, dtype=torch.int32).view(2, 5).t())
    E, bs = 8, 4
    sorted_ids, expert_ids, npost = ops.moe_align_block_size(ids, bs, E)
    assert sorted_ids.numel() == ids.numel() + E * (bs - 1)
    assert expert_ids.numel() == -(-sorted_ids.numel() // bs)
    n = int(npost)
    assert torch.all(sorted_ids[:n][sorted_ids[:n] != ids.numel()] < ids.numel())
    assert torch.all(expert_ids[n // bs:] == -1)
    # the native forms: tuple return, renormalised by default; also -1 for unused blocks (whole blocks long)
    w2, i2 = ops.route_topk(logits, 2)
    torch.testing.assert_close(w2, top.values / top.values.sum(-1, keepdim=True))
    _, e2, _ = ops.align_moe_blocks(ids, bs, E)
    assert torch.all(e2[n // bs:] == -1)
