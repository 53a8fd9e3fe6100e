"""Distillation against the teacher's top-k next tokens (``--kd-top-k``): the loss, its cache, the command."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_model
from test_finetune import (
    CONFIG,
    FT,
    sliced_tiny,
    tiny_sliced_folder,  # noqa: F401 (the fixture, found here by name)
    windows,
)

from slicelm.cli import main
from slicelm.recover.config import FinetuneConfig
from slicelm.recover.loop import train
from slicelm.recover.losses import Head, kd_loss, kd_top_k_loss, top_k
from slicelm.recover.teacher import TeacherTopK


def random_problem(dtype: torch.dtype, vocab: int = 13, seed: int = 0):
    """Student hidden states (2, 7, 5) with a head (vocab, 5) + bias, teacher hidden states (2, 7, 4) with
    a head (vocab, 4), and a mask with 2 padded positions."""
    gen = torch.Generator().manual_seed(seed)
    h, w, b = (
        torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_() for shape in [(2, 7, 5), (vocab, 5), (vocab,)]
    )
    ht, wt = torch.randn(2, 7, 4, generator=gen, dtype=dtype), torch.randn(vocab, 4, generator=gen, dtype=dtype)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    return h, w, b, ht, wt, mask


@pytest.mark.parametrize("k", [13, 50])  # the vocabulary, and more than it (kept whole)
def test_top_k_at_the_vocabulary_is_the_exact_kd_loss_and_gradient(k):
    h, w, b, ht, wt, mask = random_problem(torch.float32)
    teacher = top_k(ht[mask], Head(wt), k, 2.0, rows=3)
    assert teacher.ids.shape == (12, 13) and teacher.ids.dtype == torch.int32
    assert torch.isneginf(teacher.log_tail).all()  # nothing is left outside the top k
    got = kd_top_k_loss(h, teacher, mask, 2.0, student_head=Head(w, b), rows=3)
    exact = kd_loss(h, ht, mask, 2.0, student_head=Head(w, b), teacher_head=Head(wt), rows=3)
    assert exact.item() > 0.1 and abs(got.item() - exact.item()) <= 1e-5 * exact.item()
    for g, e in zip(torch.autograd.grad(got, (h, w, b)), torch.autograd.grad(exact, (h, w, b)), strict=True):
        assert ((g - e).norm() / e.norm()).item() <= 1e-5


def _collapsed_reference(h, w, b, ht, wt, mask, k, temperature):
    """The top-k loss written directly with autograd in float64: KL over the teacher's top k + one tail bucket."""
    s, t = (h @ w.T + b)[mask] / temperature, (ht @ wt.T)[mask] / temperature
    log_p, log_q = F.log_softmax(t, -1), F.log_softmax(s, -1)
    top, ids = log_p.topk(k, -1)
    log_q_top = log_q.gather(1, ids)
    p_tail, q_tail = 1 - top.exp().sum(-1), 1 - log_q_top.exp().sum(-1)
    kl = (top.exp() * (top - log_q_top)).sum(-1) + p_tail * (p_tail.log() - q_tail.log())
    return kl.mean() * temperature**2


def test_top_k_with_a_small_k_is_its_kl_and_descends_like_the_exact_loss():
    h, w, b, ht, wt, mask = random_problem(torch.float64, vocab=50, seed=1)
    teacher = top_k(ht[mask], Head(wt), 4, 1.5, rows=5)
    assert teacher.ids.shape == (12, 4) and (teacher.log_tail < 0).all()
    got = kd_top_k_loss(h, teacher, mask, 1.5, student_head=Head(w, b), rows=5)
    reference = _collapsed_reference(h, w, b, ht, wt, mask, 4, 1.5)
    exact = kd_loss(h, ht, mask, 1.5, student_head=Head(w, b), teacher_head=Head(wt), rows=5)
    assert torch.isfinite(got) and 0 <= got.item() <= exact.item()  # collapsing outcomes never raises a KL
    assert abs(got.item() - reference.item()) <= 1e-10 * reference.item()
    grads = [torch.autograd.grad(loss, (h, w, b)) for loss in (got, reference, exact)]
    for g, r, e in zip(*grads, strict=True):
        assert ((g - r).norm() / r.norm()).item() <= 1e-10  # the hand-written gradient is the KL's
        assert F.cosine_similarity(g.flatten(), e.flatten(), dim=0).item() > 0


def test_top_k_loss_stays_finite_when_the_student_leaves_no_mass_outside_the_top_k():
    teacher = top_k(torch.tensor([[0.0, 0.0, 0.0]]), Head(torch.eye(3)), 1, 1.0)  # tail 2/3
    student = torch.tensor([[[0.0, -200.0, -200.0]]], requires_grad=True)  # tail e^-200: underflows in float32
    loss = kd_top_k_loss(student, teacher, torch.ones(1, 1, dtype=torch.bool), 1.0)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(loss) and loss.item() > 10 and torch.isfinite(grad).all()


