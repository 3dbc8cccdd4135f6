"""A thin streaming Qwen2.5-Omni pipeline on transformers' modules, patched with omni-fast kernels.

The same scheduler as :class:`omni_fast.models.Qwen3Omni` (:mod:`omni_fast.pipeline.scheduler`) over the
Qwen2.5-Omni stage adapter (:class:`omni_fast.pipeline.qwen25.Qwen25Stages`): thinker -> talker (one codec token per
step, started as soon as the thinker's first two tokens exist) -> Token2Wav. Same public API as ``Qwen3Omni``
(``stream``, ``generate``, ``set_patched``, ``random``, ``from_pretrained``); semantics are transformers'
``Qwen2_5OmniForConditionalGeneration.generate`` (greedy: the same text ids, codes and waveform,
``tests/test_pipeline_qwen25.py``). Voices are the model's ``speaker_map`` (``spk_dict.pt`` of a checkpoint: per
name the talker's text BOS id, the DiT's conditioning vector and reference mel).
"""

from __future__ import annotations

import os

import torch

from ..pipeline.qwen25 import Qwen25Stages
from ..pipeline.requests import ByteTokenizer, make_sampler
from ..validation import check_device
from .qwen3_omni import Qwen3Omni, check_pipeline_model


class Qwen25Omni:
    """Thinker -> talker -> Token2Wav for a transformers ``Qwen2_5OmniForConditionalGeneration``.

    ``patch``: swap omni-fast kernels in with :func:`omni_fast.patch` (``backend`` pins their backend; the talker's
    decode then runs on omni-fast's decoder). ``speakers``: name -> ``{"bos_token", "cond", "ref_mel"}`` (default:
    the model's ``speaker_map``). ``token2wav_steps``: the DiT's ODE steps (transformers' default 10).
    """

    def __init__(self, model, *, patch: bool = True, backend: str | None = None, tokenizer=None,
                 speakers: dict | None = None, token2wav_steps: int = 10):
        from ..validation import check_positive_int

        model = check_pipeline_model(model, "Qwen2_5OmniForConditionalGeneration")
        self.model = model.eval()
        self.config = model.config
        self.device = next(model.parameters()).device
        self.backend, self.tokenizer = backend, tokenizer
        self._decoders: dict[str, tuple] = {}
        self.token2wav_steps = check_positive_int("token2wav_steps", token2wav_steps)
        self.has_talker = bool(getattr(model, "has_talker", False)) and hasattr(model, "talker")
        self.speakers = dict(model.speaker_map if speakers is None else speakers)
        if self.has_talker:
            check_speakers(self.speakers, self.config.token2wav_config.dit_config)
        eos = getattr(model.thinker.generation_config, "eos_token_id", None)
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        vocab = self.config.thinker_config.text_config.vocab_size
        from ..pipeline.qwen25 import chat_ids

        self.text_eos = int(eos) if eos is not None and 0 <= int(eos) < vocab else chat_ids(vocab)["im_end"]
        self.newline_id = next(iter(tokenizer.encode("\n")), None) if tokenizer is not None else None
        self.patch_report = None
        if patch:
            self.set_patched(True)

    def set_patched(self, patched: bool) -> None:
        """Run on omni-fast (:func:`omni_fast.patch`) or on transformers' modules as they are (``unpatch``)."""
        import omni_fast

        model = self.model
        if patched and not model.__dict__.get("_omni_fast_patched", False):
            self.patch_report = omni_fast.patch(model, backend=self.backend)
        elif not patched and model.__dict__.get("_omni_fast_patched", False):
            omni_fast.unpatch(model)

    def stages(self) -> Qwen25Stages:
        return Qwen25Stages(self)

    @staticmethod
    def samplers(opts, generator: torch.Generator):
        """(text, codec, frame) samplers: greedy, or transformers' defaults when sampling (thinker top-k 50; talker
        top-k 40, top-p 0.8 at temperature 0.9). One codebook: no frame sampler."""
        return (make_sampler(opts.do_sample, top_k=50, generator=generator),
                make_sampler(opts.talker_do_sample, top_k=40, top_p=0.8, temperature=0.9, generator=generator), None)

    stream = Qwen3Omni.stream  # the same options and validation; the scheduler runs self.stages()
    generate = Qwen3Omni.generate

    # ---------------------------------------------------------------------------------------------- construction
    @classmethod
    def random(cls, preset: str = "tiny", *, device: str | torch.device | None = None, seed: int = 0,
               **kwargs) -> "Qwen25Omni":
        """The tiny random Qwen2.5-Omni (fp32, ~0.3M parameters; :func:`~omni_fast.models.presets.
        tiny_qwen2_5_omni_config`) with two random voices, ``chelsie`` and ``ethan``."""
        from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as q25

        from .presets import TINY_TEXT_VOCAB, tiny_qwen2_5_omni_config

        if preset != "tiny":
            raise ValueError(f"preset must be 'tiny' (the Qwen2.5-Omni pipeline has no full random preset), got "
                             f"{preset!r}")
        device = check_device("device", "cpu" if device is None else device)  # (0 is cuda:0, not "none")
        config = tiny_qwen2_5_omni_config()
        torch.manual_seed(seed)
        with torch.device(device):
            model = q25.Qwen2_5OmniForConditionalGeneration._from_config(config, dtype=torch.float32)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():  # token2wav smaller: BigVGAN stays inside its clamp
                if "norm" not in name:
                    scale = 0.05 if name.startswith("token2wav") else 0.2
                    p.copy_((torch.randn(p.shape, generator=gen) * scale).to(p.device))
        dit = config.token2wav_config.dit_config
        kwargs.setdefault("speakers", {name: {"bos_token": config.talker_config.tts_text_start_token_id,
                                              "cond": torch.randn(dit.enc_emb_dim, generator=gen),
                                              "ref_mel": torch.randn(10, dit.mel_dim, generator=gen)}
                                       for name in ("Chelsie", "Ethan")})
        kwargs.setdefault("tokenizer", ByteTokenizer(TINY_TEXT_VOCAB - 32))
        return cls(model, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, **kwargs) -> "Qwen25Omni":
        """A local transformers-format checkpoint directory (config.json, weights, ``spk_dict.pt`` for the voices);
        nothing is fetched (``local_files_only``). A tokenizer in the directory is loaded when present."""
        from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as q25

        from .checkpoint import checkpoint_dir

        path = checkpoint_dir(path)  # a str naming an existing directory
        device = check_device("device", device)  # before anything is read or built
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        speakers = kwargs.pop("speakers", None)
        if speakers is None and not os.path.isfile(os.path.join(path, "spk_dict.pt")):
            raise ValueError(f"path: {path} has no spk_dict.pt (the voices: name -> bos_token, cond, ref_mel); pass "
                             "speakers= to build the pipeline without it")
        cls_ = q25.Qwen2_5OmniForConditionalGeneration
        # with speakers= given, PreTrainedModel's loader (transformers' override insists on spk_dict.pt)
        loader = cls_.from_pretrained if speakers is None else super(cls_, cls_).from_pretrained
        model = loader(os.fspath(path), dtype=dtype, local_files_only=True)
        if hasattr(model, "token2wav"):
            model.token2wav.float()  # transformers runs Token2Wav in fp32
        model = model.to(device)
        if kwargs.get("tokenizer") is None:
            kwargs["tokenizer"] = _local_tokenizer(path)
        return cls(model, speakers=speakers, **kwargs)


