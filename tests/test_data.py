"""Calibration and test text: offline files read exactly as the HF datasets; every error is one line."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from slicelm.errors import SlicelmError
from slicelm.io import data

WIKI_TEST_SHA256 = "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"


@pytest.fixture(scope="module")
def bos_tokenizer():
    """A word-level fast tokenizer whose ``tokenizer(text)`` prepends BOS (id 0), like Llama's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = "the cat sat on a mat and dog ran far".split()
    vocab = {"<s>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", unk_token="<unk>")


# --- data dir resolution -----------------------------------------------------------------------------


def test_resolve_data_dir_flag_then_env_then_checkout_then_hub(tmp_path, monkeypatch):
    other = tmp_path / "env"
    other.mkdir()
    monkeypatch.setenv(data.DATA_DIR_ENV, str(other))
    assert data.resolve_data_dir(str(tmp_path)) == tmp_path
    assert data.resolve_data_dir(None) == other
    monkeypatch.delenv(data.DATA_DIR_ENV)
    # A source checkout with ../shared/data beside it finds that folder by itself (as the README says).
    beside = data.REPO_ROOT.parent / "shared" / "data"
    assert data.resolve_data_dir(None) == (beside if beside.is_dir() else None)
    monkeypatch.setattr(data, "default_data_dir", lambda: None)
    assert data.resolve_data_dir(None) is None
    with pytest.raises(SlicelmError, match="does not exist"):
        data.resolve_data_dir(str(tmp_path / "missing"))


# --- test text -----------------------------------------------------------------------------------------


def test_wikitext2_rows_match_hf_split(data_dir):
    path = data_dir / data.WIKITEXT2_TEST
    assert hashlib.sha256(path.read_bytes()).hexdigest() == WIKI_TEST_SHA256
    rows = data.wikitext_rows(path)
    assert len(rows) == 4358
    assert sum(1 for r in rows if r) == 2891
    assert all(r.endswith("\n") for r in rows if r)  # HF rows keep the line's newline
    assert rows[:2] == ["", " = Robert Boulter = \n"]
    # SOURCES.md: the HF-row dump "\n".join(rows) is 1,292,013 bytes.
    assert len("\n".join(rows).encode("utf-8")) == 1_292_013

    text = data.eval_text("wikitext2", data_dir)
    assert text == "\n\n".join(rows)
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is")


def test_ptb_and_c4_test_text(data_dir):
    sentences = data.ptb_sentences(data_dir / data.PTB_TEST)
    assert len(sentences) == 3761
    assert sentences[0] == "no it was n't black monday"  # HF strips both ends
    assert data.eval_text("ptb", data_dir) == "\n\n".join(sentences)

    docs = data.c4_sample_documents(data_dir / data.C4_SAMPLE)
    assert len(docs) == 2000
    c4_text = data.eval_text("c4", data_dir)
    assert c4_text == "\n\n".join(docs[: data.C4_SAMPLE_EVAL_DOCS])


def test_eval_ids_tokenized_once_with_defaults(data_dir, smollm2_tokenizer, bos_tokenizer, tmp_path):
    ids = data.load_eval_ids("ptb", smollm2_tokenizer, data_dir)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids.tolist() == smollm2_tokenizer(data.eval_text("ptb", data_dir))["input_ids"]
    # A BOS-adding tokenizer puts exactly one BOS, at position 0, in the whole test text.
    bos_ids = data.load_eval_ids("ptb", bos_tokenizer, data_dir)
    assert bos_ids[0] == 0 and int((bos_ids == 0).sum()) == 1


# --- calibration ---------------------------------------------------------------------------------------


