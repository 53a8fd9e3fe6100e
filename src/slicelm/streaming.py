"""Layer-streaming compression: slice models larger than memory.

The model is built as an empty skeleton on the meta device (only buffers such as rotary tables are
real), and the algorithm of :func:`slicelm.slicing.slice_model` runs unchanged with a
:class:`StreamingAccess` that loads each module from the source safetensors just before it is
needed, writes its sliced weights to a new shard as soon as they are final, and frees them. At any
time memory holds one decoder layer, the embeddings while they are processed, and the calibration
activations (bounded by ``max_memory``; the rest spills to memory-mapped files).

The same code path as in-memory slicing means the same weights: ``tests/test_streaming.py`` checks
that both give identical tensors.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn
from transformers import AutoConfig

from slicelm.config import SliceConfig
from slicelm.core.arch import Layout, resolve
from slicelm.core.calibration import WeightAccess
from slicelm.core.meta import meta_model
from slicelm.core.offload import ActivationStore
from slicelm.core.plan import SlicingPlan
from slicelm.errors import SlicelmError
from slicelm.io.outputs import OutputClaim, staged_output, to_json
from slicelm.io.streaming_io import INDEX, SINGLE, LazyCheckpoint, ShardWriter, release
from slicelm.layouts import decilm
from slicelm.layouts.checkpoint import (
    OUTPUT_KIND,
    PLAN_FILE,
    REPORT_FILE,
    choose_format,
    is_stock_shaped,
    sliced_config,
    write_companions,
)
from slicelm.layouts.plain import plain_config, stock_tensors
from slicelm.layouts.plain import stream_plan_of as plan_of_stream
from slicelm.modeling.modeling_slicelm import SLICELM_KEY, get_module
from slicelm.slicing import slice_model
from slicelm.steps.executor import SliceReport, merge_report


def skeleton(folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of ``folder`` with every parameter on the meta device (no weight memory)."""
    return meta_model(AutoConfig.from_pretrained(folder), dtype)


class StreamingAccess(WeightAccess):
    """Loads modules from a :class:`LazyCheckpoint` on demand; writes and frees them when done."""

    def __init__(
        self, checkpoint: LazyCheckpoint, writer: ShardWriter, dtype: torch.dtype, device: str = "cpu"
    ) -> None:
        self.checkpoint, self.writer, self.dtype, self.device = checkpoint, writer, dtype, device

    def load(self, model: nn.Module, path: str) -> None:
        module = get_module(model, path)
        self.checkpoint.materialize(module, f"{path}.", self.dtype, self.device)
        layout = resolve_cached(model)
        if path == layout.embeddings[0] and getattr(model.config, "tie_word_embeddings", False):
            # A tied checkpoint stores the matrix once; the head shares the loaded tensor again.
            get_module(model, layout.head).weight = module.weight

    def done(self, model: nn.Module, path: str) -> None:
        module = get_module(model, path)
        layout = resolve_cached(model)
        if path == layout.head and getattr(model.config, "tie_word_embeddings", False):
            return  # tied: written with the embedding; transformers re-ties it on load
        self.writer.write(module.state_dict(prefix=f"{path}."))
        release(module)

    def release(self, model: nn.Module, path: str) -> None:
        """Read only (a statistics pass): free the module; it is loaded again when sliced."""
        if path == resolve_cached(model).embeddings[0]:
            return  # the embeddings stay loaded until they are rotated and written
        release(get_module(model, path))


def resolve_cached(model: nn.Module):
    """``resolve`` once per model: the skeleton's layout does not change while it is sliced."""
    layout = getattr(model, "_slicelm_layout", None)
    if layout is None:
        layout = resolve(model)
        model._slicelm_layout = layout
    return layout


def slice_streaming(
    source: str | Path,
    out: str | Path | OutputClaim,
    calibration: Sequence[torch.Tensor],
    config: SliceConfig | None = None,
    *,
    tokenizer: Any = None,
    dtype: torch.dtype = torch.float32,
    max_memory: int | None = None,
    offload_dir: str | Path | None = None,
    overwrite: bool = False,
    device: torch.device | str | None = None,
    metadata: dict[str, Any] | None = None,
    report_extra: dict[str, Any] | None = None,
    progress: bool = True,
    plan: SlicingPlan | None = None,
) -> SliceReport:
    """Slice the safetensors checkpoint in ``source`` into the folder ``out``, layer by layer.

    out: the output folder, or an :class:`~slicelm.io.outputs.OutputClaim` on it taken earlier.
    max_memory: bytes of calibration activations kept in RAM (the rest goes to memory-mapped files
    under ``offload_dir``, default the system temp folder). device: where each layer is computed.
    The output folder is the same as :func:`slicelm.save_sliced` writes, in several shards.
    """
    source = Path(source)
    if not (source / "config.json").is_file():
        raise SlicelmError(f"{source} is not a Hugging Face model folder (no config.json); streaming needs one")
    checkpoint = LazyCheckpoint(source)
    model = skeleton(source, dtype)
    config = config or SliceConfig()
    if resolve_cached(model).mlp_chunks is None:
        raise SlicelmError(
            f"streaming does not support {model.config.model_type}: its experts are stored per expert on disk and "
            "fused in memory; slice it without --stream"
        )
    manifest: dict[str, Any] = {}  # its kind is the format, known once the plan is
    with staged_output(out, overwrite, kind=OUTPUT_KIND, protect=[source], manifest=manifest) as tmp:
        writer = ShardWriter(tmp)
        store = ActivationStore(max_memory, offload_dir)
        try:
            report = slice_model(
                model,
                calibration,
                config,
                plan=plan,
                pad_token_id=getattr(tokenizer, "pad_token_id", None),
                progress=progress,
                access=StreamingAccess(checkpoint, writer, dtype),
                store=store,
                device=device,
            )
        finally:
            store.close()
            checkpoint.close()
        writer.finish()
        if (source / "generation_config.json").is_file():
            shutil.copyfile(source / "generation_config.json", tmp / "generation_config.json")
        full_report = merge_report(report.to_dict() | {"streamed": True}, report_extra or {})
        written = choose_format(SlicingPlan.from_dict(getattr(model.config, SLICELM_KEY)["plan"]), model.config)
        manifest["kind"] = written.kind
        if is_stock_shaped(getattr(model.config, SLICELM_KEY)):
            write_plain_folder(tmp, model, tokenizer, metadata, full_report)
        elif written.name == "decilm":  # the same format an in-memory run writes (and planning counted)
            write_decilm_folder(tmp, model, tokenizer, metadata, full_report)
        else:
            sliced_config(model.config, model._slicelm_base.__name__, metadata)
            model.config.architectures = [type(model).__name__]
            model.config.save_pretrained(tmp)
            write_companions(tmp, model.config, tokenizer, full_report)
    return report