def check_speakers(speakers: dict, dit) -> None:
    """Every voice has ``bos_token`` (int), ``cond`` ``[enc_emb_dim]`` and ``ref_mel`` ``[T, mel_dim]``."""
    if not speakers:
        raise ValueError("speakers: the model has no voices (load spk_dict.pt, or pass speakers=)")
    for name, s in speakers.items():
        where = f"speakers[{name!r}]"
        if not isinstance(s, dict) or not {"bos_token", "cond", "ref_mel"} <= set(s):
            raise ValueError(f"{where} must be a dict with bos_token, cond and ref_mel")
        cond, ref = torch.as_tensor(s["cond"]), torch.as_tensor(s["ref_mel"])
        if cond.reshape(-1).shape != (dit.enc_emb_dim,):
            raise ValueError(f"{where}['cond'] must hold {dit.enc_emb_dim} values (dit_config.enc_emb_dim), got "
                             f"shape {list(cond.shape)}")
        if ref.dim() != 2 or ref.shape[-1] != dit.mel_dim or ref.shape[0] < 1:
            raise ValueError(f"{where}['ref_mel'] must be [T, {dit.mel_dim}] (dit_config.mel_dim), got shape "
                             f"{list(ref.shape)}")


def _local_tokenizer(path):
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return tok if tok.encode("\n") else None
    except Exception:  # noqa: BLE001 - a weights-only directory: the caller passes token ids
        return None


__all__ = ["Qwen25Omni", "check_speakers"]
