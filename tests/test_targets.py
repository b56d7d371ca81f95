import pytest

from sve_cli.checkpoint import open_checkpoint
from sve_cli.errors import TargetError
from sve_cli.targets import resolve_targets


def _names(path, spec=None):
    return [t.name for t in resolve_targets(open_checkpoint(str(path)), spec)]


def _layer_roles(names, layer_marker):
    return sorted(name.split(layer_marker, 1)[1] for name in names if f"{layer_marker}" in name
                  and name.split(layer_marker, 1)[1].startswith("0."))


def test_llama_preset_is_the_seven_projections(tiny_checkpoints):
    names = _names(tiny_checkpoints["llama"])
    assert len(names) == 2 * 7
    assert _layer_roles(names, "layers.") == sorted(
        f"0.{part}.weight" for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                        "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
    assert not any("embed" in n or "norm" in n or "lm_head" in n for n in names)


def test_bert_preset_is_the_six_dense_layers(tiny_checkpoints):
    names = _names(tiny_checkpoints["bert"])
    assert len(names) == 2 * 6
    assert _layer_roles(names, "layer.") == sorted(
        f"0.{part}.weight" for part in ("attention.self.query", "attention.self.key",
                                        "attention.self.value", "attention.output.dense",
                                        "intermediate.dense", "output.dense"))
    assert not any("pooler" in n or "classifier" in n or "embeddings" in n for n in names)


def test_vit_preset(tiny_checkpoints):
    names = _names(tiny_checkpoints["vit"])
    assert len(names) == 2 * 6 and not any("patch" in n or "classifier" in n for n in names)


def test_attention_and_mlp_parts_partition_the_preset(tiny_checkpoints):
    for kind in ("llama", "bert", "vit"):
        everything = set(_names(tiny_checkpoints[kind]))
        attention, mlp = set(_names(tiny_checkpoints[kind], "attention")), set(_names(tiny_checkpoints[kind], "mlp"))
        assert attention and mlp and not attention & mlp and attention | mlp == everything
        assert set(_names(tiny_checkpoints[kind], kind)) == everything  # architecture name = its preset


def test_globs_and_exclusions(tiny_checkpoints):
    names = _names(tiny_checkpoints["llama"], "*.q_proj.weight,*.v_proj.weight,!*.layers.1.*")
    assert names == ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"]


def test_a_block_range_keeps_the_preset_of_those_blocks(tiny_checkpoints):
    everything = _names(tiny_checkpoints["llama"])
    upper = _names(tiny_checkpoints["llama"], "all@1-")
    assert upper == [name for name in everything if ".layers.1." in name] and len(upper) == 7
    assert _names(tiny_checkpoints["llama"], "attention@0-0") == _names(tiny_checkpoints["llama"], "*.layers.0.self_attn.*")
    assert _names(tiny_checkpoints["llama"], "*.q_proj.weight@1-") == ["model.layers.1.self_attn.q_proj.weight"]


def test_real_minilm_has_36_targets(minilm_path):
    assert len(_names(minilm_path)) == 36


@pytest.mark.parametrize("spec,message", [
    ("*.nothing.weight", "matches no tensor"),
    ("*.input_layernorm.weight", "only 2-D weight matrices"),
    ("!*.q_proj.weight", "no pattern to include"),
    ("attention@5-", "matches no tensor in blocks 5-"),
    ("attention@2-1", "not a block range"),
    ("attention@top", "not a block range"),
])
def test_bad_target_specs(tiny_checkpoints, spec, message):
    with pytest.raises(TargetError, match=message):
        _names(tiny_checkpoints["llama"], spec)


def test_unknown_architecture_needs_globs(tiny_checkpoints, tmp_path):
    directory = tmp_path / "mystery"
    directory.mkdir()
    (directory / "model.safetensors").write_bytes((tiny_checkpoints["bert"] / "model.safetensors").read_bytes())
    (directory / "config.json").write_text('{"model_type": "mystery"}')
    with pytest.raises(TargetError, match="model_type 'mystery' is neither known to sve nor to this transformers"):
        _names(directory)
    assert len(_names(directory, "*.query.weight")) == 2