def test_kd_top_k_without_kd_or_below_one_is_one_line(tmp_path, capsys):
    for extra, message in (
        (["--loss", "lm", "--kd-top-k", "8"], "--kd-top-k is only used by --loss kd, not --loss lm"),
        (["--kd-top-k", "0"], "--kd-top-k must be a positive integer"),
    ):
        code = main(["finetune", str(tmp_path / "model"), "--out", str(tmp_path / "out"), "--quiet", *extra])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2 and len(err) == 1 and err[0].startswith("slicelm: error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_training_with_top_k_at_the_vocabulary_trains_the_exact_run():
    """The cache lines up with the batches: k = vocabulary (96) trains the weights of the exact loss."""
    teacher = build_tiny_model("llama", seed=3, tie_word_embeddings=True)
    data, heldout = windows(48), windows(2, seed=2)
    results = []
    for k in (None, 96):
        config = FinetuneConfig(loss="kd", lora_rank=4, kd_top_k=k, grad_accum=2, **(CONFIG | {"steps": 6}))
        model, report = train(sliced_tiny(), data, heldout, config, teacher=teacher, progress=False)
        results.append((model.state_dict(), report))
    (exact, exact_report), (topk, topk_report) = results
    assert topk_report.teacher_top_k["batches"] == 12 and topk_report.teacher_top_k["bytes"] == 12 * 4 * 23 * 772
    assert exact_report.teacher_top_k == {}
    for a, b in zip(exact_report.curve, topk_report.curve, strict=True):
        assert abs(a["heldout_kd"] - b["heldout_kd"]) <= 1e-5 * a["heldout_kd"]
    for key in exact:
        torch.testing.assert_close(topk[key], exact[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("damage", [False, True])
def test_top_k_resume_reads_the_cache_and_equals_an_uninterrupted_run(tmp_path, damage):
    """Interrupted at step 5 (first checkpoint at 3): the resumed run reads the teacher's top k of steps
    5..11 from the work folder and runs the teacher only on the held-out windows; a damaged cache file is
    computed again. Either way the weights are the uninterrupted run's."""
    teacher = build_tiny_model("llama", seed=3, tie_word_embeddings=True)
    config = FinetuneConfig(loss="kd", lora_rank=8, kd_top_k=8, checkpoint_every=3, **CONFIG)
    data, heldout = windows(48), windows(2, seed=2)
    uninterrupted, _ = train(sliced_tiny(), data, heldout, config, teacher=teacher, progress=False)
    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        train(sliced_tiny(), data, heldout, config, teacher=teacher, work_dir=work, progress=False, stop_after=5)
    cache = work / TeacherTopK.FILE
    assert cache.is_file()
    if damage:
        cache.write_bytes(cache.read_bytes()[:100])
    calls = []
    hook = teacher.register_forward_hook(lambda *_: calls.append(1))
    try:
        resumed, report = train(
            sliced_tiny(), data, heldout, config, teacher=teacher, work_dir=work, resume=True, progress=False
        )
    finally:
        hook.remove()
    assert report.resumed_from == 5
    assert report.teacher_top_k["loaded"] == (0 if damage else 7) and report.teacher_top_k["batches"] == 7
    assert len(calls) == 1 + (7 if damage else 0)  # the held-out batch, and the batches not read from disk
    expected, got = uninterrupted.state_dict(), resumed.state_dict()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7, msg=key)


def test_finetune_cli_with_top_k_interrupted_then_resumed(request, tmp_path, data_dir, capsys, monkeypatch):
    """The command: 4 steps, a checkpoint every step; interrupted after 2, the resumed run reads the other
    2 micro-batches' top k from the work folder, and the report records it."""
    import json

    from slicelm.recover import recovery

    _, sliced = request.getfixturevalue("tiny_sliced_folder")
    out = tmp_path / "recovered"
    argv = ["finetune", str(sliced), "--out", str(out), "--data-dir", str(data_dir), "--kd-top-k", "16", *FT]
    original = recovery.train
    monkeypatch.setattr(recovery, "train", lambda *a, **k: original(*a, **k, stop_after=2))
    assert main(argv) == 130
    assert (tmp_path / "recovered.slicelm-work" / TeacherTopK.FILE).is_file()
    monkeypatch.setattr(recovery, "train", original)
    assert main([*argv, "--resume"]) == 0, capsys.readouterr().err[-2000:]
    report = json.loads((out / "slicelm_report.json").read_text())["finetune"]
    assert report["config"]["kd_top_k"] == 16 and report["resumed_from"] == 2
    assert report["teacher_top_k"]["loaded"] == report["teacher_top_k"]["batches"] == 2
    assert not (tmp_path / "recovered.slicelm-work").exists()
