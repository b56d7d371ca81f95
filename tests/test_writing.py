import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sve_cli import checkpoint, writing
from sve_cli.errors import SveError


@pytest.mark.parametrize("text,expected", [("500MB", 500_000_000), ("2GB", 2_000_000_000),
                                           ("1GiB", 1 << 30), ("20KB", 20_000), ("123", 123)])
def test_parse_size(text, expected):
    assert writing.parse_size(text) == expected


def test_parse_size_rejects_nonsense():
    with pytest.raises(SveError, match="cannot read size"):
        writing.parse_size("lots")


def test_plan_shards_respects_the_limit_and_hf_names():
    sizes = [(f"t{i}", 40) for i in range(5)]
    shards = writing.plan_shards(sizes, 100, prefix="model")
    assert [s.filename for s in shards] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert [s.names for s in shards] == [["t0", "t1"], ["t2", "t3"], ["t4"]]
    assert all(s.nbytes <= 100 for s in shards)
    single = writing.plan_shards(sizes, 10**6, prefix="model", single_name="model.safetensors")
    assert [s.filename for s in single] == ["model.safetensors"]
    oversized = writing.plan_shards([("big", 500), ("small", 1)], 100, prefix="model")
    assert [s.names for s in oversized] == [["big"], ["small"]]  # a tensor is never split


def test_writer_files_are_native_and_atomic(tmp_path, monkeypatch):
    target = tmp_path / "model.safetensors"
    writing.save_safetensors(target, {"a": torch.ones(3)}, {"note": "first"})
    with safe_open(str(target), "pt") as handle:
        assert handle.metadata() == {"format": "pt", "note": "first"}

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(writing, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        writing.save_safetensors(target, {"a": torch.zeros(3)}, {})
    assert torch.equal(load_file(target)["a"], torch.ones(3))  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary left


def test_shard_writer_streams_and_commits_with_final_metadata(tmp_path):
    shards = writing.plan_shards([("a", 12), ("b", 12)], 12, prefix="model")
    with writing.ShardWriter(tmp_path) as writer:
        for number, shard in enumerate(shards):
            writer.begin(shard.filename, [(n, torch.float32, (3,)) for n in shard.names], {"score": "0.00"})
            for name in shard.names:
                writer.add(name, torch.full((3,), float(number)))
            assert not (tmp_path / shard.filename).exists()  # invisible until committed
            writer.commit({"score": f"{number + 0.5:.2f}"})
    writing.write_index(tmp_path / "model.safetensors.index.json",
                     {name: s.filename for s in shards for name in s.names}, 24)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    reopened = checkpoint.open_checkpoint(str(tmp_path))
    assert reopened.names == ["a", "b"] and len(set(reopened.files.values())) == 2
    assert torch.equal(reopened.read("b"), torch.full((3,), 1.0))
    with safe_open(str(tmp_path / shards[1].filename), "pt") as handle:
        assert handle.metadata() == {"format": "pt", "score": "1.50"}
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 24


def test_shard_writer_refuses_layout_violations_and_drops_unfinished_shards(tmp_path):
    with writing.ShardWriter(tmp_path) as writer:
        writer.begin("x.safetensors", [("a", torch.float32, (3,)), ("b", torch.float32, (2,))], {})
        with pytest.raises(ValueError, match="expects a"):
            writer.add("b", torch.zeros(2))
        writer.add("a", torch.zeros(3))
        with pytest.raises(ValueError, match="missing b"):
            writer.commit()
        with pytest.raises(ValueError, match="expects b"):
            writer.add("b", torch.zeros(5))
    assert list(tmp_path.iterdir()) == []  # the unfinished temporary is removed, nothing visible


def test_own_writer_is_read_by_safetensors_and_deterministic(tmp_path):
    tensors = {"b.weight": torch.randn(3, 5).bfloat16(), "a.scalar": torch.tensor(2.5),
               "c.ids": torch.arange(7), "d.mask": torch.tensor([True, False]), "e.empty": torch.zeros(0, 4),
               "f.half": torch.randn(2, 3, 4).half()}
    writing.save_safetensors(tmp_path / "one.safetensors", tensors, {"z": "1", "a": "2"})
    writing.save_safetensors(tmp_path / "two.safetensors", dict(reversed(tensors.items())), {"a": "2", "z": "1"})
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "two.safetensors").read_bytes()
    loaded = load_file(tmp_path / "one.safetensors")
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)
    with safe_open(str(tmp_path / "one.safetensors"), "pt") as handle:
        assert handle.metadata() == {"format": "pt", "a": "2", "z": "1"}
