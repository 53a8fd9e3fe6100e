"""Perplexity equals a hand computation with the model's own loss; the `ppl` command prints JSON."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import build_tiny_model

from slicelm.cli import main
from slicelm.errors import SlicelmError
from slicelm.measure.perplexity import PerplexityResult, perplexity


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model("llama", seed=1)


@pytest.fixture(scope="module")
def stream() -> torch.Tensor:
    return torch.randint(0, 96, (5 * 32 + 7,), generator=torch.Generator().manual_seed(0))  # 5 windows + tail


def hand_ppl(model, ids: torch.Tensor, seqlen: int, n_windows: int) -> float:
    """exp(mean over windows of the model's own mean next-token loss), as GPTQ computes it."""
    with torch.no_grad():
        losses = [
            model(input_ids=w[None], labels=w[None]).loss.double() for w in ids[: n_windows * seqlen].split(seqlen)
        ]
    return math.exp(torch.stack(losses).mean().item())


def test_matches_hand_computation(tiny, stream):
    result = perplexity(tiny, stream, seqlen=32, progress=False)
    assert isinstance(result, PerplexityResult)
    assert (result.windows, result.tokens, result.seqlen) == (5, 5 * 31, 32)  # ragged tail dropped
    assert result.ppl == pytest.approx(hand_ppl(tiny, stream, 32, 5), rel=1e-5)
    assert result.nll == pytest.approx(math.log(result.ppl), rel=1e-12)
    assert 10 < result.ppl < 1000  # a random model on a 96-token vocabulary is near-uniform


def test_score_from_scores_only_the_later_predictions(tiny, stream):
    """llama.cpp's protocol: the first half of each window is context, the second half is scored."""
    result = perplexity(tiny, stream, seqlen=32, score_from=16, progress=False)
    assert result.tokens == 5 * 15
    with torch.no_grad():
        total = 0.0
        for w in stream[: 5 * 32].split(32):
            logp = torch.log_softmax(tiny(input_ids=w[None]).logits[0].double(), -1)
            total -= logp[16:31].gather(1, w[17:, None]).sum().item()
    assert result.ppl == pytest.approx(math.exp(total / (5 * 15)), rel=1e-5)
    with pytest.raises(SlicelmError, match="--score-from"):
        perplexity(tiny, stream, seqlen=32, score_from=31, progress=False)


def test_max_windows_takes_the_first_windows(tiny, stream):
    result = perplexity(tiny, stream, seqlen=32, max_windows=2, progress=False)
    assert (result.windows, result.tokens) == (2, 62)
    assert result.ppl == pytest.approx(hand_ppl(tiny, stream, 32, 2), rel=1e-5)
    assert perplexity(tiny, stream, seqlen=32, max_windows=99, progress=False).windows == 5


def test_batch_size_and_2d_input_do_not_change_the_result(tiny, stream):
    one = perplexity(tiny, stream, seqlen=16, progress=False)
    batched = perplexity(tiny, stream[None], seqlen=16, batch_size=3, progress=False)  # 10 windows: 3+3+3+1
    assert batched.windows == one.windows == 10
    assert batched.ppl == pytest.approx(one.ppl, rel=1e-5)


def test_restores_training_mode(stream):
    model = build_tiny_model("llama", attention_dropout=0.5).train()
    first = perplexity(model, stream, seqlen=32, progress=False)
    assert model.training  # put back as it was
    assert perplexity(model, stream, seqlen=32, progress=False).ppl == first.ppl  # dropout was off


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(seqlen=200), "fewer than one window of 200"),
        (dict(seqlen=1), "at least 2"),
        (dict(seqlen=32, max_windows=0), "at least 1"),
        (dict(seqlen=32, batch_size=0), "at least 1"),
    ],
)
def test_bad_arguments(tiny, stream, kwargs, message):
    with pytest.raises(SlicelmError, match=message):
        perplexity(tiny, stream, progress=False, **kwargs)


@pytest.mark.real_model
def test_smollm2_wikitext2_band(smollm2, data_dir):
    """SmolLM2-135M-Instruct (GGUF Q4_1, dequantised, float32), WikiText-2 test, 4 windows of 256.

    Measured 37.10. The band is [0.5x, 2x]: a broken loss, shift or tokenization is far outside.
    """
    from slicelm.io.data import load_eval_ids

    model, tokenizer = smollm2
    ids = load_eval_ids("wikitext2", tokenizer, data_dir)
    result = perplexity(model, ids, seqlen=256, max_windows=4, progress=False)
    assert result.windows == 4
    assert 18.5 < result.ppl < 74.0, result


# --- CLI ---------------------------------------------------------------------------------------------------


def test_cli_unknown_dataset_is_one_line(capsys):
    assert main(["ppl", "smollm2-135m", "--dataset", "wikitext103"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slicelm: error: unknown dataset 'wikitext103'") and err.count("\n") == 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--seqlen", "1"], "--seqlen must be at least 2"),
        (["--max-windows", "0"], "--max-windows must be at least 1"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--dtype", "float8"], "unknown dtype"),
        (["--data-dir", "/no/such/dir"], "does not exist"),
    ],
)
def test_cli_bad_flags(capsys, flags, message):
    assert main(["ppl", "smollm2-135m", *flags]) == 2
    assert message in capsys.readouterr().err


@pytest.fixture
def tiny_model_dir(tmp_path, smollm2_tokenizer):
    """A tiny random Llama with SmolLM2's vocabulary, saved with the tokenizer as a normal HF folder."""
    model = build_tiny_model("llama", vocab_size=len(smollm2_tokenizer))
    model.save_pretrained(tmp_path)
    smollm2_tokenizer.save_pretrained(tmp_path)
    return tmp_path


def test_cli_prints_json(tiny_model_dir, data_dir, capsys):
    argv = ["ppl", str(tiny_model_dir), "--dataset", "wikitext2", "--seqlen", "64", "--max-windows", "2"]
    assert main([*argv, "--data-dir", str(data_dir)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dataset"] == "wikitext2" and report["model"] == str(tiny_model_dir)
    assert (report["seqlen"], report["windows"], report["tokens"]) == (64, 2, 126)
    assert math.isfinite(report["ppl"]) and report["ppl"] > 1


def test_cli_seqlen_longer_than_model(tiny_model_dir, data_dir, capsys):
    argv = ["ppl", str(tiny_model_dir), "--seqlen", "256", "--data-dir", str(data_dir)]  # model has 128
    assert main(argv) == 2
    assert "longer than the model's 128 positions" in capsys.readouterr().err
