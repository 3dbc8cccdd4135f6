"""A server that runs for days (docs/reliability.md, "Long-running servers: what is kept"): every cache the library
keeps between calls is bounded where requests pick its keys, and nothing keeps a dropped model (or its graphs and
buffers) alive. "Freed without gc" means by reference counting alone, the moment the last reference goes: objects
in a reference cycle wait for Python's cyclic collector, which runs on Python allocation counts and knows nothing
about GPU memory (a dropped checkpoint's weights and CUDA graphs could stay for hours). On the CPU the graph caches
emulate their replays (the same cache entries, static buffers and bound objects), so they are tested here."""

import gc
import sys
import weakref
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))

import omni_fast  # noqa: E402
from omni_fast.models import CodePredictor, Qwen3Omni, dit_solve  # noqa: E402
from omni_fast.models.persistent import PersistentFrame  # noqa: E402
from omni_fast.pipeline.requests import Request  # noqa: E402

GREEDY = dict(max_new_tokens=4, talker_max_new_tokens=6)


@contextmanager
def no_gc():
    """Only reference counting frees objects inside (a collection left over from earlier tests runs first)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _freed(make):
    """Whether the object ``make()`` returns (after using it) is freed by reference counting alone once dropped."""
    with no_gc():
        ref = weakref.ref(make())
        return ref() is None


# --- dropped models: no reference cycles through the graph caches -------------------------------------------------


def test_code_predictor_with_frame_graphs_freed_without_gc():
    """A frame graph's body was a closure over the CodePredictor that caches the graph: a cycle, so a dropped
    predictor (its weight copies, static buffers and, on CUDA, graphs) waited for a full collection."""
    from test_mtp import _hf_predictor

    m, emb = _hf_predictor(1, torch.float32, seed=4)

    def make():
        cp = CodePredictor.from_transformers(m, emb)
        h, c0 = torch.randn(3, 48), torch.randint(0, emb.num_embeddings, (3,))
        for kw in (dict(do_sample=False), dict(seed=5)):
            cp.predict_frame(h, c0, use_graph=True, backend="reference", **kw)
        assert len(cp._graphs) == 2
        return cp

    assert _freed(make)


def test_persistent_frame_does_not_keep_its_model():
    """A persistent frame (cached in its CodePredictor's ``_persistent``) held the predictor strongly: a cycle."""
    from omni_fast.bench.cases.mtp import _build
    from test_persistent import SMALL

    parts = _build("cpu", torch.float32, SMALL)

    def make():
        cp = CodePredictor.from_transformers(*parts, persistent=True)
        frame = PersistentFrame(cp, 2, torch.float32, torch.device("cpu"), (False, 0, 1.0, 1.0), False, False)
        assert frame.model is cp
        cp._persistent["k"] = frame
        return cp

    assert _freed(make)


def _dit_inputs(dit, n=3, B=1):
    from test_dit_solve import _inputs

    return _inputs(dit, B, n)


def test_dit_with_solve_graphs_freed_without_gc():
    """A solve graph's body was a closure over the DiT (and the graph itself) cached on the DiT: a cycle that kept a
    dropped Qwen2.5-Omni's DiT weights, graphs and shared pool until a full collection."""
    from test_dit_solve import _dit

    def make():
        dit = _dit()
        cond, ref, code = _dit_inputs(dit)
        with torch.no_grad():
            dit_solve.sample(dit, cond, ref, code, num_steps=2, buckets=(4,), backend="reference")
        assert len(dit.__dict__[dit_solve._CACHE]) == 2  # the weights key and one graph
        return dit

    assert _freed(make)


def test_patched_model_generate_then_unpatch_freed_without_gc():
    """patch -> generate (fast MTP step, fast Code2Wav, decode takeover) -> unpatch -> del: nothing the library
    keeps (caches on the modules, module-level caches, hooks) holds the model."""
    from test_patch import _generate, _prompt, q3, seeded_weights_, tiny_qwen3_omni_config

    def make():
        torch.manual_seed(0)
        model = seeded_weights_(q3.Qwen3OmniMoeForConditionalGeneration(tiny_qwen3_omni_config()))
        omni_fast.patch(model, backend="reference")
        _generate(model, _prompt())
        omni_fast.unpatch(model)
        return model

    assert _freed(make)


def test_abandoned_stream_releases_its_leases_at_once():
    """A client gone mid-stream: the generator dropped (or closed) frees its codec stream lease at once, and the
    pipeline and its model are freed by reference counting when dropped."""
    def make():
        pipe = Qwen3Omni.random("tiny", patch=True, backend="reference")
        req = Request(text=[5, 6, 7, 8, 9])

        def held():
            return [e[1]() is not None for e in pipe._codec_streams[1][1]]

        for finish in ("drop", "close"):
            gen = pipe.stream(req, **GREEDY, first_chunk=1, chunk=1)
            next(e for e in gen if e.kind == "audio")
            assert held() == [True]
            if finish == "close":
                gen.close()
            del gen
            assert held() == [False]
        model = pipe.model
        del pipe
        return model

    assert _freed(make)
