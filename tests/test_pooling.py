"""Mean pooling for sentence-embedding checkpoints: masked, padding-invariant, Opacus-safe."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_per_sample_gradients_match_loop
from fedsb_dp.adapters import SBConfig, find_target_modules, inject_adapters, w0_svd_init
from fedsb_dp.adapters.export import export_peft_adapter, save_merged
from fedsb_dp.errors import ConfigError, ModelStructureError
from fedsb_dp.models import MaskedMeanPooler, load_model, pooling_of


@pytest.fixture(scope="module")
def mean_minilm():
    loaded = load_model()  # auto: the packaged checkpoint declares mean pooling
    model = loaded.model
    config = SBConfig(rank=4)
    targets = find_target_modules(model, config.resolved_targets("bert"), rank=4)
    inject_adapters(model, w0_svd_init(targets, rank=4).factors, config)
    with torch.no_grad():
        for layer in targets:
            model.get_submodule(layer).R.weight.normal_(0, 0.1)
    return loaded


def test_auto_picks_mean_for_the_packaged_sentence_model(mean_minilm):
    assert isinstance(mean_minilm.model.bert.pooler, MaskedMeanPooler)
    assert pooling_of(mean_minilm.model) == "mean"
    assert pooling_of(load_model(pooling="cls").model) == "cls"
    with pytest.raises(ConfigError, match="pooling='max' is not one of"):
        load_model(pooling="max")


def test_padding_does_not_change_the_prediction(mean_minilm):
    model, tokenizer = mean_minilm.model.eval(), mean_minilm.tokenizer
    alone = tokenizer(["a good film"], return_tensors="pt")
    padded = tokenizer(["a good film", "a much longer review that forces several pad tokens"],
                       padding=True, return_tensors="pt")
    assert padded["attention_mask"][0].sum() < padded["attention_mask"].shape[1]
    with torch.no_grad():
        torch.testing.assert_close(model(**padded).logits[0], model(**alone).logits[0],
                                   atol=1e-5, rtol=1e-5)
    model.train()


def test_opacus_per_sample_gradients_under_mean_pooling(mean_minilm):
    model, tokenizer = mean_minilm.model, mean_minilm.tokenizer
    for module in model.modules():  # no dropout: loop and batch compute the same function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.train()  # Opacus records activations in train mode only
    assert_per_sample_gradients_match_loop(
        model, tokenizer, ["great", "a dull and overlong film", "fine"], [1, 0, 1])


def test_mean_pooled_models_refuse_exports_and_pooler_training(mean_minilm, tmp_path):
    with pytest.raises(ConfigError, match="mean pooler"):
        save_merged(mean_minilm.model, str(tmp_path / "merged"))
    with pytest.raises(ConfigError, match="mean pooler"):
        export_peft_adapter(mean_minilm.model, str(tmp_path / "peft"), base_model="x")
    fresh = load_model()
    config = SBConfig(rank=2, train_pooler=True)
    targets = find_target_modules(fresh.model, config.resolved_targets("bert"), rank=2)
    with pytest.raises(ModelStructureError, match="parameter-free mean pooler"):
        inject_adapters(fresh.model, w0_svd_init(targets, rank=2).factors, config)


# End-to-end runs of the real offline model: the fast subset (-m "not slow") skips them.
pytestmark = pytest.mark.slow
