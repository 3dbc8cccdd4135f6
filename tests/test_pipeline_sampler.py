"""The pipelines' host samplers (``pipeline.requests.make_sampler``: the text and codec samplers of Qwen3Omni and
Qwen25Omni's ``stream``) follow the project's NaN rule: a NaN logit is -inf, a row of only NaN / -inf gives id 0.
Before, greedy picked the NaN (``argmax``) and sampling raised in ``torch.multinomial`` (on CUDA: a device-side
assert that ends the process's CUDA context)."""

import pytest
import torch

from omni_fast.pipeline.requests import make_sampler

SETTINGS = [dict(top_k=50), dict(top_k=50, temperature=0.9), dict(top_k=50, top_p=0.8), dict(top_k=0, top_p=0.5)]


def _torch_chain(logits, top_k=50, top_p=1.0, temperature=1.0, generator=None):
    """The chain as it was (transformers' warpers, torch's multinomial): the rows without NaN must draw this."""
    logits = logits / max(temperature, 1e-5)
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        drop = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1) > top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_never_picks_a_nan(dtype):
    logits = torch.randn(3, 97, generator=torch.Generator().manual_seed(0)).to(dtype)
    logits[0, 5] = float("nan")
    logits[1] = float("nan")
    logits[2, :] = float("-inf")
    logits[2, 40] = float("nan")
    ids = make_sampler(False)(logits)
    want0 = logits[0].float().nan_to_num(float("-inf")).argmax()
    assert ids.tolist() == [int(want0), 0, 0]


@pytest.mark.parametrize("settings", SETTINGS)
def test_sampling_skips_nan_and_draws_as_before_elsewhere(settings):
    V = 211
    logits = 3 * torch.randn(4, V, generator=torch.Generator().manual_seed(1))
    before = _torch_chain(logits, **settings, generator=torch.Generator().manual_seed(7))
    after = make_sampler(True, **settings, generator=torch.Generator().manual_seed(7))(logits)
    assert torch.equal(before, after)  # no NaN: the same draws from the same generator

    poisoned = logits.clone()
    top = poisoned[1].argmax()
    poisoned[1, top] = float("nan")  # the likeliest id becomes NaN: never drawn
    poisoned[2] = float("nan")  # nothing left: id 0
    poisoned[3, :] = float("-inf")
    for seed in range(20):
        ids = make_sampler(True, **settings, generator=torch.Generator().manual_seed(seed))(poisoned)
        assert ids[1] != top and not torch.isnan(poisoned[1, ids[1]])
        assert ids[2] == 0 and ids[3] == 0
    assert not poisoned[0].isnan().any() and poisoned[2].isnan().all()  # the caller's logits untouched


def test_the_callers_logits_stay_untouched():
    logits = torch.randn(2, 33)
    logits[0, 3] = float("nan")
    kept = logits.clone()
    make_sampler(True, generator=torch.Generator().manual_seed(0))(logits)
    make_sampler(False)(logits)
    assert torch.equal(logits.isnan(), kept.isnan()) and torch.equal(logits.nan_to_num(), kept.nan_to_num())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("settings", SETTINGS)
def test_plus_inf_is_the_only_candidate_of_its_row(settings, dtype):
    """An fp16 overflow (+inf) made the whole softmax row NaN: torch.multinomial raised (CUDA: a device-side
    assert). Now a row draws among its +inf ids alone; the other rows as before."""
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(2)).to(dtype)
    logits[0, 9] = float("inf")
    logits[1, [4, 50]] = float("inf")
    seen = set()
    for seed in range(30):
        ids = make_sampler(True, **settings, generator=torch.Generator().manual_seed(seed))(logits)
        assert ids[0] == 9 and ids[1] in (4, 50)
        seen.add(int(ids[1]))
    assert seen == {4, 50} or settings.get("top_p", 1.0) < 1.0  # both drawn (top-p may keep the first alone)
    assert make_sampler(False)(logits)[:2].tolist() == [9, 4]
