"""Qwen2.5-Omni BigVGAN (Token2Wav's mel -> waveform) on a PADDED batch with device-side lengths: the form that can
run inside the DiT solve's CUDA graph (one graph per length bucket, :mod:`omni_fast.models.dit_solve`).

transformers' ``Qwen2_5OmniToken2WavBigVGANModel.forward`` sees exactly the real mel. On a bucket of ``S >= L``
frames the padding would leak into the real samples at every padding boundary; here each boundary gets the real
length of its scale (``lens * prod(rates so far)``, a device tensor: no host sync):

- zero padding (``conv_pre``, the upsamplers' transposed convs, the AMP blocks' convs, ``conv_post``): the input past
  the real end is zero. The anti-aliased activations write zeros there themselves (``seq_lens``); the inputs of
  ``conv_pre`` and of each upsampler (the mel padding, the AMP blocks' sums) are masked, one ``where`` each;
- replicate padding (the anti-aliased activations' up / down FIRs): :func:`omni_fast.ops.anti_aliased_snake` with
  ``seq_lens`` replicates the last REAL sample.

The upsamplers (``k = 2s`` or ``2s + 1``, ``p = (k - s) // 2``) output exactly ``s`` samples per input, so the
lengths per scale are exact. Samples ``t < lens[b] * prod(rates)`` equal transformers' forward on the unpadded row
(up to summation order); the clamp and the output stay on the device (transformers ends in ``.squeeze().cpu()``).
"""

from __future__ import annotations

import math

import torch

from ..integrations.token2wav import aa_activation_supported, amp_block_supported
from ..validation import check_tensor


def supported(bigvgan) -> bool:
    """Whether every activation is the anti-aliased SnakeBeta the length-aware op covers (transformers': yes) and
    the upsamplers keep exact length ratios."""
    acts = [bigvgan.activation_post] + [a for blk in bigvgan.resblocks for a in blk.activations]
    ups = [u[0] for u in bigvgan.ups]
    return all(aa_activation_supported(a) for a in acts) and all(
        u.kernel_size[0] - u.stride[0] in (u.stride[0], u.stride[0] + 1) and (u.kernel_size[0] - u.stride[0]) % 2 == 0
        and u.padding[0] == (u.kernel_size[0] -
        u.stride[0]) // 2 and u.output_padding[0] == 0 and u.dilation[0] == 1 for u in ups)


def _masked(x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """x ``[B, C, T]`` with the samples at or past ``n[b]`` zeroed (the zero padding of the next conv)."""
    keep = torch.arange(x.shape[-1], device=x.device)[None, None, :] < n[:, None, None]
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _activation(module, x, n, backend):
    from .. import ops

    act = module.act
    return ops.anti_aliased_snake(x, act.alpha.detach(), act.beta.detach(), module.upsample.filter.float(),
                                  module.downsample.filter.float(), ratio=int(module.upsample.ratio), seq_lens=n,
                                  backend=backend)


def _amp_block(block, x, n, backend):
    """``Qwen2_5OmniAMPBlock`` with length-aware activations (its convs as the patched block runs them)."""
    from .. import ops

    fast = amp_block_supported(block)
    for conv1, conv2, act1, act2 in zip(block.convs1, block.convs2, block.activations[::2], block.activations[1::2]):
        a = _activation(act1, x, n, backend)
        h = ops.padded_conv1d(a, conv1.weight, conv1.bias, padding=conv1.padding[0], dilation=conv1.dilation[0],
                              backend=backend) if fast else conv1(a)
        a = _activation(act2, h, n, backend)
        x = ops.padded_conv1d(a, conv2.weight, conv2.bias, padding=conv2.padding[0], dilation=conv2.dilation[0],
                              residual=x, backend=backend) if fast else x + conv2(a)
    return x


def vocode(bigvgan, mel: torch.Tensor, lens: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """``Qwen2_5OmniToken2WavBigVGANModel.forward`` on a padded batch: mel ``[B, mel_dim, S]`` (frames at or past
    ``lens[b]`` are ignored), lens int ``[B]`` on mel's device (real frames, ``1 <= lens[b] <= S``) -> waveform
    ``[B, S * prod(upsample_rates)]`` on mel's device, samples ``< lens[b] * prod(rates)`` the unpadded row's."""
    check_tensor("mel", mel, ndim=3, shape=(None, bigvgan.config.mel_dim, None))
    check_tensor("lens", lens, dtypes=(torch.int32, torch.int64), shape=(mel.shape[0],), device=mel.device)
    if not supported(bigvgan):
        raise ValueError("this BigVGAN variant has activations / upsamplers the padded vocoder does not cover")
    n = lens.to(torch.int64)
    x = bigvgan.conv_pre(_masked(bigvgan.process_mel_spectrogram(mel), n))
    blocks = bigvgan.num_residual_blocks
    for i, up in enumerate(bigvgan.ups):
        x = up[0](_masked(x, n))
        n = n * up[0].stride[0]
        x = sum(_amp_block(bigvgan.resblocks[i * blocks + j], x, n, backend) for j in range(blocks)) / blocks
    x = bigvgan.conv_post(_activation(bigvgan.activation_post, x, n, backend))
    return torch.clamp(x, min=-1.0, max=1.0)[:, 0]


def samples_per_frame(bigvgan) -> int:
    """Output waveform samples per mel frame of ``bigvgan``: the product of its upsampling strides."""
    return math.prod(int(u[0].stride[0]) for u in bigvgan.ups)