def test_calibration_deterministic_per_seed(data_dir, smollm2_tokenizer):
    kwargs = dict(n_samples=4, seqlen=64, data_dir=data_dir)
    first = data.load_calibration("c4", smollm2_tokenizer, seed=0, **kwargs)
    again = data.load_calibration("c4", smollm2_tokenizer, seed=0, **kwargs)
    other = data.load_calibration("c4", smollm2_tokenizer, seed=1, **kwargs)
    assert len(first) == 4
    assert all(s.dtype == torch.long and s.shape == (64,) for s in first)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_c4_calibration_never_sees_test_documents(data_dir, smollm2_tokenizer):
    test_text = data.eval_text("c4", data_dir)
    docs = data.c4_sample_documents(data_dir / data.C4_SAMPLE)
    calib_text = "\n\n".join(docs[data.C4_SAMPLE_EVAL_DOCS :])
    samples = data.load_calibration("c4", smollm2_tokenizer, n_samples=8, seqlen=64, seed=3, data_dir=data_dir)
    for sample in samples:
        # Byte-level BPE decodes exactly; a 24-token span identifies its source document.
        span = smollm2_tokenizer.decode(sample[20:44])
        assert span in calib_text
        assert span not in test_text


def test_ptb_calibration_windows_come_from_train(data_dir, smollm2_tokenizer):
    samples = data.load_calibration("ptb", smollm2_tokenizer, n_samples=3, seqlen=48, seed=0, data_dir=data_dir)
    train_text = "\n\n".join(data.ptb_sentences(data_dir / data.PTB_TRAIN))
    assert [s.numel() for s in samples] == [48, 48, 48]
    for sample in samples:
        assert smollm2_tokenizer.decode(sample[8:40]) in train_text


def test_alpaca_records_have_variable_lengths(data_dir, smollm2_tokenizer):
    texts = data.alpaca_texts(data_dir / data.ALPACA)
    assert len(texts) == 5000
    assert sum("\n\n### Input:\n" in t for t in texts) == 1943  # records with a non-empty input
    assert all(t.startswith("Below is an instruction that describes a task") for t in texts)

    samples = data.load_calibration("alpaca", smollm2_tokenizer, n_samples=16, seqlen=64, data_dir=data_dir)
    lengths = [s.numel() for s in samples]
    assert max(lengths) <= 64 and min(lengths) < 64 and len(set(lengths)) > 1
    assert smollm2_tokenizer.decode(samples[0]).startswith("Below is an instruction")

    # Packed (training): records joined like documents, every window full, no window repeated.
    packed = data.load_calibration(
        "alpaca", smollm2_tokenizer, n_samples=40, seqlen=256, data_dir=data_dir, packed=True
    )
    assert {s.numel() for s in packed} == {256}
    assert len({tuple(s.tolist()) for s in packed}) == 40
    joined = "".join(smollm2_tokenizer.decode(s) for s in packed)
    assert joined.count("### Instruction:") > 40  # several records per window, not one padded record


def test_txt_file_windows_start_with_bos(tmp_path, bos_tokenizer):
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(["the cat sat on a mat and the dog ran far"] * 20))
    samples = data.load_calibration(str(path), bos_tokenizer, n_samples=5, seqlen=8, seed=0)
    assert [s.numel() for s in samples] == [8] * 5
    for s in samples:  # BOS first, as `tokenizer(text)` would start any input, and nowhere else
        assert s[0] == 0 and int((s == 0).sum()) == 1
    # 220 words -> 31 windows of 7 text tokens, drawn without replacement.
    with pytest.raises(SlicelmError, match="only 31 windows"):
        data.load_calibration(str(path), bos_tokenizer, n_samples=32, seqlen=8)


