"""What the Token2Wav length bucket costs, predicted: ``python -m omni_fast.bench.costmodel.token2wav_padding``.

The DiT's ODE solve runs as one CUDA graph per length bucket (:mod:`omni_fast.models.dit_solve`): ``n`` codec tokens
are padded to the bucket's ``S`` (rounded up to whole 24-frame attention blocks), and every op of the solve (and of
the vocoder, when it runs in the same graph: ``dit_solve.synthesize``) computes the padding too. Per length this
prints the predicted H100 time of

- the solve (36 DiT forwards: 10 time points, RK4) at the bucket of the old rule (powers of two) and of today's
  (``dit_solve.CODE_BUCKETS``, four per octave), fp32 (transformers' math) and with the ``dit_tf32`` fast path;
- BigVGAN inside the graph on the padded bucket (the routed forward) vs eager on the real mel (the pipeline's
  Token2Wav, which runs the DiT's ``sample`` and then the vocoder).

Every number comes from :func:`.predict.predict` on the saved launch counts of the units ``dit-step-T500``,
``bigvgan-T500`` and ``bigvgan-padded-T500-S528`` (``bench/results/model/launch_counts.json``) with the FLOPs / bytes
of the real configs at each length (:func:`omni_fast.bench.cases.token2wav._dit_costs` / ``_bigvgan_macs``).
Predicted from a model, not measured.
"""

from __future__ import annotations

import argparse
import json
import math
import types
from pathlib import Path

from .predict import predict

COUNTS = Path(__file__).resolve().parents[1] / "results" / "model" / "launch_counts.json"
OLD_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)  # dit_solve.CODE_BUCKETS before four per octave
FORWARDS = 36  # DiT forwards per solve: (10 time points - 1) RK4 steps x 4
LENGTHS = (25, 50, 75, 100, 130, 200, 250, 300, 500, 750, 1000, 1500)  # codes (50 per second of audio)


def _configs():
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import (Qwen2_5OmniBigVGANConfig,
                                                                             Qwen2_5OmniDiTConfig)

    return Qwen2_5OmniDiTConfig(), Qwen2_5OmniBigVGANConfig()


def bucket_codes(n: int, buckets, dit) -> int:
    """The codes a solve of ``n`` codes computes under ``buckets`` (page-aligned as ``dit_solve`` does)."""
    from omni_fast.models import dit_solve

    blocks = types.SimpleNamespace(block_size=dit.block_size, repeats=dit.repeats)
    return dit_solve._page_aligned(dit_solve.bucket_for(n, buckets), blocks)


def dit_solve_s(frames: int, counts: dict, dit, math_: str) -> float:
    """Predicted seconds of one solve over ``frames`` mel frames (CFG: 2 rows)."""
    from omni_fast.bench.cases.token2wav import _dit_costs

    flops, weights = _dit_costs(dit, 2, frames)
    unit = dict(kernels={k: {"launches": v} for k, v in counts.items()}, mode="graph", math=math_, flops=flops,
                min_bytes=weights + 4.0 * 2 * frames * dit.mel_dim * 2, traced=False)
    return FORWARDS * predict(unit, {})["predicted_s"]


def vocoder_s(frames: int, counts: dict, voc, mode: str) -> float:
    """Predicted seconds of BigVGAN computing ``frames`` mel frames (``mode``: "graph" | "eager")."""
    from omni_fast.bench.cases.token2wav import _bigvgan_macs

    macs, weights = _bigvgan_macs(voc, frames)
    hop = math.prod(voc.upsample_rates)
    unit = dict(kernels={k: {"launches": v} for k, v in counts.items()}, mode=mode, math="fp32", flops=2.0 * macs,
                min_bytes=4.0 * (weights + frames * voc.mel_dim + frames * hop), traced=False)
    return predict(unit, {})["predicted_s"]


def rows(lengths=LENGTHS) -> list[dict]:
    """Per length (codes): the buckets and the predicted seconds of each variant."""
    from omni_fast.models import dit_solve

    dit, voc = _configs()
    saved = json.loads(COUNTS.read_text())
    step = saved["dit-step-T500"]["counts"]
    eager, padded = saved["bigvgan-T500"]["counts"], saved["bigvgan-padded-T500-S528"]["counts"]
    out = []
    for n in lengths:
        old, new = bucket_codes(n, OLD_BUCKETS, dit), bucket_codes(n, dit_solve.CODE_BUCKETS, dit)
        r = dict(codes=n, old=old, new=new)
        for m in ("fp32", "tf32"):
            r[f"dit_{m}_old"], r[f"dit_{m}_new"] = (dit_solve_s(b * dit.repeats, step, dit, m) for b in (old, new))
        r["voc_graph_old"] = vocoder_s(old * dit.repeats, padded, voc, "graph")
        r["voc_graph_new"] = vocoder_s(new * dit.repeats, padded, voc, "graph")
        r["voc_eager_real"] = vocoder_s(n * dit.repeats, eager, voc, "eager")
        out.append(r)
    return out


