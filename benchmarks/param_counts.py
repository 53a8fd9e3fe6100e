"""True parameter counts of sliced layouts on real-model configs, without any weights.

Every structure is built on the meta device and counted (``slicelm.allocate.counting.ParameterCounter``), so
shortcut matrices, heads and norms are counted exactly as they would be saved. Configs: the shipped
SmolLM2-135M and Llama-2-7B's published shape (hidden 4096, 32 layers, 32 heads, MLP 11008,
vocabulary 32000, untied head) built from its numbers. Writes docs/results/param_counts.{json,md}.

    python benchmarks/param_counts.py
"""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"


def configs():
    from transformers import LlamaConfig

    from slicelm.io.models import load_config, resolve_source

    yield "SmolLM2-135M (tied)", load_config(resolve_source("smollm2-135m"))
    yield (
        "Llama-2-7B shape (untied)",
        LlamaConfig(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        ),
    )


def count(model_config, sparsity: float, layout: str, slice_head: bool = False, mlp_sparsity: float = 0.0):
    from slicelm.allocate.context import context_from_config, explicit_plan
    from slicelm.allocate.counting import ParameterCounter
    from slicelm.slicing import SliceConfig

    config = SliceConfig(sparsity=sparsity, layout=layout, slice_head=slice_head, mlp_sparsity=mlp_sparsity)
    ctx, dense = context_from_config(model_config, config)
    return ParameterCounter(ctx).count(explicit_plan(ctx, config)), dense


def main() -> None:
    rows = []
    for name, model_config in configs():
        for sparsity in (0.25, 0.30):
            for label, layout, slice_head in (
                ("SliceGPT, head not sliced (slicelm default)", "slicegpt", False),
                ("SliceGPT, head sliced (the paper's count)", "slicegpt", True),
                ("plain layout (one basis, no shortcuts)", "plain", True),
            ):
                params, dense = count(model_config, sparsity, layout, slice_head)
                rows.append({"config": name, "sparsity": sparsity, "layout": label, "params": params, "dense": dense})
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "param_counts.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "# True parameter counts of sliced layouts (computed from configs)",
        "",
        "Produced by `benchmarks/param_counts.py`: each structure is built on the meta device and counted, "
        "shortcut matrices and heads included. Widths rounded to multiples of 8 (plain layout: of lcm(8, attention "
        "heads), as stock configs require).",
        "",
        "| config | stream sparsity | layout | parameters | / dense |",
        "|---|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['sparsity']:.0%} | {r['layout']} | {r['params'] / 1e6:,.1f}M | "
            f"{r['params'] / r['dense']:.3f} |"
        )
    (RESULTS / "param_counts.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
