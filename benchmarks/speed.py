"""Prefill and decode speed of a dense model and its sliced version, beside their theoretical limits.

For each model: prefill tokens/s (B x T prompt, one forward that fills the KV cache and returns the
last position's logits, as ``generate`` does) and greedy decode tokens/s with the KV cache
(``new_tokens`` steps). Each measurement is the median of ``--repeats`` runs after a warm-up,
dense and sliced interleaved in one process so they see the same machine state.

Limits: prefill speed-up <= dense FLOPs / sliced FLOPs (counted by torch's FlopCounterMode on the
real forward); decode speed-up <= dense / sliced bytes of weights read per step.

    python benchmarks/speed.py DENSE SLICED --name smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from slicelm.io.models import load_model

REPO = Path(__file__).resolve().parents[1]


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers read per decode step (tied tensors once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@torch.inference_mode()
def prefill(model, ids: torch.Tensor) -> None:
    model(input_ids=ids, use_cache=True, logits_to_keep=1)


@torch.inference_mode()
def prefill_flops(model, ids: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        prefill(model, ids)
    return counter.get_total_flops()


@torch.inference_mode()
def decode(model, ids: torch.Tensor, new_tokens: int) -> None:
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dense")
    p.add_argument("sliced")
    p.add_argument("--name", required=True, help="results go to docs/results/speed_<name>.{json,md}")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--prefill-batches", default="1,8")
    p.add_argument("--decode-batches", default="1,8")
    p.add_argument("--decode-prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--note", default="", help="how the sliced model was made, for the report")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    models = {"dense": load_model(args.dense)[0], "sliced": load_model(args.sliced)[0]}
    vocab = models["dense"].config.vocab_size
    gen = torch.Generator().manual_seed(0)
    results: dict = {
        "settings": {
            "dense": args.dense,
            "sliced": args.sliced,
            "prompt_len": args.prompt_len,
            "decode_prompt_len": args.decode_prompt_len,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "statistic": "median",
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": f"{platform.machine()} {platform.processor()}".strip(),
            "dtype": str(next(models["dense"].parameters()).dtype),
            "note": args.note,
        },
        "params": {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()},
        "weight_bytes": {k: weight_bytes(m) for k, m in models.items()},
        "prefill": [],
        "decode": [],
    }
    for batch in (int(b) for b in args.prefill_batches.split(",")):
        ids = torch.randint(3, vocab, (batch, args.prompt_len), generator=gen)
        row = {"batch": batch, "tokens": batch * args.prompt_len}
        for name, model in models.items():
            row[f"{name}_flops"] = prefill_flops(model, ids)
            times = timed(lambda m=model, ids=ids: prefill(m, ids), args.repeats)
            row[f"{name}_tokens_per_s"] = row["tokens"] / statistics.median(times)
            row[f"{name}_seconds"] = times
        row["speedup"] = row["sliced_tokens_per_s"] / row["dense_tokens_per_s"]
        row["limit"] = row["dense_flops"] / row["sliced_flops"]
        row["share_of_limit"] = row["speedup"] / row["limit"]
        results["prefill"].append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("seconds")}))
    for batch in (int(b) for b in args.decode_batches.split(",")):
        ids = torch.randint(3, vocab, (batch, args.decode_prompt_len), generator=gen)
        row = {"batch": batch, "new_tokens": args.new_tokens}
        for name, model in models.items():
            times = timed(lambda m=model, ids=ids: decode(m, ids, args.new_tokens), args.repeats)
            row[f"{name}_tokens_per_s"] = batch * args.new_tokens / statistics.median(times)
            row[f"{name}_seconds"] = times
        row["speedup"] = row["sliced_tokens_per_s"] / row["dense_tokens_per_s"]
        row["limit"] = results["weight_bytes"]["dense"] / results["weight_bytes"]["sliced"]
        row["share_of_limit"] = row["speedup"] / row["limit"]
        results["decode"].append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("seconds")}))
    write(results, REPO / "docs" / "results" / f"speed_{args.name}")


def write(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    # Not with_suffix: names such as "llama-1.5b" contain a dot.
    out.parent.joinpath(out.name + ".json").write_text(json.dumps(results, indent=2) + "\n")
    s = results["settings"]
    lines = [
        f"# Speed: {s['dense']} dense vs sliced",
        "",
        f"Sliced model: `{s['sliced']}`. Median of {s['repeats']} runs after one warm-up, dense and sliced in one "
        f"process; {s['threads']} threads, torch {s['torch']}, {s['dtype']}, {s['machine']}. "
        "Produced by `benchmarks/speed.py`.",
        "",
        f"Parameters: dense {results['params']['dense'] / 1e6:.1f}M, sliced {results['params']['sliced'] / 1e6:.1f}M; "
        f"weight bytes dense {results['weight_bytes']['dense'] / 2**20:.0f} MiB, "
        f"sliced {results['weight_bytes']['sliced'] / 2**20:.0f} MiB.",
        "",
        s.get("note", ""),
        "",
        "| phase | batch | dense tok/s | sliced tok/s | speed-up | limit | share of limit |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for phase, limit_kind in (("prefill", "FLOPs"), ("decode", "bytes")):
        for r in results[phase]:
            shape = f"{r['batch']} x {s['prompt_len']}" if phase == "prefill" else f"{r['batch']} (+{r['new_tokens']})"
            lines.append(
                f"| {phase} | {shape} | {r['dense_tokens_per_s']:.1f} | {r['sliced_tokens_per_s']:.1f} | "
                f"{r['speedup']:.3f} | {r['limit']:.3f} ({limit_kind}) | {r['share_of_limit']:.1%} |"
            )
    out.parent.joinpath(out.name + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
