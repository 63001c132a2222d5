"""LoRA-SB layer, injection, exactness of averaging, merge, export, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import tiny_bert, tiny_llama
from fedsb_dp.adapters import (
    LayerFactors,
    SBConfig,
    SBLinear,
    export_peft_adapter,
    find_target_modules,
    frozen_fingerprint,
    inject_adapters,
    load_sb_adapter,
    load_trainable_state,
    random_orthonormal_init,
    save_merged,
    save_sb_adapter,
    save_trainable_state,
    sb_layers,
    trainable_state,
    w0_svd_init,
)
from fedsb_dp.adapters.lora import inject_lora, lora_layers
from fedsb_dp.errors import AdapterMismatchError, ConfigError, ModelStructureError


def _adapt(model, *, rank=4, targets=("query", "value"), train_head=True, seed=0,
           train_pooler=False):
    config = SBConfig(rank=rank, target_modules=targets, train_head=train_head,
                      train_pooler=train_pooler)
    found = find_target_modules(model, config.target_modules, rank=rank)
    init = random_orthonormal_init(found, rank=rank, seed=seed)
    # A non-zero R so the adapter path contributes.
    generator = torch.Generator().manual_seed(seed + 1)
    factors = {n: LayerFactors(f.B, torch.randn(rank, rank, generator=generator), f.A)
               for n, f in init.factors.items()}
    inject_adapters(model, factors, config)
    return config


def test_forward_equals_matrix_formula():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    B, R, A = torch.randn(5, 3), torch.randn(3, 3), torch.randn(3, 6)
    layer = SBLinear(base, B=B, R=R, A=A, scaling=0.7)
    x = torch.randn(4, 7, 6)
    expected = x @ (base.weight + 0.7 * B @ R @ A).T + base.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.get_delta_weight(), 0.7 * B @ R @ A)


@pytest.mark.parametrize("init", ["random", "w0"])
def test_factors_orthonormal(init):
    model = tiny_bert()
    targets = find_target_modules(model, ("query", "value"), rank=8)
    result = (random_orthonormal_init(targets, rank=8, seed=3) if init == "random"
              else w0_svd_init(targets, rank=8))
    for f in result.factors.values():
        torch.testing.assert_close(f.B.T @ f.B, torch.eye(8), atol=1e-6, rtol=0)
        torch.testing.assert_close(f.A @ f.A.T, torch.eye(8), atol=1e-6, rtol=0)


def test_random_orthonormal_differs_per_layer_and_is_seeded():
    model = tiny_bert()
    targets = find_target_modules(model, ("query", "value"), rank=4)
    first = random_orthonormal_init(targets, rank=4, seed=11)
    again = random_orthonormal_init(targets, rank=4, seed=11)
    bs = [f.B for f in first.factors.values()]
    assert all(not torch.equal(bs[0], b) for b in bs[1:])
    for name in first.factors:
        assert torch.equal(first.factors[name].B, again.factors[name].B)


def test_isometry_of_r_to_delta_w():
    model = tiny_bert()
    targets = find_target_modules(model, ("query",), rank=6)
    f = next(iter(random_orthonormal_init(targets, rank=6, seed=0).factors.values()))
    x = torch.randn(6, 6)
    assert torch.linalg.norm(f.B @ x @ f.A) == pytest.approx(torch.linalg.norm(x).item(), rel=1e-5)


def test_averaging_r_is_exact():
    torch.manual_seed(0)
    B, A = torch.linalg.qr(torch.randn(10, 4))[0], torch.linalg.qr(torch.randn(12, 4))[0].T
    rs = [torch.randn(4, 4) for _ in range(5)]
    p = torch.tensor([0.1, 0.3, 0.2, 0.25, 0.15])
    mean_of_products = sum(pi * B @ r @ A for pi, r in zip(p, rs, strict=True))
    product_of_mean = B @ sum(pi * r for pi, r in zip(p, rs, strict=True)) @ A
    torch.testing.assert_close(mean_of_products, product_of_mean, atol=1e-5, rtol=1e-5)


def test_only_r_and_head_train_chosen_by_structure():
    model = tiny_bert()
    _adapt(model, train_head=True)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {f"{n}.R.weight" for n in sb_layers(model)} | {
        "classifier.weight", "classifier.bias"}
    model2 = tiny_bert()
    _adapt(model2, train_head=False)
    names2 = {n for n, p in model2.named_parameters() if p.requires_grad}
    assert names2 == {f"{n}.R.weight" for n in sb_layers(model2)}
    assert len(sb_layers(model)) == 4  # 2 layers × (query, value)
    # B and A are buffers, never parameters.
    assert not any("lora_sb" in n for n, _ in model.named_parameters())


def test_pooler_trains_with_the_head_when_asked():
    model = tiny_bert()
    _adapt(model, train_pooler=True)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"bert.pooler.dense.weight", "bert.pooler.dense.bias"} <= names
    with pytest.raises(ConfigError, match="train_pooler=True needs train_head=True"):
        SBConfig(train_head=False, train_pooler=True)


def test_merge_unmerge_restores_and_matches():
    model = tiny_bert().eval()
    _adapt(model)
    before = {n: m.base_layer.weight.clone() for n, m in sb_layers(model).items()}
    x = torch.randint(0, 100, (3, 9))
    out = model(input_ids=x).logits
    for layer in sb_layers(model).values():
        layer.merge(safe_merge=True)
    torch.testing.assert_close(model(input_ids=x).logits, out, atol=1e-5, rtol=1e-5)
    for layer in sb_layers(model).values():
        layer.unmerge()
    for n, layer in sb_layers(model).items():
        torch.testing.assert_close(layer.base_layer.weight, before[n], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="not merged"):
        next(iter(sb_layers(model).values())).unmerge()


def test_causal_lm_adapters():
    model = tiny_llama()
    config = SBConfig(rank=4, train_head=False)
    targets = find_target_modules(model, config.resolved_targets(model.config.model_type), rank=4)
    assert len(targets) == 2 * 7
    inject_adapters(model, w0_svd_init(targets, rank=4).factors, config)
    ids = torch.randint(0, 120, (2, 10))
    out = model(input_ids=ids).logits
    assert out.shape == (2, 10, 120)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 14 and all(n.endswith(".R.weight") for n in trainable)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_trainable_state_roundtrip_and_checks(tmp_path):
    model = tiny_bert()
    _adapt(model, seed=0)
    path = str(tmp_path / "state.safetensors")
    save_trainable_state(model, path)
    other = tiny_bert()
    _adapt(other, seed=0)
    for p in other.parameters():
        if p.requires_grad:
            p.data.zero_()
    load_trainable_state(other, path)
    for (n1, t1), (n2, t2) in zip(trainable_state(model).items(),
                                  trainable_state(other).items(), strict=True):
        assert n1 == n2 and torch.equal(t1, t2)
    different_factors = tiny_bert()
    _adapt(different_factors, seed=5)
    with pytest.raises(AdapterMismatchError, match="different frozen factors"):
        load_trainable_state(different_factors, path)
    other_rank = tiny_bert()
    _adapt(other_rank, rank=3, seed=0)
    with pytest.raises(AdapterMismatchError):
        load_trainable_state(other_rank, path)


def test_fingerprint_detects_one_bit_change():
    model = tiny_bert()
    _adapt(model)
    fp = frozen_fingerprint(model)
    layer = next(iter(sb_layers(model).values()))
    layer.lora_sb_B[0, 0] = torch.nextafter(layer.lora_sb_B[0, 0], torch.tensor(2.0))
    assert frozen_fingerprint(model) != fp


def test_fingerprint_scopes_shared_factors_or_every_frozen_tensor():
    model = tiny_bert()
    _adapt(model)
    shared, everything = frozen_fingerprint(model), frozen_fingerprint(model, scope="all")
    assert shared != everything
    embedding = model.bert.embeddings.word_embeddings.weight  # frozen, not an adapter factor
    assert not embedding.requires_grad
    with torch.no_grad():
        embedding[0, 0] += 1.0
    assert frozen_fingerprint(model) == shared  # clients need not agree on it by hash
    assert frozen_fingerprint(model, scope="all") != everything  # but training must not move it
    with pytest.raises(ConfigError, match="scope='base' is not one of"):
        frozen_fingerprint(model, scope="base")


def test_sb_adapter_save_load(tmp_path):
    model = tiny_bert().eval()
    config = _adapt(model)
    x = torch.randint(0, 100, (2, 7))
    out = model(input_ids=x).logits
    save_sb_adapter(model, str(tmp_path), config, base_model="tiny")
    fresh = tiny_bert().eval()
    with torch.no_grad():
        fresh.classifier.weight.add_(1.0)  # the head must come from the file
    load_sb_adapter(fresh, str(tmp_path))
    torch.testing.assert_close(fresh(input_ids=x).logits, out)


def test_peft_export_matches_outputs_on_minilm(minilm, tmp_path):
    from peft import PeftModel

    from fedsb_dp.models import load_model

    model = minilm.model.eval()
    config = _adapt(model, rank=8, train_pooler=True)
    with torch.no_grad():  # a trained pooler must travel with the export
        model.bert.pooler.dense.bias.add_(0.5)
    batch = minilm.tokenizer(["a gripping, beautiful film", "dull"], padding=True,
                             return_tensors="pt")
    with torch.no_grad():
        ours = model(**batch).logits
    export_peft_adapter(model, str(tmp_path / "peft"), base_model=minilm.resolved_path)
    # A different head, which the export must override.
    base = load_model(head_seed=123, pooling="cls").model.eval()
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        theirs = loaded(**batch).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert config.rank == 8
    # Merged export: a plain transformers model with the same outputs.
    save_merged(model, str(tmp_path / "merged"), minilm.tokenizer)
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, ours, atol=1e-5, rtol=1e-5)
    assert sb_layers(model)  # the live model keeps its adapters


@pytest.mark.parametrize("rank", [0, -1, 33])
def test_bad_rank(rank):
    model = tiny_bert()  # 32×32 layers
    with pytest.raises(ConfigError, match=f"rank={rank}"):
        find_target_modules(model, ("query",), rank=rank) if rank > 0 else SBConfig(rank=rank)


def test_rank_message_names_range():
    with pytest.raises(ModelStructureError, match=r"valid range is 1\.\.32"):
        find_target_modules(tiny_bert(), ("query",), rank=33)
    model = tiny_bert()  # the LoRA baselines' injection checks the same way, before any change
    targets = find_target_modules(model, ("query",))
    with pytest.raises(ModelStructureError, match=r"rank=33 does not fit .*valid range is 1\.\.32"):
        inject_lora(model, targets, rank=33, scaling=1.0, generator=torch.Generator())
    assert not lora_layers(model)


def test_unknown_target_lists_available():
    with pytest.raises(ModelStructureError, match="'q_proj' matches no layer.*query"):
        find_target_modules(tiny_bert(), ("q_proj",))


def test_target_matching_non_linear():
    with pytest.raises(ModelStructureError, match="LayerNorm"):
        find_target_modules(tiny_bert(), ("attention.output.LayerNorm",))


def test_substring_is_not_a_match():
    # "uery" is a substring of "query" but not a dotted component.
    with pytest.raises(ModelStructureError):
        find_target_modules(tiny_bert(), ("uery",))


def test_model_without_default_targets():
    from fedsb_dp.adapters import default_targets

    with pytest.raises(ConfigError, match="model_type='t5'"):
        default_targets("t5")


def test_config_json_roundtrip_and_validation():
    config = SBConfig(rank=5, target_modules=("query",), dropout=0.1, scaling=2.0)
    assert SBConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="dropout=1.5"):
        SBConfig(dropout=1.5)
    with pytest.raises(ConfigError, match="unknown SBConfig keys"):
        SBConfig.from_dict({"rank": 2, "alpha": 3})
