"""`sve init --data`: a recipe proposed from a user's own file, that `sve train` then runs."""

from __future__ import annotations

import json

import pandas as pd
import yaml

from conftest import assert_one_error_line, sentiment_file


def _reviews(directory, rows: int = 120):
    """A user's CSV: the text and label under their own names, string labels, an id column."""
    source = directory / "source"
    source.mkdir(exist_ok=True)
    frame = pd.read_json(sentiment_file(source, count=rows), lines=True)
    frame = pd.DataFrame({"id": range(rows), "review": frame["text"],
                          "sentiment": frame["label"].map({0: "negative", 1: "positive"})})
    path = directory / "reviews.csv"
    frame.to_csv(path, index=False)
    return path


def test_init_proposes_a_recipe_that_trains(sve, text_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _reviews(tmp_path)
    result = sve("init", "--data", "reviews.csv", "--model", text_models["bert"], "--out", "reviews.yaml")
    assert result.code == 0, result.stderr
    assert "text 'review', label 'sentiment' (2 classes)" in " ".join(result.stdout.split())
    recipe = yaml.safe_load((tmp_path / "reviews.yaml").read_text())
    assert recipe["task"] | {"max_length": None} == {
        "type": "text_classification", "dataset": "reviews.csv", "text_field": "review", "label_field": "sentiment",
        "validation_split": "validation", "max_length": None}
    assert 16 <= recipe["task"]["max_length"] <= 256
    header = (tmp_path / "reviews.yaml").read_text().split("model:")[0]
    assert "sve train reviews.yaml" in header and "train 96, validation 12, test 12 rows" in header
    run = sve("train", "reviews.yaml", "--set", "train.max_steps=2", "--set", "train.eval_every_steps=2")
    assert run.code == 0, run.stderr
    assert json.loads((tmp_path / "runs" / "reviews" / "trainer_state.json").read_text())["step"] == 2


def test_init_reads_split_files_and_holds_out_validation(sve, text_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "data"
    folder.mkdir()
    frame = pd.read_csv(_reviews(tmp_path))
    frame[:100].to_csv(folder / "train.csv", index=False)
    frame[100:].to_csv(folder / "test.csv", index=False)
    assert sve("init", "--data", "data", "--model", text_models["bert"]).code == 0
    recipe = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    assert recipe["task"]["dataset"] == "data" and recipe["task"]["validation_split"] == "train:10%"


def test_init_refuses_what_it_cannot_propose_and_replaces_nothing(sve, text_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _reviews(tmp_path)
    (tmp_path / "mine.yaml").write_text("my own notes\n")
    assert_one_error_line(sve("init", "--data", "reviews.csv", "--out", "mine.yaml"), "already exists")
    assert (tmp_path / "mine.yaml").read_text() == "my own notes\n"
    pd.DataFrame({"a": [1.5, 2.5, 3.5, 4.5], "b": [0.1, 0.2, 0.3, 0.4]}).to_csv(tmp_path / "numbers.csv", index=False)
    assert_one_error_line(sve("init", "--data", "numbers.csv", "--model", text_models["bert"]), "cannot tell which column")
    pd.DataFrame({"text": ["a b", "c d", "e f", "g h"] * 5, "label": ["x"] * 20}).to_csv(tmp_path / "one.csv", index=False)
    assert_one_error_line(sve("init", "--data", "one.csv", "--model", text_models["bert"]), "holds one class")
    assert_one_error_line(sve("init", "--data", "nothing.csv"), "does not exist")
    frame = pd.read_csv(tmp_path / "reviews.csv")
    frame.loc[3, "review"] = None
    frame.to_csv(tmp_path / "source" / "gaps.csv", index=False)
    noted = sve("init", "--data", tmp_path / "source" / "gaps.csv", "--model", text_models["bert"], "--out",
                tmp_path / "source" / "gaps.yaml")
    assert noted.code == 0 and "note: 1 row(s)" in noted.stdout and "have no 'review'" in noted.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.yaml", "numbers.csv", "one.csv", "reviews.csv", "source"]


def _pairs(directory, rows: int = 120):
    """A user's prompt → answer CSV: every answer its own text, so the 'answer' column is no label."""
    words = [f"{colour} {thing}" for colour in ("red", "blue", "green", "black", "white", "grey")
             for thing in ("cat", "dog", "owl", "fox", "hen", "elk", "bee", "ant", "yak", "emu")]
    frame = pd.DataFrame({"id": range(rows), "prompt": [f"Say {words[i % 60]} twice, item {i}:" for i in range(rows)],
                          "answer": [f"{words[i % 60]} {words[i % 60]} {i}" for i in range(rows)]})
    path = directory / "pairs.csv"
    frame.to_csv(path, index=False)
    return path


def test_init_proposes_generation_for_prompt_answer_pairs(sve, text_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _pairs(tmp_path)
    result = sve("init", "--data", "pairs.csv", "--model", text_models["llama"], "--out", "pairs.yaml")
    assert result.code == 0, result.stderr
    assert "generation with" in result.stdout and "prompt 'prompt', answer 'answer'" in " ".join(result.stdout.split())
    recipe = yaml.safe_load((tmp_path / "pairs.yaml").read_text())
    assert recipe["task"] | {"max_length": None, "max_target_length": None} == {
        "type": "generation", "dataset": "pairs.csv", "prompt_field": "prompt", "target_field": "answer",
        "validation_split": "validation", "max_length": None, "max_target_length": None}
    task = recipe["task"]
    assert 16 <= task["max_target_length"] <= 64 and 16 <= task["max_length"] - task["max_target_length"] <= 256
    assert recipe["ensemble"]["targets"] == "attention@1-"  # the upper third of the tiny model's 2 blocks
    run = sve("train", "pairs.yaml", "--set", "train.max_steps=2", "--set", "train.eval_every_steps=2")
    assert run.code == 0, run.stderr
    assert json.loads((tmp_path / "runs" / "pairs" / "trainer_state.json").read_text())["step"] == 2

    assert sve("init", "--data", "pairs.csv", "--out", "default.yaml").code == 0  # no --model: SmolLM2
    recipe = yaml.safe_load((tmp_path / "default.yaml").read_text())
    assert recipe["model"]["path"] == "builtin:smollm2" and recipe["ensemble"]["targets"] == "attention@20-"
    assert_one_error_line(sve("init", "--data", "pairs.csv", "--model", text_models["bert"], "--out", "bert.yaml"),
                          "holds prompt → answer pairs ('answer' is free text: 96 distinct values)")  # in the training split
    assert not (tmp_path / "bert.yaml").exists()