def vocoder_crossover(lo: int = 1, hi: int = 1500) -> dict:
    """Where BigVGAN in the graph (on the padded bucket) stops being predicted cheaper than eager on the real mel:
    ``max_graph_codes`` (the largest length the graph wins, ``lo .. hi`` codes; the pipeline's
    ``GRAPHED_VOCODER_MAX_CODES``) and ``eager_wins_above`` (whether eager wins at EVERY length above it up to
    ``hi``: a single crossover), with the two predicted times on either side."""
    table = rows(range(lo, hi + 1))
    graph = [r["codes"] for r in table if r["voc_graph_new"] < r["voc_eager_real"]]
    n = max(graph, default=lo - 1)
    side = {r["codes"]: (r["voc_graph_new"], r["voc_eager_real"]) for r in table if r["codes"] in (n, n + 1)}
    return dict(max_graph_codes=n, eager_wins_above=graph == list(range(lo, n + 1)), at=side)


def markdown(table: list[dict]) -> str:
    """The :func:`rows` table as markdown: per length in codes, the old / new bucket and the predicted DiT solve
    (fp32, tf32) and BigVGAN times in ms."""
    ms = lambda s: f"{s * 1e3:.1f}"  # noqa: E731
    lines = ["| codes (s of audio) | bucket old / new | DiT solve fp32 old / new (ms) | DiT solve tf32 old / new (ms) "
             "| BigVGAN in graph old / new (ms) | BigVGAN eager, real length (ms) |", "|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['codes']} ({r['codes'] / 50:g} s) | {r['old']} / {r['new']} | {ms(r['dit_fp32_old'])} / "
                     f"{ms(r['dit_fp32_new'])} | {ms(r['dit_tf32_old'])} / {ms(r['dit_tf32_new'])} | "
                     f"{ms(r['voc_graph_old'])} / {ms(r['voc_graph_new'])} | {ms(r['voc_eager_real'])} |")
    return "\n".join(lines)


def summary(lo: int = 25, hi: int = 1500) -> dict:
    """Each variant's predicted seconds summed over every length ``lo .. hi`` codes (0.5-30 s of audio), and the
    share of the old rule's time that the padding was (the same sums at the real lengths' page-aligned size)."""
    from omni_fast.models import dit_solve

    table = rows(range(lo, hi + 1))
    total = {k: sum(r[k] for r in table) for k in table[0] if k not in ("codes", "old", "new")}
    dit = _configs()[0]
    saved = json.loads(COUNTS.read_text())["dit-step-T500"]["counts"]
    exact = sum(dit_solve_s(bucket_codes(n, range(1, hi + 1), dit) * dit.repeats, saved, dit, "fp32")
                for n in range(lo, hi + 1))
    total["dit_fp32_exact"] = exact
    return total


def main(argv=None) -> int:
    """Print the table, the sums over 25-1500 codes and the vocoder's graph / eager crossover (module doc)."""
    argparse.ArgumentParser(prog="python -m omni_fast.bench.costmodel.token2wav_padding",
                            description=__doc__.split("\n\n")[0]).parse_args(argv)
    print(markdown(rows()))
    t = summary()
    pct = lambda a, b: f"{100 * (t[a] / t[b] - 1):+.1f} %"  # noqa: E731
    print(f"\nsummed over every length 25-1500 codes: DiT solve fp32 new vs old {pct('dit_fp32_new', 'dit_fp32_old')}"
          f" (tf32 {pct('dit_tf32_new', 'dit_tf32_old')}); old / new rule over the unpadded (page-aligned) solve "
          f"{pct('dit_fp32_old', 'dit_fp32_exact')} / {pct('dit_fp32_new', 'dit_fp32_exact')}; BigVGAN in graph new vs "
          f"old {pct('voc_graph_new', 'voc_graph_old')}, eager real length vs graph old "
          f"{pct('voc_eager_real', 'voc_graph_old')}, vs graph new {pct('voc_eager_real', 'voc_graph_new')}")
    c = vocoder_crossover()
    at = "; ".join(f"{k} codes: graph {g * 1e3:.2f} ms, eager {e * 1e3:.2f} ms" for k, (g, e) in c["at"].items())
    print(f"vocoder crossover: BigVGAN in the graph up to {c['max_graph_codes']} codes, eager above "
          f"({'at every length' if c['eager_wins_above'] else 'NOT at every length'} to 1500; {at})")
    print("\n(predicted from a model, not measured)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
