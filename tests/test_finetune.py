"""Recovery fine-tuning: LoRA / full, next-token loss / distillation, merge, resume, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_model
from helpers import calibration, logits, padded_batch, relative_error

from slicelm.cli import main
from slicelm.recover.config import FinetuneConfig
from slicelm.recover.loop import train
from slicelm.recover.losses import kd_loss
from slicelm.recover.student import prepare_student
from slicelm.slicing import SliceConfig, slice_model


def sliced_tiny(layout: str = "slicegpt", tied: bool = True):
    model = build_tiny_model("llama", tie_word_embeddings=tied)
    slice_model(model, calibration(96), SliceConfig(sparsity=0.25, layout=layout), progress=False)
    return model


def windows(n: int, length: int = 24, seed: int = 1) -> list[torch.Tensor]:
    """Token windows with structure a tiny model can learn (a repeating pattern with noise)."""
    pattern = torch.randint(3, 96, (8,), generator=torch.Generator().manual_seed(0))  # one "language"
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        w = pattern.repeat(length // 8 + 1)[:length].clone()
        noise = torch.rand(length, generator=gen) < 0.1
        w[noise] = torch.randint(3, 96, (int(noise.sum()),), generator=gen)
        out.append(w)
    return out


CONFIG = dict(tokens=None, steps=12, seqlen=24, batch_size=4, eval_windows=2, lr=5e-3)


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("loss", ["lm", "kd"])
def test_training_reduces_the_loss(full, loss):
    teacher = build_tiny_model("llama", seed=3, tie_word_embeddings=True) if loss == "kd" else None
    config = FinetuneConfig(loss=loss, lora_rank=None if full else 8, **CONFIG)
    model, report = train(sliced_tiny(), windows(48), windows(2, seed=2), config, teacher=teacher, progress=False)
    first, last = report.curve[0], report.curve[-1]
    key = "heldout_kd" if loss == "kd" else "heldout_lm"
    assert last[key] < first[key], report.curve
    assert report.steps == 12 and report.tokens == 12 * 4 * 24
    assert not any(p.requires_grad for p in model.parameters())  # merged: a plain frozen model
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_kd_loss_is_zero_for_identical_distributions():
    logits_ = torch.randn(2, 5, 11)
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert kd_loss(logits_, logits_, mask, 1.0).abs().item() < 1e-6
    assert kd_loss(logits_, logits_, mask, 2.0).abs().item() < 1e-6
    assert kd_loss(logits_, torch.randn(2, 5, 11), mask, 1.0).item() > 0


def _reference_losses(h, w, b, ht, wt, ids, mask, temperature):
    """The unchunked losses from full float64 logits: T^2 KL(p_t || p_s) and next-token cross-entropy."""
    s, t = (h @ w.T + b).double(), (ht @ wt.T).double()
    log_p = F.log_softmax(t[mask] / temperature, -1)
    log_q = F.log_softmax(s[mask] / temperature, -1)
    kd = (log_p.exp() * (log_p - log_q)).sum(-1).mean() * temperature**2
    targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100).flatten()
    lm = F.cross_entropy(s[:, :-1].flatten(0, 1), targets, ignore_index=-100)
    return kd, lm


@pytest.mark.parametrize("dtype,bound", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_chunked_losses_equal_the_unchunked_ones_in_value_and_gradient(dtype, bound):
    """Blocks of 3 tokens (not a divisor of the 12 real ones), gradients to hidden states, head and bias."""
    from slicelm.recover.losses import Head, lm_loss

    gen = torch.Generator().manual_seed(0)
    h, w, b = (
        torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_() for shape in [(2, 7, 5), (13, 5), (13,)]
    )
    ht, wt = torch.randn(2, 7, 4, generator=gen, dtype=dtype), torch.randn(13, 4, generator=gen, dtype=dtype)
    ids = torch.randint(0, 13, (2, 7), generator=gen)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    kd_ref, lm_ref = _reference_losses(h, w, b, ht, wt, ids, mask, 2.0)
    kd = kd_loss(h, ht, mask, 2.0, student_head=Head(w, b), teacher_head=Head(wt), rows=3)
    lm = lm_loss(h, ids, mask, Head(w, b), rows=3)
    for got, expected in ((kd, kd_ref), (lm, lm_ref)):
        assert abs(got.item() - expected.item()) <= bound * expected.item()
        reference = torch.autograd.grad(expected, (h, w, b), retain_graph=True)  # kd and lm share the logits
        for g, e in zip(torch.autograd.grad(got, (h, w, b)), reference, strict=True):
            assert g.dtype == dtype and ((g - e).norm() / e.norm()).item() <= bound


@pytest.mark.parametrize("family", ["sliced", "plain", "gpt2"])
def test_training_through_the_bypassed_head_has_the_full_logits_gradient(family):
    """forward_hidden + blocked KD gives the loss and LoRA gradients of full logits + the direct KL."""
    from slicelm.recover.losses import LOGITS, forward_hidden

    model = {"sliced": sliced_tiny, "plain": lambda: sliced_tiny("plain")}.get(
        family, lambda: build_tiny_model("gpt2")
    )()
    teacher = build_tiny_model("gpt2" if family == "gpt2" else "llama", seed=3).double()  # float64: exact to 1e-9
    student = prepare_student(model.double(), FinetuneConfig(lora_rank=4)).double()
    with torch.no_grad():
        for name, param in student.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    ids, mask = padded_batch(96)
    params = [p for p in student.parameters() if p.requires_grad]
    hidden, head = forward_hidden(student, ids, mask)
    t_hidden, t_head = forward_hidden(teacher, ids, mask)
    assert head is not LOGITS and hidden.shape[-1] < 96  # the logits were never computed
    blocked = kd_loss(
        hidden[:, :-1], t_hidden[:, :-1], mask[:, 1:], 1.5, student_head=head, teacher_head=t_head, rows=5
    )
    s = student(input_ids=ids, attention_mask=mask).logits
    t = teacher(input_ids=ids, attention_mask=mask).logits.detach()
    mask_ = mask[:, 1:].bool()
    log_p, log_q = F.log_softmax(t[:, :-1][mask_] / 1.5, -1), F.log_softmax(s[:, :-1][mask_] / 1.5, -1)
    direct = (log_p.exp() * (log_p - log_q)).sum(-1).mean() * 1.5**2
    assert direct.item() > 0.01 and abs(blocked.item() - direct.item()) <= 1e-9 * direct.item()
    for g, e in zip(torch.autograd.grad(blocked, params), torch.autograd.grad(direct, params), strict=True):
        assert ((g - e).norm() / e.norm()).item() <= 1e-9


def test_kd_with_teacher_equal_to_student_has_zero_loss():
    import copy

    student = sliced_tiny()
    teacher = copy.deepcopy(student)
    config = FinetuneConfig(loss="kd", lora_rank=4, **CONFIG)
    losses = []
    _, report = train(
        student,
        windows(48),
        windows(2, seed=2),
        config,
        teacher=teacher,
        progress=False,
        on_step=lambda step, loss: losses.append(loss),
    )
    assert abs(losses[0]) < 1e-6  # the first step's loss is computed before any update
    # the held-out teacher is cached as float16 log-probabilities: zero up to their rounding
    assert report.curve[0]["heldout_kd"] < 1e-5


def test_cached_heldout_teacher_matches_the_teacher_itself():
    from slicelm.recover.loop import evaluate
    from slicelm.recover.teacher import teacher_targets

    student, teacher = sliced_tiny(), build_tiny_model("llama", seed=3, tie_word_embeddings=True)
    heldout = windows(6, seed=2)
    config = FinetuneConfig(loss="kd", temperature=2.0, **CONFIG)
    cached = evaluate(student, heldout, config, 0, "cpu", teacher_targets(teacher, heldout, config, 0, "cpu"))
    ids = torch.stack(heldout)
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        s, t = student(input_ids=ids).logits, teacher(input_ids=ids).logits
    direct = kd_loss(s[:, :-1], t[:, :-1], mask[:, 1:], 2.0).item()
    assert direct > 0.01 and abs(cached["heldout_kd"] - direct) <= 1e-3 * direct


def test_merged_model_equals_the_peft_model():
    from slicelm.recover.student import merged

    for model in (sliced_tiny(), sliced_tiny("plain"), build_tiny_model("gpt2")):
        student = prepare_student(model, FinetuneConfig(lora_rank=4))
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in student.named_parameters():
                if "lora_B" in name:  # peft starts B at zero: give the adapters something to merge
                    param.copy_(0.05 * torch.randn(param.shape, generator=gen))
        ids, mask = padded_batch(96)
        expected = logits(student, ids, mask)
        plain = merged(student)
        assert not any("lora" in n for n, _ in plain.named_parameters())
        assert relative_error(expected, logits(plain, ids, mask), mask) <= 1e-5


def test_resume_after_an_interruption_equals_an_uninterrupted_run(tmp_path):
    config = FinetuneConfig(loss="lm", lora_rank=8, checkpoint_every=3, **CONFIG)
    data, heldout = windows(48), windows(2, seed=2)
    uninterrupted, _ = train(sliced_tiny(), data, heldout, config, progress=False)
    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        train(sliced_tiny(), data, heldout, config, work_dir=work, progress=False, stop_after=5)
    assert (work / "checkpoint" / "state.safetensors").is_file()
    assert json.loads((work / "checkpoint" / "state.json").read_text())["step"] == 5
    resumed, report = train(sliced_tiny(), data, heldout, config, work_dir=work, resume=True, progress=False)
    assert report.resumed_from == 5
    expected, got = uninterrupted.state_dict(), resumed.state_dict()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7, msg=key)


def test_lora_targets_every_block_linear_and_optionally_shortcuts():
    from slicelm.recover.student import lora_targets

    model = sliced_tiny()
    names = lora_targets(model)
    assert "model.layers.0.self_attn.q_proj" in names and "model.layers.2.mlp.down_proj" in names
    assert not any("shortcut" in n for n in names) and "model.norm.proj" not in names
    more = lora_targets(model, ("shortcuts", "final"))
    assert "model.layers.1.attn_shortcut" in more and "model.norm.proj" in more
    student = prepare_student(model, FinetuneConfig(lora_rank=4))
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


# --------------------------------------------------------------------------------------------------
# The command, end to end on a tiny model with a real tokenizer
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sliced_folder(tmp_path_factory, smollm2_tokenizer, data_dir):
    root = tmp_path_factory.mktemp("ft")
    dense = root / "dense"
    model = build_tiny_model("llama", vocab_size=len(smollm2_tokenizer), tie_word_embeddings=True)
    model.save_pretrained(dense)
    smollm2_tokenizer.save_pretrained(dense)
    sliced = root / "sliced"
    argv = ["slice", dense, "--sparsity", 0.25, "--calib-samples", 4, "--calib-seqlen", 32, "--out", sliced]
    assert main([str(a) for a in [*argv, "--data-dir", data_dir, "--quiet"]]) == 0
    return dense, sliced


FT = ["--tokens", "256", "--seqlen", "32", "--batch-size", "2", "--eval-windows", "1", "--quiet", "--lr", "1e-3"]


@pytest.mark.parametrize("layout", ["slicegpt", "plain"])
def test_finetune_cli_writes_a_loadable_folder_without_peft_or_slicelm(
    tiny_sliced_folder, tmp_path, data_dir, capsys, layout
):
    dense, sliced = tiny_sliced_folder
    if layout == "plain":
        sliced = tmp_path / "plain-in"
        argv = ["slice", dense, "--sparsity", 0.25, "--layout", "plain", "--calib-samples", 4, "--calib-seqlen", 32]
        assert main([str(a) for a in [*argv, "--out", sliced, "--data-dir", data_dir, "--quiet"]]) == 0
    out = tmp_path / "recovered"
    code = main(["finetune", str(sliced), "--out", str(out), "--data-dir", str(data_dir), *FT])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["steps"] == 4 and "heldout_lm" in result
    report = json.loads((out / "slicelm_report.json").read_text())
    assert report["finetune"]["teacher"] == str(dense) and report["finetune"]["config"]["loss"] == "kd"
    assert not (tmp_path / "recovered.slicelm-work").exists()  # the work folder goes once the output is written
    ids, mask = padded_batch(96)
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["slicelm"] = None
        sys.modules["peft"] = None
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code={layout == "slicegpt"})
        with torch.no_grad():
            out = model(input_ids=torch.tensor({ids.tolist()}), attention_mask=torch.tensor({mask.tolist()})).logits
        print(json.dumps(out.tolist()))
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    from slicelm.io.models import load_model

    expected = logits(load_model(str(out))[0], ids, mask)
    assert relative_error(expected, torch.tensor(json.loads(run.stdout.strip().splitlines()[-1])), mask) <= 1e-5


def test_finetune_cli_interrupt_then_resume(tiny_sliced_folder, tmp_path, data_dir, capsys, monkeypatch):
    from slicelm.recover import recovery

    _, sliced = tiny_sliced_folder
    out = tmp_path / "recovered"
    argv = ["finetune", str(sliced), "--out", str(out), "--data-dir", str(data_dir), "--loss", "lm", *FT]
    original = recovery.train
    monkeypatch.setattr(recovery, "train", lambda *a, **k: original(*a, **k, stop_after=2))
    assert main(argv) == 130
    assert "continue with --resume" in capsys.readouterr().err
    assert not out.exists() and (tmp_path / "recovered.slicelm-work" / "checkpoint").is_dir()
    code = main(argv)  # without --resume the checkpoint is not silently discarded
    assert code == 2 and "pass --resume" in capsys.readouterr().err
    monkeypatch.setattr(recovery, "train", original)
    assert main([*argv, "--resume"]) == 0
    assert out.is_dir() and not (tmp_path / "recovered.slicelm-work").exists()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--data", "WIKITEXT2_TEST"], "contains WikiText-2 test text"),
        (["--data", "c4", "--data-dir", "EMPTY"], "c4"),
        (["--tokens", "0"], "--tokens must be a positive integer"),
        (["--teacher", "OTHER_VOCAB"], "another vocabulary"),
        (["--model", "NOT_A_MODEL"], "has no config.json"),
        (["--fsdp"], "--fsdp shards the model across processes: add --num-processes 2"),
    ],
)
def test_finetune_bad_input_is_one_line_and_writes_nothing(
    extra, message, tiny_sliced_folder, tmp_path, data_dir, capsys
):
    from conftest import build_tiny_model as build

    _, sliced = tiny_sliced_folder
    substitutions = {
        "WIKITEXT2_TEST": str(data_dir / "wikitext-2-raw" / "wiki.test.raw"),
        "EMPTY": str(tmp_path / "empty"),
    }
    (tmp_path / "empty").mkdir()
    if "OTHER_VOCAB" in extra:
        other = tmp_path / "other"
        build("llama", vocab_size=96).save_pretrained(other)
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(95)} | {"[UNK]": 95}, unk_token="[UNK]"))
        words.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]").save_pretrained(other)
        substitutions["OTHER_VOCAB"] = str(other)
    model = str(sliced)
    if "--model" in extra:
        (tmp_path / "notes").mkdir()
        model, extra = str(tmp_path / "notes"), []
    extra = [substitutions.get(a, a) for a in extra]
    argv = ["finetune", model, "--out", str(tmp_path / "out"), *FT, *extra]
    if "--data-dir" not in extra:
        argv += ["--data-dir", str(data_dir)]
    code = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and err[-1].startswith("slicelm: error: ") and message in err[-1], err[-3:]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.slicelm-work").exists()


@pytest.mark.parametrize("full", [False, True])
def test_gradient_checkpointing_gives_the_same_training(full):
    """Recomputing activations changes memory, not results."""
    data, heldout = windows(48), windows(2, seed=2)
    results = []
    for checkpointing in (False, True):
        config = FinetuneConfig(
            loss="lm", lora_rank=None if full else 8, gradient_checkpointing=checkpointing, **CONFIG
        )
        model, report = train(sliced_tiny(), data, heldout, config, progress=False)
        assert report.gradient_checkpointing is checkpointing
        results.append(model.state_dict())
    for key in results[0]:
        torch.testing.assert_close(results[1][key], results[0][key], rtol=1e-5, atol=1e-6, msg=key)


# --------------------------------------------------------------------------------------------------
# Data-parallel processes (accelerate, gloo on the CPU)
# --------------------------------------------------------------------------------------------------
def ragged(n: int, seed: int) -> list[torch.Tensor]:
    """Windows of unequal lengths: padded batches, so the processes' shares hold unequal token counts."""
    return [w[: 24 - (i % 5) * 3] for i, w in enumerate(windows(n, seed=seed))]


