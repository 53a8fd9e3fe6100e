"""SmolLM2-135M dense and plain-sliced in a real llama.cpp runtime: size, perplexity, tokens/s.

Needs llama.cpp built with ``benchmarks/llama_cpp_build.sh`` (pass its folder as --llama-cpp or
$LLAMA_CPP_DIR). For the dense model and a plain-layout slice (``slicelm slice --layout plain``,
the stock Llama architecture with smaller widths) it:

1. converts each to GGUF with ``slicelm export`` at f32, f16 and a 4-bit type (Q4_K_M by default:
   llama-quantize falls back to Q5_0/Q8_0 per tensor where a width is not a multiple of 256, and
   keeps F16 where it is not a multiple of 32 — slicelm's plain widths are multiples of 32);
2. runs llama.cpp's ``llama-perplexity`` on the WikiText-2 test text slicelm scores (the HF rows
   joined by blank lines), ``-c 2048 --chunks N``, and ``slicelm ppl`` with the same protocol
   (windows of 2048, the second half of each scored) on the same model: f32 must agree within 1%;
3. measures prompt processing and generation tokens/s with ``llama-bench`` (median of its samples).

Writes docs/results/llama_cpp_smollm2.{json,md}. The GGUF files and folders live under --work.

    python benchmarks/llama_cpp_smollm2.py --sliced runs/compression/models/mlp@0.85 --llama-cpp /work/llama.cpp-build
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("[llama.cpp] " + " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=True, **kw)


def dense_folder(work: Path) -> Path:
    """SmolLM2-135M dequantised from the shipped GGUF and saved as an ordinary HF folder."""
    out = work / "dense-hf"
    if not (out / "config.json").is_file():
        import slicelm

        model, tokenizer = slicelm.load_model("smollm2-135m")
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return out


def llama_ppl(binary: Path, gguf: Path, text: Path, ctx: int, chunks: int, threads: int) -> float:
    done = sh([binary, "-m", gguf, "-f", text, "-c", ctx, "--chunks", chunks, "-t", threads, "-b", ctx])
    match = re.search(r"Final estimate: PPL = ([0-9.]+)", done.stdout + done.stderr)
    if not match:
        raise RuntimeError(f"no final estimate in llama-perplexity's output for {gguf}")
    return float(match.group(1))


def slicelm_ppl(folder: Path, ctx: int, chunks: int, data_dir: str) -> float:
    cmd = [sys.executable, "-m", "slicelm", "ppl", folder, "--seqlen", ctx, "--max-windows", chunks]
    cmd += ["--score-from", ctx // 2, "--data-dir", data_dir, "--quiet"]
    return json.loads(sh(cmd).stdout.strip().splitlines()[-1])["ppl"]


def bench(binary: Path, gguf: Path, threads: int, prompt: int, gen: int, reps: int) -> dict[str, float]:
    done = sh([binary, "-m", gguf, "-p", prompt, "-n", gen, "-r", reps, "-t", threads, "-o", "json"])
    out = {}
    for test in json.loads(done.stdout):
        key = f"pp{prompt}" if test["n_prompt"] else f"tg{gen}"
        out[key] = statistics.median(test["samples_ts"])
    return out


def sliced_models(specs: list[str]) -> dict[str, Path]:
    named = [spec.split("=", 1) if "=" in spec else ("sliced", spec) for spec in specs]
    return {name: Path(folder) for name, folder in named}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--sliced",
        action="append",
        required=True,
        help="a plain-layout sliced folder of SmolLM2-135M, as NAME=FOLDER or FOLDER (name: sliced); repeatable",
    )
    p.add_argument("--llama-cpp", default=os.environ.get("LLAMA_CPP_DIR"))
    p.add_argument("--work", default=str(REPO / "runs" / "llama_cpp"))
    p.add_argument("--data-dir", default=os.environ.get("SLICELM_DATA_DIR", str(REPO.parent / "shared" / "data")))
    p.add_argument("--quant", default="q4_k_m")
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--gen", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    if not args.llama_cpp:
        sys.exit("give --llama-cpp (the folder benchmarks/llama_cpp_build.sh built) or set $LLAMA_CPP_DIR")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tools = Path(args.llama_cpp) / "build" / "bin"
    sys.path.insert(0, str(REPO / "src"))
    from slicelm.io.data import eval_text

    text = work / "wikitext2-test.txt"  # exactly the text slicelm scores
    text.write_text(eval_text("wikitext2", args.data_dir))
    models = {"dense": dense_folder(work)} | sliced_models(args.sliced)
    rows = []
    for name, folder in models.items():
        for outtype in ("f32", "f16", args.quant):
            gguf = work / f"{name}-{outtype}.gguf"
            if not gguf.is_file():
                export = [sys.executable, "-m", "slicelm", "export", folder, "--gguf", gguf, "--outtype", outtype]
                sh([*export, "--llama-cpp", args.llama_cpp])
            row = {"model": name, "type": outtype, "bytes": gguf.stat().st_size}
            perplexity = tools / "llama-perplexity"
            row["llama_cpp_ppl"] = llama_ppl(perplexity, gguf, text, args.ctx, args.chunks, args.threads)
            if outtype != "f32":
                row |= bench(tools / "llama-bench", gguf, args.threads, args.prompt, args.gen, args.reps)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        hf_ppl = slicelm_ppl(folder, args.ctx, args.chunks, args.data_dir)
        rows.append({"model": name, "type": "hf-float32", "slicelm_ppl": hf_ppl})
    write(rows, args)


def write(rows: list[dict], args: argparse.Namespace) -> None:
    from transformers import AutoConfig

    from slicelm.io.memory import parameter_count

    counts = {}
    sliced = sliced_models(args.sliced)
    for name, folder in ({"dense": Path(args.work) / "dense-hf"} | sliced).items():
        counts[name] = parameter_count(AutoConfig.from_pretrained(folder))
    result = {"settings": vars(args), "params": counts, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "llama_cpp_smollm2.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    hf = {r["model"]: r["slicelm_ppl"] for r in rows if r["type"] == "hf-float32"}
    lines = [
        "# SmolLM2-135M in llama.cpp: dense against plain-sliced",
        "",
        f"Produced by `benchmarks/llama_cpp_smollm2.py` with llama.cpp built from llama-cpp-python 0.3.36's sources "
        f"(`benchmarks/llama_cpp_build.sh`), {args.threads} CPU threads. Perplexity: WikiText-2 test (the text "
        f"`slicelm ppl` scores), `llama-perplexity -c {args.ctx} --chunks {args.chunks}` (the second half of each "
        f"window scored); `slicelm ppl --seqlen {args.ctx} --max-windows {args.chunks} --score-from {args.ctx // 2}` "
        "on the Hugging Face folder for comparison. Speed: `llama-bench -p "
        f"{args.prompt} -n {args.gen} -r {args.reps}`, median tokens/s.",
        "",
        "Parameters: "
        + ", ".join(
            [f"dense {counts['dense'] / 1e6:.1f}M"]
            + [f"{n} {counts[n] / 1e6:.1f}M ({counts[n] / counts['dense']:.3f}x, `{f}`)" for n, f in sliced.items()]
        )
        + ".",
        "",
        "| model | type | file MiB | llama.cpp ppl | slicelm ppl (HF f32) | "
        f"pp{args.prompt} tok/s | tg{args.gen} tok/s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["type"] == "hf-float32":
            continue
        ref = f"{hf[r['model']]:.3f}" if r["type"] == "f32" else ""
        lines.append(
            f"| {r['model']} | {r['type']} | {r['bytes'] / 2**20:.1f} | {r['llama_cpp_ppl']:.3f} | {ref} | "
            f"{r.get(f'pp{args.prompt}', float('nan')):.1f} | {r.get(f'tg{args.gen}', float('nan')):.1f} |"
        )
    speed = {(r["model"], r["type"]): r for r in rows if f"tg{args.gen}" in r}
    lines.append("")
    for name in sliced:
        for t in ("f16", args.quant):
            if ("dense", t) in speed and (name, t) in speed:
                d, s = speed[("dense", t)], speed[(name, t)]
                lines.append(
                    f"- {name} {t}: against dense {t}, prompt {s[f'pp{args.prompt}'] / d[f'pp{args.prompt}']:.2f}x, "
                    f"generation {s[f'tg{args.gen}'] / d[f'tg{args.gen}']:.2f}x, file {s['bytes'] / d['bytes']:.2f}x"
                )
    for name in ["dense", *sliced]:
        f32 = next((r for r in rows if r["model"] == name and r["type"] == "f32"), None)
        if f32 and name in hf:
            gap = abs(f32["llama_cpp_ppl"] / hf[name] - 1)
            lines.append(
                f"- {name} f32: llama.cpp {f32['llama_cpp_ppl']:.3f} vs slicelm {hf[name]:.3f} "
                f"({gap:.2%} apart; target within 1%)"
            )
    from slicelm.export import quantization_notes

    for name, folder in ({"dense": Path(args.work) / "dense-hf"} | sliced).items():
        lines += [f"- {name}, `slicelm export` says: {note}" for note in quantization_notes(folder, args.quant)]
    (RESULTS / "llama_cpp_smollm2.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
