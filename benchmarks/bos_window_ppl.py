"""Perplexity under llama-perplexity's protocol, in transformers: is a llama.cpp ppl gap the protocol?

``llama-perplexity -c C --chunks K`` replaces the first token of every window with BOS when the
model's tokenizer adds one (Gemma's does; SmolLM2's does not), then scores the second half of each
window. ``slicelm ppl`` puts one BOS at the very start of the text only. On a BOS tokenizer the two
protocols differ, and ``benchmarks/serving.py``'s llama.cpp gap shows that difference, not the GGUF.
This script scores a Hugging Face folder (float32, CPU) exactly as llama-perplexity does, so its
number can be set beside llama.cpp's f16 estimate.

    python benchmarks/bos_window_ppl.py runs/serving_gemma3/dense-hf --seqlen 512 --windows 8
"""

from __future__ import annotations

import argparse
import math
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from slicelm.io.data import load_eval_ids


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--seqlen", type=int, default=512, help="llama-perplexity's -c")
    p.add_argument("--windows", type=int, default=8, help="llama-perplexity's --chunks")
    p.add_argument("--data-dir", default=os.environ.get("SLICELM_DATA_DIR"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    if tokenizer.bos_token_id is None:
        raise SystemExit("bos_window_ppl: this tokenizer has no BOS token: slicelm ppl's protocol is llama.cpp's")
    model = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32).eval()
    ids = load_eval_ids("wikitext2", tokenizer, data_dir=args.data_dir)
    half, nll, scored = args.seqlen // 2, 0.0, 0
    with torch.no_grad():
        for k in range(args.windows):
            window = ids[k * args.seqlen : (k + 1) * args.seqlen].clone()  # (C,)
            window[0] = tokenizer.bos_token_id
            logits = model(input_ids=window[None]).logits[0, half - 1 : -1].double()  # predicts window[half:]
            nll -= torch.log_softmax(logits, -1).gather(1, window[half:, None]).sum().item()
            scored += args.seqlen - half
    print(
        f"{args.folder}: ppl {math.exp(nll / scored):.4f} ({args.windows} windows of {args.seqlen}, BOS first, "
        f"second half scored, {scored} tokens)"
    )


if __name__ == "__main__":
    main()
