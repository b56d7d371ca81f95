import json

import pandas as pd
import pytest
import torch

from sve_cli.data import Examples, build_examples, load_source, load_splits, seeded_splits
from sve_cli.pipeline import Encoded
from sve_cli.errors import SveError
from sve_cli.recipe import TaskSection


def _task(**fields):
    return TaskSection(**{"type": "text_classification", "dataset": "builtin:tweets", **fields})


def test_builtin_tweets_splits_are_fixed_and_disjoint():
    splits, names = load_splits(_task(), "test")
    assert names == ["negative", "neutral", "positive"]
    sizes = {name: len(split) for name, split in splits.items()}
    total = sum(sizes.values())
    assert 30000 < total <= 38158 and sizes["train"] == int(0.8 * total)  # 38,158 rows less repeats
    again, _ = load_splits(_task(), "test")
    assert again["validation"].texts == splits["validation"].texts  # seeded: the same every time
    assert not set(splits["test"].texts) & set(splits["train"].texts)
    assert set(splits["train"].labels.tolist()) == {0, 1, 2}


def test_split_rows_do_not_overlap():
    table = load_source("builtin:bbc_news")
    parts = seeded_splits(table, "train", "validation", "test")
    texts = {name: set(part.frame["text"]) for name, part in parts.items()}
    assert 2100 < sum(len(p.frame) for p in parts.values()) <= 2225  # 2,225 articles less duplicates
    assert not (texts["train"] & texts["test"]) and not (texts["validation"] & texts["test"])
    assert table.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert "Â£" not in " ".join(table.frame["text"])  # UTF-8 text is not read as latin-1


def test_builtin_images():
    digits = load_source("builtin:digits")
    assert digits.is_image and len(digits.frame) == 1797 and digits.frame["image"][0].shape == (8, 8)
    mnist = load_source("builtin:mnist")
    assert len(mnist.frame) == 5000 and mnist.frame["image"][0].shape == (28, 28)
    assert float(mnist.frame["image"][0].max()) <= 1.0


def test_limits_and_label_names_as_strings(tmp_path):
    rows = [{"text": f"item {i}", "label": ["cat", "dog"][i % 2]} for i in range(50)]
    path = tmp_path / "pets.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits, names = load_splits(_task(dataset=str(path), max_train_examples=10), "test")
    assert names == ["cat", "dog"] and len(splits["train"]) == 10 and len(splits["test"]) == 5
    splits, names = load_splits(_task(dataset=str(path), label_names=["dog", "cat"]), "test")
    assert names == ["dog", "cat"]
    first = splits["train"].texts[0]
    assert splits["train"].labels[0] == ["dog", "cat"].index(rows[int(first.split()[1])]["label"])


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_local_formats(tmp_path, suffix):
    frame = pd.DataFrame({"sentence": [f"s{i}" for i in range(20)], "y": [i % 3 for i in range(20)]})
    path = tmp_path / f"data{suffix}"
    {".csv": lambda: frame.to_csv(path, index=False), ".parquet": lambda: frame.to_parquet(path),
     ".jsonl": lambda: frame.to_json(path, orient="records", lines=True)}[suffix]()
    splits, names = load_splits(_task(dataset=str(path), text_field="sentence", label_field="y"), "test")
    assert names == ["0", "1", "2"] and sum(len(s) for s in splits.values()) == 20


@pytest.mark.parametrize("frame,task_fields,fragment", [
    (pd.DataFrame({"text": ["a"] * 10, "label": [0] * 9 + [7]}), {"label_names": ["x", "y"]}, "out of range"),
    (pd.DataFrame({"words": ["a"] * 10, "label": [0] * 10}), {}, "no column 'text' (task.text_field)"),
    (pd.DataFrame({"text": ["a"] * 10, "label": ["x"] * 9 + ["z"]}), {"label_names": ["x", "y"]}, "label 'z' not among the run's labels"),
    (pd.DataFrame({"text": ["a"] * 10, "label": [None] * 10}), {"label_names": ["x"]}, "have no label"),
])
def test_bad_labels_and_columns(frame, task_fields, fragment):
    from sve_cli.data import Table

    with pytest.raises(SveError, match=fragment.replace("(", "\\(").replace(")", "\\)")):
        build_examples(Table(frame), _task(**task_fields), task_fields.get("label_names", ["x"]), "where")


def test_empty_data_and_missing_split(tmp_path, monkeypatch):
    from sve_cli import data
    from sve_cli.data import Table

    with pytest.raises(SveError, match="the data set is empty"):
        build_examples(Table(pd.DataFrame({"text": [], "label": []})), _task(), ["x"], "where")
    hub_like = {name: Table(pd.DataFrame({"text": ["a", "b"], "label": [0, 1]})) for name in ("train", "validation")}
    monkeypatch.setattr(data, "load_source", lambda spec, config=None: hub_like)
    with pytest.raises(SveError, match="task.test_split: split 'test' does not exist in some/hub-set"):
        load_splits(_task(dataset="some/hub-set"), "where")
    monkeypatch.undo()
    with pytest.raises(SveError, match="does not exist"):
        load_splits(_task(dataset=str(tmp_path / "none.jsonl")), "where")
    with pytest.raises(SveError, match="unknown built-in data set"):
        load_source("builtin:imagenet")


