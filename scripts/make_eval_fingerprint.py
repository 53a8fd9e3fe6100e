"""Write src/slicelm/eval_fingerprint.npz: the hashed n-gram fingerprint of slicelm's evaluation texts.

    python scripts/make_eval_fingerprint.py [--data-dir /work/shared/data]

The texts are exactly those `slicelm ppl` measures (`slicelm.io.data.eval_text`: WikiText-2 test, PTB test,
the C4 sample's test half), read from the offline data folder. Only 64-bit hashes of a 1/16 sample of
their 8-word phrases are written (no text), with the settings that made them. N-grams that the training
text of the same corpus also contains (PTB train; the C4 sample's calibration half) are left out: they
are not evidence of test text, and would refuse the training split itself. Prints what it wrote and how
many stored phrases each other file of the data folder matches (the false-positive check).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from slicelm.io import data
from slicelm.io.fingerprint import FINGERPRINT_FILE, MIN_MATCHES, NGRAM, SAMPLE, VERSION, fingerprint_of, matches


def training_text(name: str, root: Path) -> str | None:
    """The same corpus's non-test text in the data folder, whose phrases are not evidence of test text."""
    if name == "ptb":
        return data.DOC_SEPARATOR.join(data.ptb_sentences(root / data.PTB_TRAIN))
    if name == "c4":
        return data.DOC_SEPARATOR.join(data.c4_sample_documents(root / data.C4_SAMPLE)[data.C4_SAMPLE_EVAL_DOCS :])
    return None  # WikiText-2 train is not in the offline folder


def other_texts(root: Path) -> dict[str, str]:
    """Every other text file of the data folder (calibration sources and task files), for the check."""
    out = {
        "ptb train": data.DOC_SEPARATOR.join(data.ptb_sentences(root / data.PTB_TRAIN)),
        "ptb valid": (root / "ptb/ptb.valid.txt").read_text(encoding="utf-8"),
        "c4 calibration half": training_text("c4", root) or "",
        "alpaca": data.DOC_SEPARATOR.join(data.alpaca_texts(root / data.ALPACA)),
    }
    for path in sorted(root.rglob("*.jsonl")):
        out[str(path.relative_to(root))] = path.read_text(encoding="utf-8")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=str(FINGERPRINT_FILE))
    args = parser.parse_args()
    root = data.resolve_data_dir(args.data_dir)
    if root is None:
        raise SystemExit("no data folder: give --data-dir or set $SLICELM_DATA_DIR")
    sets = {}
    for name in data.EVAL_SETS:
        stored = fingerprint_of(data.eval_text(name, root))
        train = training_text(name, root)
        dropped = 0
        if train is not None:
            keep = ~np.isin(stored, fingerprint_of(train))
            dropped = int((~keep).sum())
            stored = stored[keep]
        sets[name] = stored
        print(f"{name}: {len(stored):,} sampled {NGRAM}-grams stored ({dropped:,} also in its training text, left out)")
    np.savez(args.out, version=np.int64(VERSION), ngram=np.int64(NGRAM), sample=np.int64(SAMPLE), **sets)
    print(f"wrote {args.out}: {Path(args.out).stat().st_size:,} bytes")
    checks = {label: {m.name: m.matches for m in matches(text, sets)} for label, text in other_texts(root).items()}
    print(json.dumps({"refused_from": MIN_MATCHES, "matches": checks}, indent=1))


if __name__ == "__main__":
    main()