def _rewrite_shards(folder: Path, convert) -> None:
    """Replace each safetensors shard in ``folder`` by ``convert(tensors)``, and its index to match."""
    shards = sorted(folder.glob("model*.safetensors"))
    weight_map = {}
    for shard in shards:
        tensors = convert(safetensors.torch.load_file(shard))
        safetensors.torch.save_file(tensors, shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard.name))
    if (folder / INDEX).is_file():
        index = json.loads((folder / INDEX).read_text())
        index["weight_map"] = dict(sorted(weight_map.items()))
        index["metadata"]["total_size"] = sum(
            t.numel() * t.element_size() for shard in shards for t in safetensors.torch.load_file(shard).values()
        )
        (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    elif shards and shards[0].name != SINGLE:
        raise RuntimeError(f"unexpected shard layout in {folder}")


def write_plain_folder(folder: Path, model: nn.Module, tokenizer: Any, metadata: dict | None, report: dict) -> None:
    """Turn the sliced shards written in ``folder`` into the stock architecture, shard by shard."""
    info = getattr(model.config, SLICELM_KEY)
    _rewrite_shards(folder, lambda tensors: stock_tensors(tensors, info, model.config))
    config = plain_config(model.config, Layout.from_dict(info["layout"]), SlicingPlan.from_dict(info["plan"]))
    config.architectures = [model._slicelm_base.__name__]
    config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    (folder / PLAN_FILE).write_text(to_json(info["plan"]) + "\n")
    (folder / REPORT_FILE).write_text(to_json({**report, "layout": "plain", "provenance": metadata or {}}) + "\n")


def write_decilm_folder(folder: Path, model: nn.Module, tokenizer: Any, metadata: dict | None, report: dict) -> None:
    """Turn the one-basis shards written in ``folder`` into a DeciLM folder, shard by shard.

    The widths come from the skeleton's shapes (its weights are back on the meta device); each
    attention tensor is zero-padded on its own, as :func:`slicelm.layouts.decilm.save_decilm` pads it.
    """
    info = getattr(model.config, SLICELM_KEY)
    plan = SlicingPlan.from_dict(info["plan"])
    # Whole removed layers are left out, as the in-memory writer leaves them (stock_tensors renumbers).
    every = decilm.deci_blocks(model)
    biases = decilm.bias_flags(model, every)
    blocks = [b for b, lw in zip(every, plan.layers, strict=True) if not lw.removed]
    heads, head_dim = model.config.num_attention_heads, decilm.head_dim_of(model.config)
    served = [decilm.served_block(b, heads, index=i) for i, b in enumerate(blocks)]
    stock = plain_config(model.config, Layout.from_dict(info["layout"]), plan_of_stream(plan))
    config = decilm.decilm_config(stock, served, biases)
    problems = decilm.serving_problems(config.to_dict())
    if problems["vllm"]:
        raise SlicelmError(f"vLLM cannot run this plan ({problems['vllm'][0]}); keep that layer's attention")
    dropped = set()  # the norms of removed sub-blocks: nothing reads them
    for index, block in enumerate(blocks):
        if not block.attention:
            dropped.add(f"model.layers.{index}.input_layernorm.weight")
        if block.mlp is None:
            dropped.add(f"model.layers.{index}.post_attention_layernorm.weight")
    counts = {"stored": 0, "kept": 0}

    def convert(tensors):
        out = {}
        for name, tensor in stock_tensors(tensors, info, model.config).items():
            if name in dropped:
                continue
            counts["kept"] += tensor.numel()
            parts = name.split(".")  # model.layers.{i}.self_attn.{q_proj}.{weight}
            if parts[:2] == ["model", "layers"] and parts[3] == "self_attn":
                index = int(parts[2])
                tensor = decilm.pad_attention_tensor(
                    ".".join(parts[4:]), tensor, blocks[index], served[index], heads, head_dim
                )
            counts["stored"] += tensor.numel()
            out[name] = tensor
        return out

    _rewrite_shards(folder, convert)
    config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    shutil.copyfile(decilm.configuration_decilm.__file__, folder / decilm.CONFIG_FILE)
    shutil.copyfile(decilm.modeling_decilm.__file__, folder / decilm.MODELING_FILE)
    full = {
        **report,
        "layout": "plain",
        "provenance": metadata or {},
        "format": "decilm",
        "blocks": [dataclasses.asdict(b) for b in blocks],
        "parameters": {**counts, "zero_padding": counts["stored"] - counts["kept"]},
        "serving": problems,
    }
    (folder / decilm.PLAN_FILE).write_text(to_json(info["plan"]) + "\n")
    (folder / decilm.REPORT_FILE).write_text(to_json(full) + "\n")
