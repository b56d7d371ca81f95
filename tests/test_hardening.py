"""Hostile and broken inputs: one clear line, exit code 2, nothing on disk changed; no unsafe calls."""

import json
import re
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sve_cli.checkpoint import open_checkpoint
from sve_cli.errors import SveError
from sve_cli.errors import RecipeError
from sve_cli.recipe import load_recipe

from conftest import assert_one_error_line

PACKAGE = Path(__file__).resolve().parents[1] / "sve_cli"


def test_no_unsafe_calls_in_the_package():
    for path in PACKAGE.glob("*.py"):
        source = path.read_text()
        assert "torch.load(" not in source, path.name
        assert not re.search(r"\bpickle\b|(?<![.\w])eval\(|(?<![.\w])exec\(|os\.system|shell=True|subprocess", source), path.name
        for match in re.finditer(r"yaml\.load\(([^)]*)\)", source):
            assert "Loader=_StrictLoader" in match.group(1), path.name
        assert "trust_remote_code=True" not in source, path.name


def _safetensors(header: dict, data: bytes = b"", declared: int | None = None) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", declared if declared is not None else len(encoded)) + encoded + data


FORGED = {
    "header_beyond_file": _safetensors({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, declared=10**6),
    "overlapping_offsets": _safetensors({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                         "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
    "wrong_dtype_size": _safetensors({"a": {"dtype": "F64", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
    "huge_shape": _safetensors({"a": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4 * 10**12]}}, b"\0" * 8),
    "unknown_dtype": _safetensors({"a": {"dtype": "F7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
    "header_not_json": struct.pack("<Q", 5) + b"{{{{{" + b"\0" * 8,
    "empty_file": b"",
    "seven_bytes": b"\1\2\3\4\5\6\7",
    "negative_shape": _safetensors({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8),
}


def _model_dir(tmp_path, name, weights: bytes, config='{"model_type": "bert"}') -> Path:
    directory = tmp_path / name
    directory.mkdir()
    (directory / "config.json").write_text(config)
    (directory / "model.safetensors").write_bytes(weights)
    return directory


@pytest.mark.parametrize("name", sorted(FORGED))
def test_forged_safetensors(sve, tmp_path, name):
    directory = _model_dir(tmp_path, name, FORGED[name])
    result = sve("decompose", directory, "--out", tmp_path / "cache", "--targets", "*")
    assert_one_error_line(result)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("config,fragment", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "does not hold a JSON object"),
    (b"\xff\xfe{}", "is not valid JSON"),
    ("{}", "has no model_type in its config.json"),
])
def test_broken_config(sve, tiny_checkpoints, tmp_path, config, fragment):
    directory = _model_dir(tmp_path, "model", (tiny_checkpoints["bert"] / "model.safetensors").read_bytes())
    (directory / "config.json").write_bytes(config if isinstance(config, bytes) else config.encode())
    assert_one_error_line(sve("decompose", directory, "--out", tmp_path / "cache"), fragment)


@pytest.mark.parametrize("weight_map", [{"a": "/etc/passwd"}, {"a": "../../outside.safetensors"},
                                        {"a": "sub/../../x.safetensors"}, {}, "not a map"])
def test_hostile_indexes(sve, tmp_path, weight_map):
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_text('{"model_type": "bert"}')
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_one_error_line(sve("decompose", directory, "--out", tmp_path / "cache"))


def test_disk_full_keeps_the_previous_cache(sve, tiny_checkpoints, tmp_path, monkeypatch):
    from sve_cli import writing

    cache = tmp_path / "cache"
    assert sve("decompose", tiny_checkpoints["bert"], "--out", cache).code == 0
    before = {p.name: p.read_bytes() for p in cache.iterdir()}

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(cache / "decomposition.json"))

    monkeypatch.setattr(writing, "_fsync_directory", full)
    assert_one_error_line(sve("decompose", tiny_checkpoints["bert"], "--out", cache), "No space left on device")
    assert {p.name: p.read_bytes() for p in cache.iterdir() if ".tmp-" not in p.name} == before


def test_output_below_a_file_is_one_line(sve, tiny_checkpoints, tmp_path):
    (tmp_path / "file").write_text("x")
    assert_one_error_line(sve("decompose", tiny_checkpoints["bert"], "--out", tmp_path / "file" / "cache"),
                          "cannot read or write")


@pytest.mark.parametrize("content,fragment", [
    (b'{"text": "caf\xe9", "label": 0}\n', "cannot read"),
    (b'{"text": "ok", "label": 0}\n{"text": \n', "cannot read"),
])
def test_broken_data_files(content, fragment, tmp_path):
    from sve_cli.data import load_source

    (tmp_path / "data.jsonl").write_bytes(content)
    with pytest.raises(SveError, match=fragment):
        load_source(str(tmp_path / "data.jsonl"))


def test_images_of_other_modes_are_converted_or_refused(tmp_path):
    from PIL import Image

    from sve_cli.images import read_image_folder

    for mode, label in (("RGBA", "a"), ("P", "b"), ("CMYK", "c")):
        (tmp_path / label).mkdir()
        Image.new(mode, (8, 8)).save(tmp_path / label / f"x.{'png' if mode != 'CMYK' else 'jpg'}")
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(SveError, match="cannot read image"):
        read_image_folder(tmp_path)
    (tmp_path / "a" / "broken.png").unlink()
    names, images, labels = read_image_folder(tmp_path)
    assert names == ["a", "b", "c"] and labels == [0, 1, 2]
    assert [tuple(image.shape) for image in images] == [(3, 8, 8)] * 3  # RGBA, P and CMYK become RGB


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=300))
def test_fuzz_recipe_loader(tmp_path, text):
    """Random text is never a recipe (it lacks model and task): always one RecipeError line that
    names the file — never another exception, never a half-validated recipe."""
    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as raised:
        load_recipe(path)
    message = str(raised.value)
    assert "\n" not in message and message.startswith((f"{path}: ", f"recipe {path} ")), message


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200), st.integers(min_value=0, max_value=2**64 - 1))
def test_fuzz_safetensors_reader(tmp_path, payload, declared):
    directory = tmp_path / "fuzz"
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text('{"model_type": "bert"}')
    (directory / "model.safetensors").write_bytes(struct.pack("<Q", declared % 400) + payload)
    try:
        checkpoint = open_checkpoint(str(directory))
    except SveError as error:  # the usual outcome: refused in one line naming the file
        assert "model.safetensors" in str(error) and "\n" not in str(error)
        return
    for name in checkpoint.names:  # a payload that happens to parse: every tensor is what the header says
        try:
            tensor = checkpoint.read(name)
        except SveError as error:
            assert name in str(error)
            continue
        assert list(tensor.shape) == list(checkpoint.shape(name))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.text(max_size=20), st.one_of(st.text(max_size=30), st.integers(), st.none()), max_size=4))
