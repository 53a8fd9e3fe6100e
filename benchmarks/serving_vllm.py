"""One vLLM engine held open for `benchmarks/serving.py`: it answers JSON commands, one per line.

Runs under the vLLM venv's Python (``scripts/setup_vllm.sh``), which has vLLM but not slicelm, so
this file imports only vLLM and the standard library. The engine starts in a spawned process,
hence the ``__main__`` guard.

    .venv-vllm/bin/python benchmarks/serving_vllm.py FOLDER --max-model-len 1088 --dtype float32

Protocol: after loading, it prints ``@@serving {"op": "ready", "seconds": S}``; then for each
line on stdin (a JSON object) it prints one ``@@serving {...}`` line (vLLM's own logs go to stderr
and stdout too, so the prefix marks our answers). Commands, all on token ids (never text, so that
tokenization cannot differ from transformers'):

* ``{"op": "greedy", "prompts": [[id, ...], ...], "max_tokens": N}`` -> ``{"tokens": [[id, ...], ...]}``:
  temperature 0, EOS ignored (exactly ``N`` tokens, as the transformers loop it is compared with).
* ``{"op": "nll", "windows": [[id, ...], ...], "score_from": S}`` -> ``{"nll_sum": x, "tokens": n}``:
  the negative log-likelihood of every window token after position ``S`` from vLLM's prompt
  log-probabilities (``prompt_logprobs=0`` returns the log-probability of the actual token).
* ``{"op": "throughput", "prompts": [[id, ...], ...], "max_tokens": N}`` ->
  ``{"seconds": t, "generated": g}``: one ``generate`` call on the whole batch, EOS ignored.
* ``{"op": "quit"}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

PREFIX = "@@serving "


def answer(payload: dict) -> None:
    print(PREFIX + json.dumps(payload), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--max-model-len", type=int, required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from vllm import LLM, SamplingParams  # imported here: the module docstring must load without vLLM
    from vllm.inputs import TokensPrompt

    # A folder whose config maps its classes to its own modeling file (DeciLM's nemotron-nas config)
    # needs remote code for the config; vLLM then uses its own implementation of the architecture.
    with open(f"{args.folder}/config.json") as f:
        remote = bool(json.load(f).get("auto_map"))
    start = time.perf_counter()
    try:
        llm = LLM(
            model=args.folder,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            seed=args.seed,
            enable_prefix_caching=False,  # repeated throughput prompts must be recomputed every round
            trust_remote_code=remote,
        )
    except Exception as exc:  # reported to the driver as a failed load, with the reason
        first = (str(exc).strip().splitlines() or [""])[0]
        answer({"op": "ready", "ok": False, "error": f"{type(exc).__name__}: {first}"})
        return
    answer({"op": "ready", "ok": True, "seconds": round(time.perf_counter() - start, 1)})

    def prompts(ids_lists: list[list[int]]) -> list[TokensPrompt]:
        return [TokensPrompt(prompt_token_ids=ids) for ids in ids_lists]

    for line in sys.stdin:
        command = json.loads(line)
        op = command["op"]
        if op == "quit":
            break
        if op in ("greedy", "throughput"):
            params = SamplingParams(temperature=0.0, max_tokens=command["max_tokens"], ignore_eos=True)
            begin = time.perf_counter()
            outputs = llm.generate(prompts(command["prompts"]), params, use_tqdm=False)
            seconds = time.perf_counter() - begin
            tokens = [list(o.outputs[0].token_ids) for o in outputs]
            if op == "greedy":
                answer({"op": op, "tokens": tokens})
            else:
                answer({"op": op, "seconds": seconds, "generated": sum(map(len, tokens))})
        elif op == "nll":
            params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
            outputs = llm.generate(prompts(command["windows"]), params, use_tqdm=False)
            total, count = 0.0, 0
            for window, out in zip(command["windows"], outputs, strict=True):
                # prompt_logprobs[t] is a {token: Logprob} dict for position t (None at t = 0).
                for t in range(command["score_from"] + 1, len(window)):
                    total -= out.prompt_logprobs[t][window[t]].logprob
                    count += 1
            answer({"op": op, "nll_sum": total, "tokens": count})
        else:
            answer({"op": op, "error": f"unknown op {op!r}"})


if __name__ == "__main__":
    main()