def test_arc_schema_with_numeric_keys_renders_letters():
    from sve_cli.data import Table

    frame = pd.DataFrame({
        "question": ["Which is a planet?", "2 + 2 = ?"],
        "choices": [{"text": ["Mars", "Moon", "Sun"], "label": ["A", "B", "C"]},
                    {"text": ["3", "4", "5", "6"], "label": ["1", "2", "3", "4"]}],
        "answerKey": ["A", "2"]})
    task = TaskSection(type="multiple_choice", dataset="x", letters=list("ABCDE"))
    examples = build_examples(Table(frame), task, list("ABCD"), "arc")
    assert examples.labels.tolist() == [0, 1]
    assert examples.texts[1] == "2 + 2 = ?\nA) 3\nB) 4\nC) 5\nD) 6\nAnswer:"
    bad = frame.assign(answerKey=["Z", "2"])
    with pytest.raises(SveError, match="answerKey 'Z'"):
        build_examples(Table(bad), task, list("ABCD"), "arc")


def test_classification_posed_as_multiple_choice():
    task = TaskSection(type="multiple_choice", dataset="builtin:bbc_news", question="Which topic is this article about?",
                       max_eval_examples=3, max_train_examples=3)
    splits, names = load_splits(task, "bbc")
    assert len(names) == 5
    prompt = splits["train"].texts[0]
    assert prompt.endswith("Which topic is this article about?\nA) business\nB) entertainment\nC) politics\n"
                           "D) sports\nE) tech\nAnswer:")


def test_held_out_validation_from_train(monkeypatch):
    from sve_cli import data
    from sve_cli.data import Table

    rows = pd.DataFrame({"text": [f"t{i}" for i in range(100)], "label": [i % 2 for i in range(100)]})
    hub_like = {"train": Table(rows), "test": Table(rows.iloc[:5])}  # a hub set without validation
    monkeypatch.setattr(data, "load_source", lambda spec, config=None: hub_like)
    splits, _ = load_splits(_task(dataset="some/hub-set", validation_split="train:10%"), "where")
    assert len(splits["train"]) == 90 and len(splits["train:10%"]) == 10 and len(splits["test"]) == 5
    assert not set(splits["train"].texts) & set(splits["train:10%"].texts)


def test_encoding_pads_right_and_images_normalise(minilm_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    encoded = Encoded(Examples(torch.tensor([0, 1]), texts=["short", "a much longer sentence here"]), tokenizer, 16)
    batch = encoded.batch(torch.tensor([0, 1]))
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 7)
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0, 0]
    assert batch["input_ids"][0, 3:].eq(tokenizer.pad_token_id).all()



def test_images_without_a_processor_are_resized_and_normalised(tmp_path):
    from sve_cli.images import pixel_values

    pixels = pixel_values([torch.ones(1, 28, 28)], tmp_path, {"num_channels": 1}, image_size=8)
    images = Encoded(Examples(torch.tensor([0]), images=[torch.ones(1, 28, 28)]), pixels=pixels)
    assert images.batch(torch.tensor([0]))["pixel_values"].shape == (1, 1, 8, 8)
    assert torch.allclose(images.images, torch.ones(1, 1, 8, 8))  # (1 - 0.5) / 0.5
    rgb = pixel_values([torch.rand(1, 8, 8)], tmp_path, {"num_channels": 3, "image_size": 8}, None)
    assert rgb.shape == (1, 3, 8, 8) and torch.equal(rgb[0, 0], rgb[0, 2])  # grey repeated into RGB
    with pytest.raises(SveError, match="images differ in size"):
        pixel_values([torch.ones(1, 8, 8), torch.ones(1, 6, 6)], tmp_path, {"num_channels": 1}, None)


@pytest.mark.parametrize("processor_kind", ["vit", "dinov2"])
def test_images_go_through_the_checkpoints_own_processor(tiny_checkpoints, tmp_path, processor_kind):
    """With a preprocessor_config.json our pixel values are the processor's on the same PIL images."""
    from PIL import Image
    from transformers import AutoImageProcessor, BitImageProcessor, ViTImageProcessor

    from sve_cli.data import Table, build_examples
    from sve_cli.images import pixel_values
    from sve_cli.recipe import TaskSection

    if processor_kind == "vit":  # resize to 8×8, mean/std of ImageNet
        processor = ViTImageProcessor(size={"height": 8, "width": 8}, image_mean=[0.485], image_std=[0.229])
    else:  # DINOv2's recipe: resize the shortest edge, then centre crop
        processor = BitImageProcessor(size={"shortest_edge": 10}, crop_size={"height": 8, "width": 8},
                                      image_mean=[0.485], image_std=[0.229], do_convert_rgb=False)
    model = tmp_path / "vit"
    model.mkdir()
    for file in tiny_checkpoints["vit"].iterdir():
        (model / file.name).write_bytes(file.read_bytes())
    processor.save_pretrained(model)
    generator = torch.Generator().manual_seed(0)
    pictures = [Image.fromarray((torch.rand(12, 16, generator=generator) * 255).to(torch.uint8).numpy(), mode="L")
                for _ in range(3)]
    task = TaskSection(type="image_classification", dataset="x")
    examples = build_examples(Table(pd.DataFrame({"image": pictures, "label": [0, 1, 2]}), None, True), task,
                              ["a", "b", "c"], "test")
    import json

    ours = pixel_values(examples.images, model, json.loads((model / "config.json").read_text()), None)
    theirs = AutoImageProcessor.from_pretrained(model)([p for p in pictures], return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape == (3, 1, 8, 8)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-5)