def test_fuzz_index_reader(tmp_path, weight_map):
    directory = tmp_path / "index"
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text('{"model_type": "bert"}')
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(SveError):
        open_checkpoint(str(directory))


@pytest.fixture(scope="module")
def small_run(text_models, tmp_path_factory):
    from conftest import sentiment_file, train_run

    root = tmp_path_factory.mktemp("hardening")
    return train_run(root, "run", text_models["bert"], sentiment_file(root))


def _tokenizerless(tmp, text_models):
    folder = tmp / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((text_models["bert"] / name).read_bytes())
    return folder


def _recipe(tmp, text_models, model=None, data=None, **sections):
    from conftest import sentiment_file, write_recipe

    return write_recipe(tmp / "r.yaml", model or text_models["bert"], data or sentiment_file(tmp), **sections), \
        "--out", tmp / "run"


def _file(tmp, name, text):
    (tmp / name).write_text(text)
    return tmp / name


def _foreign_bank_run(tmp, run, text_models):
    """A run directory whose bank was trained on another base model."""
    import shutil

    from conftest import sentiment_file, train_run
    from sve_cli.recipe import load_recipe

    other = train_run(tmp, "other", text_models["bert-nodrop"], sentiment_file(tmp))
    copy = tmp / "mixed"
    shutil.copytree(run, copy)
    shutil.copy(other / "sigma_bank.safetensors", copy / "sigma_bank.safetensors")
    assert load_recipe(copy / "recipe.yaml").model.path != load_recipe(other / "recipe.yaml").model.path
    return copy


