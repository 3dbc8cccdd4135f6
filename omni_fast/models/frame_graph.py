"""The CUDA graph of one MTP frame of :class:`omni_fast.models.CodePredictor` for a batch bucket (moved out of
``code_predictor.py``, which keeps the lookup: ``CodePredictor._graph_frame``). Built and replayed inside
``predict_frame``'s ``on_device`` block and the predictor's :class:`~omni_fast.models.cuda_graphs.ReplayGuard` hold:
the capture, the replays and the persistent flag's event records all run on the model's device."""

from __future__ import annotations

import torch

from .cuda_graphs import ModelRef, capture


class FrameGraph:
    """One captured frame for a batch bucket: static inputs, one ``torch.cuda.CUDAGraph``, static outputs.

    ``model``: the :class:`~omni_fast.models.CodePredictor`; ``x`` ``[bucket, H]`` (``dtype``), ``c0`` int64
    ``[bucket]``, ``c0_embed`` ``[bucket, H]`` or None, ``seed`` int64 ``[bucket]`` (per row) or ``[1]``; outputs
    ``codes`` int64 ``[bucket, G]`` and ``next_input`` ``[bucket, H]``. On a CPU the replay is emulated eagerly."""

    def __init__(self, model, bucket: int, device, dtype, embed_c0: bool, sampling, fused: bool,
                 per_row: bool):
        H = model.config.hidden_size
        self.bucket = bucket
        self.x = torch.zeros(bucket, H, device=device, dtype=dtype)
        self.c0 = torch.zeros(bucket, dtype=torch.long, device=device)
        self.c0_embed = None if embed_c0 else torch.zeros(bucket, H, device=device, dtype=dtype)
        # Per-row seeds [bucket], or one shared seed [1] (row i of the bucket keeps RNG row index i, so padding does
        # not change the real rows' draws). The ops resolve the ambient backend (predict_frame's use_backend block).
        self.seed = torch.zeros(bucket if per_row else 1, dtype=torch.long, device=device)
        self.model, self.sampling, self.fused = ModelRef(model, "CodePredictor"), sampling, fused  # weak: no cycle
        model._last_persistent = None
        # No CUDA: emulated replay (the frame run eagerly on the same static buffers: the CPU tests cover the bucket
        # logic). On CUDA the capture's warm-up compiles the kernels and fills the constant caches.
        if torch.device(device).type != "cuda":
            self.graph, (self.codes, self.next_input) = None, self._run()
        else:
            self.graph, (self.codes, self.next_input) = capture(self._run, device)
        # The persistent frame the body launched (None on the graph-of-kernels path): a replay runs no Python, so
        # run() does the frame's watchdog check and records its flag copy around each replay.
        self.watched = model.__dict__.pop("_last_persistent", None)

    def _run(self):  # the frame body on the static buffers: what the graph captures
        return self.model.get().frame(self.x, self.c0, self.c0_embed, self.seed, self.sampling, None, self.fused)

    def run(self, x, c0, c0_embed, seed):
        self.model.get()  # a ReferenceError, not a replay over freed weights, for a graph kept past its predictor
        if self.graph is not None and self.watched is not None:
            self.watched.check()  # PersistentError once an earlier replay's (or eager call's) trip has landed
        B = x.shape[0]
        self.x[:B].copy_(x)
        self.c0[:B].copy_(c0)
        if self.c0_embed is not None:
            self.c0_embed[:B].copy_(c0_embed)
        if isinstance(seed, torch.Tensor):
            self.seed[:B].copy_(seed)
        else:
            self.seed.fill_(int(seed))
        if self.graph is None:
            for static, new in zip((self.codes, self.next_input), self._run()):
                static.copy_(new)
        else:
            self.graph.replay()
            if self.watched is not None:
                self.watched.watch.record()  # the flag's copy + event after the replay: no sync, no allocation
        return self.codes[:B].clone(), self.next_input[:B].clone()
