import pytest
import torch
from safetensors import safe_open

from sve_cli.bank import load_bank, read_bank_metadata, save_bank
from sve_cli.writing import save_safetensors
from sve_cli.pipeline import ensemble_for
from sve_cli.recipe import EnsembleConfig
from sve_cli.errors import SveError


def _trained(path, seed=0, targets=None, members=3):
    ensemble = ensemble_for(str(path), EnsembleConfig(members=members, targets=targets or "all"), classes=3, seed=seed)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for parameter in ensemble.trainable_parameters().values():
            parameter.add_(torch.randn(parameter.shape, generator=generator))
    return ensemble.eval()


def test_round_trip_is_exact(tiny_checkpoints, tmp_path):
    source = _trained(tiny_checkpoints["bert"], seed=1)
    save_bank(source, tmp_path / "sigma_bank.safetensors", {"label_names": ["neg", "neu", "pos"], "task": "text_classification"})
    target = _trained(tiny_checkpoints["bert"], seed=2)
    assert not torch.equal(target.head.weight, source.head.weight)
    metadata = load_bank(target, tmp_path / "sigma_bank.safetensors")
    for name, parameter in source.trainable_parameters().items():
        assert torch.equal(target.trainable_parameters()[name], parameter), name
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(source(input_ids=ids), target(input_ids=ids))
    assert metadata["label_names"] == ["neg", "neu", "pos"] and metadata["members"] == 3
    assert metadata["base_model"] == str(tiny_checkpoints["bert"]) and len(metadata["targets"]) == 12


def test_bank_file_is_small_native_safetensors(tiny_checkpoints, tmp_path):
    ensemble = _trained(tiny_checkpoints["bert"])
    save_bank(ensemble, tmp_path / "bank.safetensors")
    with safe_open(str(tmp_path / "bank.safetensors"), "pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
        assert handle.get_slice("head.weight").get_shape() == [3, 3, 32]
        assert handle.get_slice("bert.encoder.layer.0.attention.self.query.sigma").get_shape() == [3, 32]
        assert handle.get_slice("bert.encoder.layer.1.output.dense.bias").get_shape() == [3, 32]
    assert metadata["format"] == "pt" and "sve.decomposition_fingerprint" in metadata
    assert {k.rsplit(".", 1)[1] for k in keys} == {"sigma", "bias", "weight"}
    assert len([k for k in keys if k.endswith(".sigma")]) == 12


def test_bank_of_another_base_is_refused(tiny_checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    save_bank(_trained(tiny_checkpoints["bert"]), tmp_path / "bank.safetensors")
    changed = tmp_path / "bert-finetuned"  # same architecture and targets, one weight moved
    changed.mkdir()
    (changed / "config.json").write_bytes((tiny_checkpoints["bert"] / "config.json").read_bytes())
    tensors = load_file(tiny_checkpoints["bert"] / "model.safetensors")
    tensors["bert.encoder.layer.1.intermediate.dense.weight"][0, 0] += 0.1
    save_file(tensors, str(changed / "model.safetensors"), metadata={"format": "pt"})
    other = _trained(changed)
    before = {n: p.clone() for n, p in other.trainable_parameters().items()}
    with pytest.raises(SveError, match="trained on another base model"):
        load_bank(other, tmp_path / "bank.safetensors")
    assert all(torch.equal(before[n], p) for n, p in other.trainable_parameters().items())


def test_bank_with_other_targets_or_members_is_refused(tiny_checkpoints, tmp_path):
    save_bank(_trained(tiny_checkpoints["bert"], targets="attention"), tmp_path / "attention.safetensors")
    with pytest.raises(SveError, match="target sets differ"):
        load_bank(_trained(tiny_checkpoints["bert"]), tmp_path / "attention.safetensors")
    save_bank(_trained(tiny_checkpoints["bert"], members=2), tmp_path / "two.safetensors")
    with pytest.raises(SveError, match="shape"):
        load_bank(_trained(tiny_checkpoints["bert"], members=3), tmp_path / "two.safetensors")


def test_a_plain_safetensors_file_is_not_a_bank(tmp_path):
    save_safetensors(tmp_path / "plain.safetensors", {"x": torch.zeros(2)}, {})
    with pytest.raises(SveError, match="not an sve Σ bank"):
        read_bank_metadata(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(SveError, match="not a readable Σ bank"):
        read_bank_metadata(tmp_path / "junk.safetensors")
