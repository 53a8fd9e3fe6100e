"""How the plain layout's one basis combines the stream's points: normalised against raw sums.

The plain layout keeps one basis for every point of the residual stream, the eigenvectors of a
combination of the points' second moments. Two candidates:

* ``normalized`` (slicelm's default): every point's moment divided by its trace, so each point has
  the same say whatever its scale (the stream's norm grows with depth, by orders of magnitude);
* ``sum``: the raw moments added, so the deepest, largest points dominate.

For each, this slices SmolLM2-135M in the plain layout at one stream sparsity (no MLP pruning,
so only the basis differs), and reports WikiText-2 perplexity and, per point, the share of that
point's energy the kept directions hold (what the basis is meant to maximise).

Writes docs/results/plain_basis_weighting.{json,md}.

    python benchmarks/plain_basis_weighting.py --sparsity 0.25
"""

from __future__ import annotations

import argparse
import json
import os
import statistics as stats_lib
import sys
import time
from pathlib import Path
from unittest import mock

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"


def retained(moments: dict[str, torch.Tensor], q: torch.Tensor, k: int) -> dict[str, float]:
    """Per point: trace(Q_k^T M Q_k) / trace(M), the share of its energy the kept directions hold."""
    kept = q[:, :k]
    return {p: float(torch.trace(kept.T @ m @ kept) / torch.trace(m)) for p, m in moments.items()}


def run(weighting: str, args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(REPO / "src"))
    import slicelm
    import slicelm.core.statistics as statistics
    from slicelm.io.data import load_calibration, load_eval_ids
    from slicelm.measure.perplexity import perplexity
    from slicelm.slicing import SliceConfig, slice_model

    torch.set_num_threads(args.threads)
    model, tokenizer = slicelm.load_model("smollm2-135m")
    calibration = load_calibration(
        "c4", tokenizer, n_samples=args.calib_samples, seqlen=args.calib_seqlen, seed=42, data_dir=args.data_dir
    )
    ids = load_eval_ids("wikitext2", tokenizer, data_dir=args.data_dir)
    config = SliceConfig(sparsity=args.sparsity, layout="plain")
    seen: dict = {}
    original = statistics.global_basis

    def basis(stats, *_):
        seen["moments"] = {p: stats.moment(p).to(torch.float64) for p in stats.points}
        values, q = original(stats, weighting)
        seen["q"] = q
        return values, q

    cache = Path(args.work) / f"stats-plain-{args.calib_samples}x{args.calib_seqlen}"
    start = time.perf_counter()
    with mock.patch.object(statistics, "global_basis", basis):
        report = slice_model(
            model, calibration, config, pad_token_id=tokenizer.pad_token_id, progress=False, statistics_cache=cache
        )
    seconds = time.perf_counter() - start
    width = report.plan["layers"][0]["mid"]
    shares = retained(seen["moments"], seen["q"], width)
    ppl = perplexity(model, ids, seqlen=2048, max_windows=args.windows, progress=False)
    return {
        "weighting": weighting,
        "width": width,
        "params_ratio": report.params_after / report.params_before,
        "ppl": ppl.ppl,
        "ppl_windows": ppl.windows,
        "slice_seconds": seconds,
        "retained_mean": stats_lib.mean(shares.values()),
        "retained_min": min(shares.values()),
        "retained": shares,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sparsity", type=float, default=0.25)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-seqlen", type=int, default=1024)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", default=os.environ.get("SLICELM_DATA_DIR", str(REPO.parent / "shared" / "data")))
    p.add_argument("--work", default=str(REPO / "runs" / "compression"), help="shares the statistics cache")
    args = p.parse_args()
    rows = [run(w, args) for w in ("normalized", "sum")]
    RESULTS.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("data_dir", "work")}
    (RESULTS / "plain_basis_weighting.json").write_text(
        json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n"
    )
    lines = [
        "# The plain layout's basis: how to combine the stream's points",
        "",
        f"Produced by `benchmarks/plain_basis_weighting.py`: SmolLM2-135M, plain layout, stream sparsity "
        f"{args.sparsity} (no MLP pruning), calibration c4 {args.calib_samples} x {args.calib_seqlen} (seed 42), "
        f"WikiText-2 test perplexity on the first {args.windows} windows of 2048. *Retained*: per point of the "
        "stream, the share of its energy in the kept directions (mean and worst over the "
        f"{len(rows[0]['retained'])} points).",
        "",
        "| weighting | width | params | ppl | retained (mean) | retained (worst point) | slice time |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['weighting']} | {r['width']} | {r['params_ratio']:.3f}x | {r['ppl']:.2f} | "
            f"{r['retained_mean']:.4f} | {r['retained_min']:.4f} | {r['slice_seconds']:.0f} s |"
        )
    (RESULTS / "plain_basis_weighting.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