RUN_INPUTS = {  # name -> (arguments, fragment of the one error line)
    "label the head has no class for": (lambda tmp, run, tm, ck: ["train", *_recipe(
        tmp, tm, data=_file(tmp, "d.jsonl", '{"text": "a", "label": "good"}\n' * 20 + '{"text": "b", "label": "joy"}\n'),
        task={"label_names": ["good", "bad"]})], "label 'joy' not among the run's labels"),
    "bank of another base model": (lambda tmp, run, tm, ck: ["evaluate", _foreign_bank_run(tmp, run, tm)],
                                   "was trained on another base model"),
    "images as OOD set of a text run": (lambda tmp, run, tm, ck: ["evaluate", run, "--ood", "digits",
                                                                  "--report", tmp / "r"], "OOD set 'digits' holds images, but this run classifies text"),
    "empty data file": (lambda tmp, run, tm, ck: ["train", *_recipe(tmp, tm, data=_file(tmp, "e.jsonl", ""))],
                        "e.jsonl holds no rows"),
    "tokenizer missing": (lambda tmp, run, tm, ck: ["train", *_recipe(tmp, tm, model=_tokenizerless(tmp, tm))],
                          "no tokenizer beside"),
    "--set in the wrong section": (lambda tmp, run, tm, ck: ["train", *_recipe(tmp, tm), "--set", "train.members=4"],
                                   "train.members: unknown key"),
    "--set without a value": (lambda tmp, run, tm, ck: ["train", *_recipe(tmp, tm), "--set", "train.lr"],
                              "is not key.path=value"),
    "negative learning rate": (lambda tmp, run, tm, ck: ["train", *_recipe(tmp, tm), "--set", "train.lr=-1"],
                               "train.lr: a learning rate must be greater than 0"),
    "svf with four members": (lambda tmp, run, tm, ck: ["train", *_recipe(tmp, tm, ensemble={"method": "svf",
                                                                                           "members": 4})],
                              "trains one model: set members: 1"),
    "unknown representation": (lambda tmp, run, tm, ck: ["train", *_recipe(tmp, tm),
                                                         "--set", "ensemble.representation=average"],
                               "ensemble.representation"),
    "pooler on a vit": (lambda tmp, run, tm, ck: ["train", *_recipe(tmp, tm, model=ck["vit"], task={
        "type": "image_classification", "dataset": "builtin:digits", "max_train_examples": 32},
        ensemble={"representation": "pooler"})], "does not apply to a vit"),
    "evaluate a folder that is no run": (lambda tmp, run, tm, ck: ["evaluate", tmp], "is not a run directory"),
    "existing report": (lambda tmp, run, tm, ck: ["evaluate", run, "--report", _file(tmp, "x", "") and tmp],
                        "exists and is not an sve report; sve never replaces it"),
    "export of a bankless run": (lambda tmp, run, tm, ck: ["export", _bankless(tmp, run), "--format", "sigma-bank"],
                                 "has not finished an evaluation yet"),
}


def _bankless(tmp, run):
    (tmp / "bankless").mkdir()
    (tmp / "bankless" / "recipe.yaml").write_bytes((run / "recipe.yaml").read_bytes())
    return tmp / "bankless"


@pytest.mark.parametrize("name", sorted(RUN_INPUTS))
def test_bad_run_inputs_are_one_line(sve, small_run, text_models, tiny_checkpoints, tmp_path, name):
    make_args, fragment = RUN_INPUTS[name]
    before = {p: p.read_bytes() for p in small_run.rglob("*") if p.is_file()}
    assert_one_error_line(sve(*make_args(tmp_path, small_run, text_models, tiny_checkpoints)), fragment)
    assert {p: p.read_bytes() for p in small_run.rglob("*") if p.is_file()} == before  # nothing touched
