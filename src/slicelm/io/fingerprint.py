"""A fingerprint of the evaluation texts, shipped with the package: refuse to train or calibrate on them.

Perplexity is measured on the WikiText-2 test split (and PTB test, and slicelm's C4 test half);
calibrating (``slice --calib FILE``) or training (``finetune --data FILE``) on that text flatters every
number measured on it. A user's file is compared with the test texts through hashed word n-grams, so:

* no data folder is needed (a pip install or a hub user is covered): the fingerprint is package data,
  ``eval_fingerprint.npz``, made by ``scripts/make_eval_fingerprint.py`` from the offline data;
* concatenation does not hide the text: matches are *counted*, not taken as a share of the file;
* whitespace, punctuation, case and WikiText's tokenisation do not matter: text is reduced to its
  words (letters and digits), so ``well @-@ known`` and ``well-known``, ``1 @,@ 000`` and ``1,000``,
  ``word , word`` and ``word, word``, ``was n't`` and ``wasn't`` all give the same words.

Only n-grams whose hash falls in a fixed 1/`SAMPLE` subset are stored; a candidate's n-grams are
hashed and sampled the same way, so every stored n-gram the file contains is found. The whole
WikiText-2 test set gives ~15,000 matches; a file is refused from `MIN_MATCHES` on (about
``MIN_MATCHES * SAMPLE`` = 512 words of test text).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from slicelm.errors import SlicelmError

FINGERPRINT_FILE = Path(__file__).with_name("eval_fingerprint.npz")
NGRAM = 8  # words per n-gram: long enough that unrelated text rarely shares one, short enough to survive edits
SAMPLE = 16  # one n-gram hash in SAMPLE is stored (and looked up)
MIN_MATCHES = 32  # stored n-grams a file must contain to be refused (PTB valid, the nearest other text: 7)
VERSION = 1  # of the normalisation and hashing below; the file records the one it was made with

# Which evaluation text each stored set is, for the refusal message.
NAMES = {
    "wikitext2": "WikiText-2 test text (the text `slicelm ppl` and --ppl-windows measure)",
    "ptb": "PTB test text (measured by `slicelm ppl --dataset ptb`)",
    "c4": "slicelm's C4 test documents (measured by `slicelm ppl --dataset c4`)",
}

_WORD = re.compile(r"[^\W_]+")  # runs of letters and digits, any script
# Tokenised contractions ("was n't", "Boulter 's") are glued back, so detokenised copies give the same words.
_CONTRACTION = re.compile(r"\s+(n't|'(?:s|re|ve|ll|d|m))\b", re.IGNORECASE)


def words(text: str) -> list[str]:
    """The words of ``text``: NFKC, lower case, letters/digits only; ``<unk>`` markers dropped
    (a cleaned copy may delete them, so they must not split an n-gram)."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _CONTRACTION.sub(r"\1", text.replace("<unk>", " "))
    return _WORD.findall(text)


def ngram_hashes(tokens: list[str]) -> np.ndarray:
    """64-bit hashes of every ``NGRAM``-word window of ``tokens``: uint64 array of shape ``(len - NGRAM + 1,)``.

    Each word is hashed once (blake2b: stable across processes, unlike ``hash``); a window's hash is a
    polynomial in its words' hashes (vectorised, wrapping mod 2^64), then mixed (splitmix64's finaliser)
    so that its low bits, which decide sampling, are uniform.
    """
    if len(tokens) < NGRAM:
        return np.zeros(0, dtype=np.uint64)
    vocab: dict[str, int] = {}
    ids = np.fromiter((vocab.setdefault(w, len(vocab)) for w in tokens), dtype=np.int64, count=len(tokens))
    table = np.array(
        [int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little") for w in vocab],
        dtype=np.uint64,
    )
    word = table[ids]  # (T,)
    count = len(tokens) - NGRAM + 1
    acc = np.zeros(count, dtype=np.uint64)
    base = np.uint64(0x100000001B3)  # odd: multiplication is a bijection mod 2^64
    with np.errstate(over="ignore"):
        for i in range(NGRAM):
            acc = acc * base + word[i : i + count]
        acc ^= acc >> np.uint64(30)
        acc *= np.uint64(0xBF58476D1CE4E5B9)
        acc ^= acc >> np.uint64(27)
        acc *= np.uint64(0x94D049BB133111EB)
        acc ^= acc >> np.uint64(31)
    return acc


def sampled(hashes: np.ndarray) -> np.ndarray:
    """The hashes in the stored 1/``SAMPLE`` subset, sorted and unique."""
    return np.unique(hashes[hashes % np.uint64(SAMPLE) == 0])


def fingerprint_of(text: str) -> np.ndarray:
    """What the package stores for an evaluation text: sorted unique sampled n-gram hashes (uint64)."""
    return sampled(ngram_hashes(words(text)))


@dataclass(frozen=True)
class Match:
    name: str  # key of NAMES
    matches: int  # stored n-grams of that text found in the candidate
    stored: int  # stored n-grams of that text in all


@cache
def load_fingerprint(path: Path = FINGERPRINT_FILE) -> dict[str, np.ndarray]:
    """{evaluation set: sorted uint64 hashes} from the package's ``.npz`` (no pickles allowed)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            version = int(data["version"])
            sets = {name: np.asarray(data[name], dtype=np.uint64) for name in NAMES if name in data.files}
            ngram, sample = int(data["ngram"]), int(data["sample"])
    except (OSError, KeyError, ValueError) as exc:
        # A broken install must not quietly let test text through.
        raise RuntimeError(f"slicelm's evaluation-text fingerprint {path} is unreadable ({exc}); reinstall") from None
    if (version, ngram, sample) != (VERSION, NGRAM, SAMPLE):
        raise RuntimeError(f"{path} was made by another slicelm version; run scripts/make_eval_fingerprint.py")
    return sets


def matches(text: str, fingerprint: dict[str, np.ndarray] | None = None) -> list[Match]:
    """How many stored n-grams of each evaluation text ``text`` contains (each distinct n-gram once)."""
    fingerprint = load_fingerprint() if fingerprint is None else fingerprint
    found = fingerprint_of(text)
    return [Match(name, int(np.isin(found, stored).sum()), len(stored)) for name, stored in fingerprint.items()]


def check_not_eval_text(text: str, label: str, use: str = "calibrate or train") -> None:
    """Refuse ``text`` (from ``label``, e.g. a file path) if it contains an evaluation text."""
    for match in matches(text):
        if match.matches >= MIN_MATCHES:
            share = min(1.0, match.matches / max(match.stored, 1))
            raise SlicelmError(
                f"{label} contains {NAMES[match.name]}: {match.matches:,} of its {match.stored:,} fingerprinted "
                f"8-word phrases (~{share:.0%} of it); never {use} on evaluation text: use c4, alpaca, ptb or "
                "other text"
            )