DDP = dict(tokens=None, steps=3, seqlen=24, batch_size=4, grad_accum=2, eval_windows=6, lr=5e-3, checkpoint_every=1)


def _interrupted_then_resumed(student, teacher, data, heldout, work, out):
    """In each of two processes: train one step, interrupted, then resume to the end; rank 0 saves the result."""
    import copy

    from slicelm.recover.parallel import Processes

    processes = Processes.from_environment("cpu")
    assert processes.world == 2 and processes.kind == "multi_cpu"
    config = FinetuneConfig(loss="kd", lora_rank=4, **DDP)
    common = dict(teacher=teacher, work_dir=work, progress=False, processes=processes)
    with pytest.raises(KeyboardInterrupt):
        train(copy.deepcopy(student), data, heldout, config, stop_after=1, **common)
    processes.barrier()  # rank 0's checkpoint is written
    model, report = train(copy.deepcopy(student), data, heldout, config, resume=True, **common)
    if processes.main:
        torch.save({"state": model.state_dict(), "report": report.to_dict()}, out)


def test_two_processes_interrupted_and_resumed_train_the_one_process_run(tmp_path):
    """2 gloo processes at the same global batch, with unequal token shares and gradient accumulation,
    interrupted after a step and resumed, give the weights and losses of one uninterrupted process."""
    import copy

    from accelerate import debug_launcher

    student = sliced_tiny().double()  # float64: the processes' other order of sums is invisible at 1e-9
    teacher = build_tiny_model("llama", seed=3, tie_word_embeddings=True).double()
    data, heldout = ragged(24, seed=1), ragged(10, seed=2)  # 3 held-out batches: 2 on rank 0, 1 on rank 1
    config = FinetuneConfig(loss="kd", lora_rank=4, **DDP)
    expected, one = train(copy.deepcopy(student), data, heldout, config, teacher=teacher, progress=False)
    out = tmp_path / "two.pt"
    debug_launcher(_interrupted_then_resumed, (student, teacher, data, heldout, tmp_path / "work", out), 2)
    two = torch.load(out)
    report = two["report"]
    assert report["processes"] == 2 and report["resumed_from"] == 1 and report["global_batch"] == 4
    per = report["tokens_per_process"]
    assert len(per) == 2 and per[0] != per[1] and sum(per) == report["tokens"] == one.tokens
    for a, b in zip(one.curve, report["curve"], strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert abs(a[key] - b[key]) <= 1e-9 * max(abs(a[key]), 1), (key, a, b)
    got = two["state"]
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(got[key], value, rtol=1e-9, atol=1e-12, msg=key)


def _sharded_interrupted_then_resumed(student, teacher, data, heldout, work, out, full):
    """As :func:`_interrupted_then_resumed`, with the student sharded by FSDP2 across the two processes."""
    import copy

    from slicelm.recover.parallel import Accelerated

    processes = Accelerated("cpu", shard=True)
    assert processes.world == 2 and processes.kind == "fsdp" and processes.sharded
    prepare, halves = processes.prepare, []

    def sharding(module, units=()):  # every weight is a DTensor of which this process holds about half
        out = prepare(module, units)
        halves.extend(p.to_local().numel() / p.numel() for p in module.parameters())
        return out

    processes.prepare = sharding
    config = FinetuneConfig(loss="lm" if full else "kd", lora_rank=None if full else 4, **DDP)
    common = dict(teacher=None if full else teacher, work_dir=work, progress=False, processes=processes)
    with pytest.raises(KeyboardInterrupt):
        train(copy.deepcopy(student), data, heldout, config, stop_after=1, **common)
    processes.barrier()  # rank 0's checkpoint is written
    model, report = train(copy.deepcopy(student), data, heldout, config, resume=True, **common)
    assert halves and all(share <= 0.5 + 1e-9 for share in halves) and max(halves) > 0.4, halves
    if processes.main:
        torch.save({"state": model.state_dict(), "report": report.to_dict()}, out)


@pytest.mark.parametrize("full", [False, True])
def test_sharded_processes_interrupted_and_resumed_train_the_one_process_run(tmp_path, full):
    """FSDP (torch's fully_shard on 2 gloo processes, each holding half of every weight): LoRA distillation,
    and full fine-tuning where the tied head/embedding trains through the loss inside the wrapped forward,
    interrupted after a step and resumed from the gathered checkpoint, give the weights and losses of one
    uninterrupted process."""
    import copy

    from accelerate import debug_launcher

    student = sliced_tiny().double()
    teacher = build_tiny_model("llama", seed=3, tie_word_embeddings=True).double()
    data, heldout = ragged(24, seed=1), ragged(10, seed=2)  # 3 held-out batches: 2 on rank 0, 1 on rank 1
    config = FinetuneConfig(loss="lm" if full else "kd", lora_rank=None if full else 4, **DDP)
    expected, one = train(
        copy.deepcopy(student), data, heldout, config, teacher=None if full else teacher, progress=False
    )
    out = tmp_path / "two.pt"
    args = (student, teacher, data, heldout, tmp_path / "work", out, full)
    debug_launcher(_sharded_interrupted_then_resumed, args, 2)
    two = torch.load(out)
    report = two["report"]
    assert report["processes"] == 2 and report["resumed_from"] == 1 and report["distributed"] == "fsdp"
    assert sum(report["tokens_per_process"]) == report["tokens"] == one.tokens
    for a, b in zip(one.curve, report["curve"], strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert abs(a[key] - b[key]) <= 1e-9 * max(abs(a[key]), 1), (key, a, b)
    got = two["state"]
    changed = 0
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(got[key], value, rtol=1e-9, atol=1e-12, msg=key)
        changed += not torch.equal(value, student.state_dict()[key])
    assert changed > 0  # it trained
    if full:  # the tied matrix trained, and the merged model keeps it tied
        emb = expected.get_input_embeddings().weight
        assert not torch.equal(emb, student.get_input_embeddings().weight)


def test_finetune_cli_on_two_processes_writes_the_one_process_result(tiny_sliced_folder, tmp_path, data_dir):
    """--num-processes 2 (accelerate's launcher, gloo) at the same global batch, data-parallel and sharded
    (--fsdp): the same merged weights (float32, up to the order of sums) and held-out losses; the report
    says how the batch was split and how the processes held the model."""
    from safetensors.torch import load_file

    _, sliced = tiny_sliced_folder
    argv = ["finetune", str(sliced), "--data-dir", str(data_dir), "--steps", "2", "--seqlen", "32"]
    argv += ["--batch-size", "2", "--eval-windows", "2", "--quiet", "--lr", "1e-3"]
    one, two, sharded = tmp_path / "one", tmp_path / "two", tmp_path / "sharded"
    assert main([*argv, "--out", str(one)]) == 0
    assert main([*argv, "--out", str(two), "--num-processes", "2"]) == 0
    assert main([*argv, "--out", str(sharded), "--num-processes", "2", "--fsdp"]) == 0
    reports = [json.loads((out / "slicelm_report.json").read_text())["finetune"] for out in (one, two, sharded)]
    assert [r["processes"] for r in reports] == [1, 2, 2] and [r["global_batch"] for r in reports] == [2, 2, 2]
    assert reports[0]["tokens_per_process"] == [128]
    assert reports[1]["tokens_per_process"] == reports[2]["tokens_per_process"] == [64, 64]
    assert [r["tokens"] for r in reports] == [128] * 3
    assert [r["distributed"] for r in reports[1:]] == ["multi_cpu", "fsdp"]
    expected = load_file(one / "model.safetensors")
    for other, out in zip(reports[1:], (two, sharded), strict=True):
        for a, b in zip(reports[0]["curve"], other["curve"], strict=True):
            for key in ("train_loss", "heldout_lm", "heldout_kd"):
                if key in a:  # a KL is a difference of cross-entropies (~10 nats here): float32 rounds there
                    assert abs(a[key] - b[key]) <= 1e-5 * max(abs(a[key]), 1), (key, a, b)
        got = load_file(out / "model.safetensors")
        assert expected.keys() == got.keys()
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
        assert not Path(f"{out}.slicelm-work").exists()


def test_resume_with_another_number_of_processes_is_refused(
    tiny_sliced_folder, tmp_path, data_dir, capsys, monkeypatch
):
    from slicelm.recover import recovery

    _, sliced = tiny_sliced_folder
    out = tmp_path / "recovered"
    argv = ["finetune", str(sliced), "--out", str(out), "--data-dir", str(data_dir), "--loss", "lm", *FT]
    original = recovery.train
    monkeypatch.setattr(recovery, "train", lambda *a, **k: original(*a, **k, stop_after=1))
    assert main(argv) == 130
    capsys.readouterr()
    state = tmp_path / "recovered.slicelm-work" / "checkpoint" / "state.json"
    before = state.read_text()
    assert json.loads(before)["processes"] == 1
    code = main([*argv, "--resume", "--num-processes", "2"])  # refused before any process starts
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("slicelm: error: --resume: the checkpoint was taken with 1 process(es)")
    assert not out.exists() and state.read_text() == before


@pytest.mark.parametrize("variable", ["FSDP_OFFLOAD_PARAMS", "FSDP_CPU_RAM_EFFICIENT_LOADING"])
def test_sharded_settings_slicelm_cannot_honour_are_refused(variable, monkeypatch):
    """accelerate's FSDP settings that the sharded path would silently get wrong are one-line refusals:
    parameter offload, and loading on rank 0 only (transformers then leaves the other ranks' weights for a
    broadcast slicelm does not do: measured, the 2-process run trained other weights)."""
    from slicelm.errors import SlicelmError
    from slicelm.recover.parallel import Accelerated

    monkeypatch.setenv(variable, "true")
    with pytest.raises(SlicelmError, match="false|offload"):
        Accelerated("cpu", shard=True)