def _split_files(folder, sizes=(("train", 30, ".csv"), ("validation", 7, ".jsonl"), ("test", 11, ".parquet"))):
    """Split files of distinct sizes and formats; each row's text names its split and position."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, count, suffix in sizes:
        frame = pd.DataFrame({"text": [f"{split} row {i}" for i in range(count)],
                              "label": [["neg", "pos"][i % 2] for i in range(count)]})
        path = folder / f"{split}{suffix}"
        if suffix == ".csv":
            frame.to_csv(path, index=False)
        elif suffix == ".jsonl":
            frame.to_json(path, orient="records", lines=True)
        else:
            frame.to_parquet(path)
        paths[split] = path
    return paths


def test_split_files_as_a_mapping_are_used_exactly_as_named(tmp_path):
    paths = _split_files(tmp_path / "data")
    task = _task(dataset={name: str(path) for name, path in paths.items()})
    splits, names = load_splits(task, "test")
    assert names == ["neg", "pos"]
    for split, count in (("train", 30), ("validation", 7), ("test", 11)):  # no 80/10/10 cut: every row, in order
        assert splits[split].texts == [f"{split} row {i}" for i in range(count)]
    # several files for one split are concatenated in the order given
    task = _task(dataset={"train": [str(paths["train"]), str(paths["test"])], "validation": str(paths["validation"]),
                          "test": str(paths["test"])})
    assert len(load_splits(task, "test")[0]["train"]) == 41


def test_a_folder_of_split_files_is_read_by_their_names(tmp_path):
    _split_files(tmp_path / "data", (("train", 20, ".csv"), ("validation", 5, ".csv"), ("test", 9, ".jsonl")))
    splits, _ = load_splits(_task(dataset=str(tmp_path / "data")), "test")
    assert {name: len(split) for name, split in splits.items()} == {"train": 20, "validation": 5, "test": 9}
    assert splits["test"].texts[0] == "test row 0"
    # renamed splits and a validation share carved out of train
    _split_files(tmp_path / "other", (("fit", 20, ".csv"), ("holdout", 9, ".csv")))
    task = _task(dataset=str(tmp_path / "other"), train_split="fit", validation_split="fit:25%", test_split="holdout")
    splits, _ = load_splits(task, "test")
    assert {name: len(split) for name, split in splits.items()} == {"fit": 15, "fit:25%": 5, "holdout": 9}


@pytest.mark.parametrize("fields,fragment", [
    ({"dataset": "FOLDER"}, "task.validation_split: split 'validation' is not among the split files ['test', 'train']"),
    ({"dataset": "FOLDER", "test_split": "data/test.csv"}, "'data/test.csv' looks like a file, but a split is a name"),
    ({"dataset": {"train": "a.csv", "test": "b.csv"}}, "hold out a share of the training split"),
    ({"dataset": {"train": "a.csv", "validation": []}}, "split 'validation' needs a file name"),
    ({"dataset": {}}, "needs at least one split"),
])
def test_split_names_are_checked_when_the_recipe_is_validated(tmp_path, fields, fragment):
    from pydantic import ValidationError

    _split_files(tmp_path / "data", (("train", 4, ".csv"), ("test", 4, ".csv")))
    fields = {key: str(tmp_path / "data") if value == "FOLDER" else value for key, value in fields.items()}
    with pytest.raises(ValidationError, match=fragment.replace("(", "\\(").replace(")", "\\)").replace("[", "\\[")
                       .replace("]", "\\]")):
        _task(**fields)


def test_labels_the_training_split_never_saw_are_named(tmp_path):
    paths = _split_files(tmp_path / "data")
    frame = pd.DataFrame({"text": ["a", "b", "c"], "label": ["sport", "neg", "tech"]})
    frame.to_csv(paths["test"].with_suffix(".csv"), index=False)
    task = _task(dataset={"train": str(paths["train"]), "validation": str(paths["validation"]),
                          "test": str(paths["test"].with_suffix(".csv"))})
    with pytest.raises(SveError, match=r"test\.csv \[test\]: labels 'sport', 'tech' not among the run's labels"):
        load_splits(task, "test")
