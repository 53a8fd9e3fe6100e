"""The heart of the suite: every transformation before slicing leaves the function unchanged.

fused == original, randomly rotated == original, PCA-rotated at sparsity 0 == original, for every
registered architecture, tied and untied, with randomised norms and biases and a padded batch.
"""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILY_OVERRIDES, build_tiny_model
from helpers import calibration, logits, padded_batch, relative_error

from slicelm.core.arch import REGISTRY, resolve
from slicelm.core.fuse import fuse_norms
from slicelm.modeling.modeling_slicelm import RMSN, get_module
from slicelm.slicing import SliceConfig, slice_model

TOL = 1e-4  # max |Δlogit| <= TOL * max |logit| in float32
CASES = [(t, tied) for t in sorted(REGISTRY) for tied in (False, True)]


def test_every_registered_family_has_a_tiny_config():
    assert set(REGISTRY) <= set(FAMILY_OVERRIDES), "add the new model_type to FAMILY_OVERRIDES in conftest.py"


@pytest.mark.parametrize("model_type,tied", CASES)
def test_fused_model_is_exact(model_type, tied):
    model = build_tiny_model(model_type, tie_word_embeddings=tied)
    ids, mask = padded_batch(model.config.vocab_size)
    before = logits(model, ids, mask)
    layout = resolve(model)
    fuse_norms(model, layout)
    assert isinstance(get_module(model, layout.final_norm), RMSN)
    assert all(
        isinstance(get_module(layer, p), RMSN) for layer in get_module(model, layout.layers) for p in layout.norms
    )
    assert relative_error(before, logits(model, ids, mask), mask) <= TOL


@pytest.mark.parametrize("basis", ["random", "pca"])
@pytest.mark.parametrize("model_type,tied", CASES)
def test_rotation_at_sparsity_zero_is_exact(model_type, tied, basis):
    model = build_tiny_model(model_type, tie_word_embeddings=tied)
    ids, mask = padded_batch(model.config.vocab_size)
    before = logits(model, ids, mask)
    slice_model(
        model,
        calibration(model.config.vocab_size),
        SliceConfig(sparsity=0.0, basis=basis, batch_size=3),
        progress=False,
    )
    assert relative_error(before, logits(model, ids, mask), mask) <= TOL


def test_pca_basis_is_not_the_identity():
    """Guard against a vacuous exactness test: the rotation must really change the weights."""
    model = build_tiny_model("llama")
    original = model.model.layers[0].self_attn.q_proj.weight.clone()
    slice_model(model, calibration(model.config.vocab_size), SliceConfig(sparsity=0.0), progress=False)
    rotated = model.model.layers[0].self_attn.q_proj.weight
    assert rotated.shape == original.shape
    assert (rotated - original).abs().max() > 1e-2


def test_padding_does_not_enter_the_statistics():
    """Changing the ids under padding must not change the sliced weights."""
    samples = calibration(96)
    results = []
    for pad_id in (0, 5):
        model = build_tiny_model("llama")
        slice_model(model, samples, SliceConfig(sparsity=0.25, batch_size=4), pad_token_id=pad_id, progress=False)
        results.append(model.model.layers[1].mlp.down_proj.weight.clone())
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)