def test_jsonl_documents(tmp_path, smollm2_tokenizer):
    path = tmp_path / "docs.jsonl"
    docs = [f"Document number {i} talks about topic {i * 7} at some length." for i in range(40)]
    path.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n\n")
    samples = data.load_calibration(str(path), smollm2_tokenizer, n_samples=6, seqlen=16, seed=2)
    assert [s.numel() for s in samples] == [16] * 6
    for s in samples:  # windows run across shuffled documents; every piece between seams is real text
        assert all(any(piece in d for d in docs) for piece in smollm2_tokenizer.decode(s).split("\n\n"))
    assert [s.tolist() for s in samples] == [
        s.tolist() for s in data.load_calibration(str(path), smollm2_tokenizer, n_samples=6, seqlen=16, seed=2)
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "fine"}\n{"text": oops}\n', r"docs\.jsonl:2 is not valid JSON"),
        ('{"text": "fine"}\n{"body": "no text"}\n', r'docs\.jsonl:2 has no string "text" field'),
        ('["a list"]\n', r'docs\.jsonl:1 has no string "text" field'),
    ],
)
def test_bad_jsonl_is_one_line_error(tmp_path, bos_tokenizer, content, message):
    path = tmp_path / "docs.jsonl"
    path.write_text(content)
    with pytest.raises(SlicelmError, match=message) as info:
        data.load_calibration(str(path), bos_tokenizer, n_samples=1, seqlen=4)
    assert "\n" not in str(info.value)


# --- errors ----------------------------------------------------------------------------------------------


def test_wikitext2_calibration_offline_needs_train_split(data_dir, bos_tokenizer):
    with pytest.raises(SlicelmError, match=r"train split .*wiki\.train\.raw.*c4, alpaca or ptb") as info:
        data.load_calibration("wikitext2", bos_tokenizer, n_samples=1, seqlen=8, data_dir=data_dir)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda tok, d: data.load_calibration("c5", tok, n_samples=1, seqlen=8, data_dir=d),
            "unknown calibration",
        ),
        (lambda tok, d: data.load_calibration("x.txt", tok, n_samples=1, seqlen=8), "does not exist"),
        (lambda tok, d: data.load_calibration("ptb", tok, n_samples=0, seqlen=8, data_dir=d), "at least 1"),
        (lambda tok, d: data.load_calibration("ptb", tok, n_samples=1, seqlen=1, data_dir=d), "at least 2"),
        (
            lambda tok, d: data.load_calibration("ptb", tok, n_samples=1, seqlen=8, data_dir=d),
            r"ptb/ptb\.train\.txt",
        ),
        (lambda tok, d: data.load_eval_ids("wikitext103", tok, d), "unknown evaluation dataset"),
        (lambda tok, d: data.load_eval_ids("c4", tok, d), r"c4/c4_validation_2k\.parquet.*--data-dir"),
    ],
)
def test_user_errors_are_one_line(tmp_path, bos_tokenizer, call, message):
    empty = tmp_path / "empty-data-dir"
    empty.mkdir()
    with pytest.raises(SlicelmError, match=message) as info:
        call(bos_tokenizer, empty)
    assert "\n" not in str(info.value)


def test_not_enough_records(data_dir, bos_tokenizer):
    with pytest.raises(SlicelmError, match="5000 records"):
        data.load_calibration("alpaca", bos_tokenizer, n_samples=5001, seqlen=8, data_dir=data_dir)


# --- hub fallback (no network: `datasets.load_dataset` is replaced) ----------------------------------------


def test_hub_fallback_reads_the_right_split(monkeypatch, bos_tokenizer, hub_only):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, *, split, data_files=None):
        calls.append((path, name, split, data_files))
        return datasets.Dataset.from_dict({"text": ["", " = A = \n", "the cat sat\n"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert data.eval_text("wikitext2") == "\n\n = A = \n\n\nthe cat sat\n"
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", "test", None)]
    data.load_calibration("wikitext2", bos_tokenizer, n_samples=1, seqlen=3)
    assert calls[-1][2] == "train"  # calibration never reads the test split


def test_hub_failure_is_one_line(monkeypatch, bos_tokenizer, hub_only):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SlicelmError, match=r"cannot load allenai/c4 \(train\).*Couldn't reach.*--data-dir") as info:
        data.load_calibration("c4", bos_tokenizer, n_samples=1, seqlen=8)
    assert "\n" not in str(info.value)
