"""Cost model of Code2Wav's fused SnakeBeta (docs/code2wav.md, "The fused SnakeBeta's cost model").

The implicit-GEMM conv kernel activates each input tile once per (row tile, tap): a conv activates
``ceil(rows / BLOCK_N) * taps * C_in * T_in`` elements instead of ``C_in * T_in``. This prints, per frame of a
config, the MACs and activated elements of every conv and the time each takes at the given rates, so a GPU
session can plug in measured rates::

    python -m omni_fast.bench.code2wav_snake_cost --mma 4e14 --act 3e12 --block-n 64 128

``--thresholds``: per SnakeBeta conv of a streaming push, the batch from which the kernels pre-activate the input
instead (omni_fast.kernels.code2wav_preact, its model and rates), and the predicted conv time of a push before
(always fused) and after (the choice) at the given batches and push lengths. Predicted from a model, not measured.
"""

from __future__ import annotations

import argparse
import math

from omni_fast.reference.code2wav import Code2WavConfig


def conv_costs(cfg: Code2WavConfig, block_n: int) -> list[tuple[str, int, int, int]]:
    """Per frame: (name, MACs, activated elements as fused now, activated elements once each) of every conv after
    the upsamplers (the ConvNeXt blocks have no SnakeBeta)."""
    rows = []

    def add(name, c_in, c_out, taps, t_in, t_out, snake, n_rows=None):
        n_rows = c_out if n_rows is None else n_rows
        bn = min(block_n, 32) if c_out == 1 else block_n  # the output conv uses the 32-row config
        fused = math.ceil(n_rows / bn) * taps * c_in * t_in if snake else 0
        rows.append((name, t_out * c_out * c_in * taps, fused, c_in * t_in if snake else 0))

    t = math.prod(cfg.upsampling_ratios)  # samples per frame after the upsamplers
    dim = cfg.decoder_dim
    add(f"decoder.0 {cfg.hidden_size}->{dim} k7", cfg.hidden_size, dim, 7, t, t, False)
    for i, r in enumerate(cfg.upsample_rates):
        out = dim // 2
        add(f"block{i + 1} convT {dim}->{out} k{2 * r}", dim, out, 2, t, t * r, True, n_rows=r * out)
        t *= r
        for d in (1, 3, 9):
            add(f"block{i + 1} unit d{d} k7 {out}", out, out, 7, t, t, True)
            add(f"block{i + 1} unit d{d} k1 {out}", out, out, 1, t, t, True)
        dim = out
    add(f"output {dim}->1 k7", dim, 1, 7, t, t, True)
    return rows


def conv_shapes(cfg: Code2WavConfig, frames: int) -> list[tuple[str, dict]]:
    """Per SnakeBeta conv of a streaming push of ``frames`` frames (states carried): the per-row shape arguments of
    :func:`omni_fast.kernels.code2wav_preact.predicted_times` (bf16)."""
    out = []
    t = frames * math.prod(cfg.upsampling_ratios)
    dim = cfg.decoder_dim
    for i, r in enumerate(cfg.upsample_rates):
        o = dim // 2
        out.append((f"block{i + 1} convT {dim}->{o} k{2 * r}", dict(c_in=dim, t_window=t + 1, taps=2, rows=r * o,
                                                                   weight_numel=dim * o * 2 * r, n_cols=t)))
        t *= r
        for d in (1, 3, 9):
            out.append((f"block{i + 1} unit d{d} k7 {o}", dict(c_in=o, t_window=t + 6 * d, taps=7, rows=o,
                                                              weight_numel=o * o * 7, n_cols=t)))
            out.append((f"block{i + 1} unit d{d} k1 {o}", dict(c_in=o, t_window=t, taps=1, rows=o,
                                                              weight_numel=o * o, n_cols=t)))
        dim = o
    out.append((f"output {dim}->1 k7", dict(c_in=dim, t_window=t + 6, taps=7, rows=1, weight_numel=dim * 7, n_cols=t)))
    return [(n, dict(sh, elt=2)) for n, sh in out]


def thresholds(batches=(1, 8, 32), frames=(1, 4)) -> None:
    from omni_fast.kernels import code2wav_preact as pre

    cfg = Code2WavConfig()
    for f in frames:
        shapes = conv_shapes(cfg, f)
        print(f"push of {f} frame(s), bf16 (predicted from a model, not measured):")
        for name, sh in shapes:
            th = pre.batch_threshold(**sh)
            print(f"  {name:<28} recompute x{pre.recompute_factor(sh['taps'], sh['rows']):4}   pre-activated from "
                  f"batch {th if th is not None else '- (always fused)'}")
        for b in batches:
            times = [pre.predicted_times(b, **sh) for _, sh in shapes]
            before = sum(t[0] for t in times)
            after = sum(min(t) for t in times)
            n = sum(t[1] < t[0] for t in times)
            print(f"  B={b:<3} SnakeBeta convs: fused {before * 1e6:8.1f} us -> {after * 1e6:8.1f} us "
                  f"({n} of {len(times)} pre-activated, +{n} launches)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mma", type=float, default=4e14, help="tensor-core MAC/s (default: 800 TFLOP/s bf16)")
    p.add_argument("--act", type=float, default=3e12, help="activated elements/s (MUFU sin + ~10-15 issue slots)")
    p.add_argument("--block-n", type=int, nargs="+", default=[64, 128])
    p.add_argument("--thresholds", action="store_true", help="pre-activation batch thresholds (module doc)")
    args = p.parse_args(argv)
    if args.thresholds:
        thresholds()
        return
    cfg = Code2WavConfig()
    for bn in args.block_n:
        rows = conv_costs(cfg, bn)
        macs, fused, once = (sum(r[i] for r in rows) for i in (1, 2, 3))
        print(f"BLOCK_N={bn}: per frame {macs / 1e9:.2f} G MACs ({macs / args.mma * 1e6:.2f} us), activated "
              f"{fused / 1e6:.1f} M ({fused / args.act * 1e6:.2f} us), once each {once / 1e6:.2f} M "
              f"({once / args.act * 1e6:.2f} us)")
        for name, m, f, o in rows:
            factor = f"{f / o:5.0f}" if o else "    -"
            print(f"  {name:<28} {m / 1e6:8.1f} M MACs {m / args.mma * 1e6:7.3f} us   activated {f / 1e6:6.2f} M "
                  f"{f / args.act * 1e6:7.3f} us   recompute x{factor}")


if __name__ == "__main__":
    main()
