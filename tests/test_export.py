"""`sve export`: merged members load in plain transformers (fresh process) and match; banks."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sve_cli.bank import load_bank, read_bank_metadata
from sve_cli.pipeline import Pipeline
from sve_cli.recipe import load_recipe
from sve_cli.train import train

from conftest import assert_one_error_line, sentiment_file, train_run


@pytest.fixture(scope="module")
def runs(text_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("export_runs")
    sections = {"task": {"max_length": 24}, "ensemble": {"members": 3}, "train": {"lr": 5e-2, "eval_every_steps": 4}}
    arc = root / "arc.jsonl"
    arc.write_text("".join(json.dumps({"question": f"Which is a colour? ({i})",
                                       "choices": {"text": ["red", "run", "rock"], "label": ["A", "B", "C"]},
                                       "answerKey": "ABC"[i % 3]}) + "\n" for i in range(48)))
    return {
        "bert": train_run(root, "bert", text_models["bert"], sentiment_file(root), **sections),
        "llama": train_run(root, "llama", text_models["llama"], arc, task={"type": "multiple_choice", "max_length": 48},
                           ensemble={"members": 3, "bias": False}, train=sections["train"]),
        "root": root,
    }


def _member_logits(run, texts):
    """Every member's logits `[B, M, C]` divided by that member's own fitted temperature: what an exported
    member must give (its temperature folded into its classifier)."""
    recipe = load_recipe(run / "recipe.yaml")
    pipeline = Pipeline(recipe)
    from sve_cli.bank import read_bank_metadata

    metadata = read_bank_metadata(run / "sigma_bank.safetensors")
    model = pipeline.build_model(metadata["label_names"])
    load_bank(model, run / "sigma_bank.safetensors")
    model.eval()
    inputs = dict(pipeline.tokenizer(texts, padding=True, return_tensors="pt"))
    temperatures = torch.tensor(metadata["calibration"]["member_temperatures"])
    assert (temperatures - 1).abs().min() > 1e-3  # fitted, not the identity: folding it is really tested
    with torch.no_grad():
        return model(**inputs) / temperatures[None, :, None], inputs, pipeline


PLAIN = textwrap.dedent("""
    import sys, torch, transformers
    from safetensors.torch import load_file, save_file
    directory, inputs_file, out_file, kind = sys.argv[1:5]
    inputs = load_file(inputs_file)
    model = getattr(transformers, kind).from_pretrained(directory).eval()
    with torch.no_grad():
        logits = model(**inputs).logits
    if logits.dim() == 3:  # causal LM: the last real position of every row
        last = inputs["attention_mask"].sum(1) - 1
        logits = logits[torch.arange(len(last)), last]
    assert not any(name.startswith("sve_cli") for name in sys.modules), "sve was imported"
    save_file({"logits": logits.contiguous()}, out_file)
""")


SENTENCE_TRANSFORMERS = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import save_file
    from sentence_transformers import SentenceTransformer
    directory, out_file, *texts = sys.argv[1:]
    model = SentenceTransformer(directory, device="cpu")
    logits = model.encode(texts, convert_to_tensor=True)
    assert not any(name.startswith("sve_cli") for name in sys.modules), "sve was imported"
    save_file({"logits": logits.contiguous()}, out_file)
""")


def _sentence_transformers_logits(directory, texts, tmp_path):
    script = tmp_path / "st.py"
    script.write_text(SENTENCE_TRANSFORMERS)
    result = subprocess.run([sys.executable, str(script), str(directory), str(tmp_path / "st.safetensors"), *texts],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "newly initialized" not in result.stdout + result.stderr  # every weight the class builds is there
    return load_file(tmp_path / "st.safetensors")["logits"]


def test_mean_pooled_member_exports_as_a_sentence_transformer(sve, text_models, tmp_path):
    run = train_run(tmp_path, "mean", text_models["bert"], sentiment_file(tmp_path), ensemble={"members": 2,
                    "representation": "mean"}, train={"lr": 5e-2})
    texts = ["the film was great", "the meal was truly awful and cold"]
    logits, _, _ = _member_logits(run, texts)
    out = tmp_path / "member1"
    result = sve("export", run, "--format", "safetensors", "--member", "1", "--out", out)
    assert result.code == 0, result.stderr
    assert "sentence-transformers' SentenceTransformer" in " ".join(result.stdout.split())
    modules = json.loads((out / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Dense"]
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"] is True
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertModel"]
    assert "library_name: sentence-transformers" in (out / "README.md").read_text()
    plain = _sentence_transformers_logits(out, texts, tmp_path)
    torch.testing.assert_close(plain, logits[:, 1], rtol=1e-4, atol=1e-4)
    files = json.loads((out / "config.json").read_text())["sve"]["files"]
    assert {"1_Pooling/config.json", "2_Dense/config.json", "2_Dense/model.safetensors"} <= set(files)

    # what a user put inside the export's subfolders is never deleted by --overwrite
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for plant, remove in ((lambda: (out / "1_Pooling" / "mine.txt").write_text("mine"), lambda: (out / "1_Pooling" / "mine.txt").unlink()),
                          (lambda: (out / "2_Dense" / "link").symlink_to(notes), lambda: (out / "2_Dense" / "link").unlink()),
                          (lambda: (out / "2_Dense" / "empty").mkdir(), lambda: (out / "2_Dense" / "empty").rmdir()),
                          (lambda: (out / "3_Extra").mkdir(), lambda: (out / "3_Extra").rmdir())):
        plant()
        before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        result = sve("export", run, "--format", "safetensors", "--member", "0", "--out", out, "--overwrite")
        assert result.code == 2 and "holds files sve did not write there" in result.stderr, result.stderr
        assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
        remove()
    assert sve("export", run, "--format", "safetensors", "--member", "0", "--out", out, "--overwrite").code == 0
    assert json.loads((out / "config.json").read_text())["sve"]["member"] == 0 and notes.read_text() == "mine"


def _plain_logits(directory, inputs, kind, tmp_path):
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(tmp_path / "inputs.safetensors"))
    script = tmp_path / "plain.py"
    script.write_text(PLAIN)
    result = subprocess.run([sys.executable, str(script), str(directory), str(tmp_path / "inputs.safetensors"),
                             str(tmp_path / "logits.safetensors"), kind], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    return load_file(tmp_path / "logits.safetensors")["logits"]


def test_merged_bert_member_matches_in_plain_transformers(sve, runs, tmp_path):
    texts = ["the film was great", "the meal was truly awful and cold"]
    logits, inputs, _ = _member_logits(runs["bert"], texts)
    for member in (0, 2):
        out = tmp_path / f"member{member}"
        result = sve("export", runs["bert"], "--format", "safetensors", "--member", member, "--out", out,
                     "--max-shard-size", "200KB")
        assert result.code == 0, result.stderr
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1 and index["metadata"]["total_size"] > 0
        config = json.loads((out / "config.json").read_text())
        assert config["architectures"] == ["BertForSequenceClassification"] and config["id2label"] == {"0": "0", "1": "1"}
        temperature = read_bank_metadata(runs["bert"] / "sigma_bank.safetensors")["calibration"]["member_temperatures"][member]
        assert config["sve"]["temperature"] == temperature and config["sve"]["run"] == "bert"  # no path of this machine
        assert f"T = {temperature:.4f}" in (out / "README.md").read_text()
        for name in ("tokenizer.json", "vocab.txt", "README.md", "sve_recipe.yaml"):
            assert (out / name).exists()
        assert (out / "README.md").read_text().startswith("---\nbase_model: ")
        plain = _plain_logits(out, inputs, "AutoModelForSequenceClassification", tmp_path)
        torch.testing.assert_close(plain, logits[:, member], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits[:, 0], logits[:, 2])  # members really differ


def test_merged_letter_head_member_matches_the_causal_lm(sve, runs, tmp_path):
    prompts = ["Which is a colour? (1)\nA) red\nB) run\nC) rock\nAnswer:", "Which is a colour? (22)\nA) red\nB) run\nC) rock\nAnswer:"]
    logits, inputs, pipeline = _member_logits(runs["llama"], prompts)
    out = tmp_path / "llama-member1"
    assert sve("export", runs["llama"], "--format", "safetensors", "--member", "1", "--out", out).code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is False
    plain = _plain_logits(out, inputs, "AutoModelForCausalLM", tmp_path)
    from sve_cli.pipeline import letter_token_id

    letters = [letter_token_id(pipeline.tokenizer, letter) for letter in "ABC"]
    torch.testing.assert_close(plain[:, letters], logits[:, 1], rtol=1e-4, atol=1e-4)


def test_mean_member_is_labelled(sve, runs, tmp_path):
    out = tmp_path / "mean"
    assert sve("export", runs["bert"], "--format", "safetensors", "--member", "mean", "--out", out).code == 0
    assert "single-model summary" in (out / "README.md").read_text()
    assert json.loads((out / "config.json").read_text())["sve"]["member"] == "mean"


def test_bank_export_reimports_with_identical_predictions(sve, runs, tmp_path):
    result = sve("export", runs["bert"], "--format", "sigma-bank", "--out", tmp_path / "bank.safetensors")
    assert result.code == 0 and "% of the base checkpoint" in result.stdout
    with safe_open(str(tmp_path / "bank.safetensors"), "pt") as handle:
        assert handle.metadata()["sve.decomposition_fingerprint"]
    first = sve("evaluate", runs["bert"], "--save-predictions", "--report", tmp_path / "own")
    second = sve("evaluate", runs["bert"], "--bank", tmp_path / "bank.safetensors", "--save-predictions",
                 "--report", tmp_path / "exported")
    assert first.code == second.code == 0
    assert torch.equal(load_file(tmp_path / "own" / "predictions.safetensors")["logits"],
                       load_file(tmp_path / "exported" / "predictions.safetensors")["logits"])


def test_refusals(sve, runs, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    cases = [
        (["--format", "safetensors", "--member", "3"], "out of range: the run has 3 member(s)"),
        (["--format", "safetensors", "--out", out], "exists and is not an sve export; sve never replaces it"),
        (["--format", "safetensors", "--out", out, "--overwrite"], "exists and is not an sve export"),
        (["--format", "safetensors", "--member", "first"], "--member must be a member index or 'mean'"),
    ]
    for args, fragment in cases:
        assert_one_error_line(sve("export", runs["bert"], *args), fragment)
    assert (out / "keep.txt").read_text() == "x"


def test_changed_base_is_refused(sve, runs, text_models, tmp_path):
    recipe_text = (runs["bert"] / "recipe.yaml").read_text()
    moved = tmp_path / "model"
    moved.mkdir()
    for file in text_models["bert"].iterdir():
        (moved / file.name).write_bytes(file.read_bytes())
    tensors = load_file(moved / "model.safetensors")
    tensors["bert.encoder.layer.1.intermediate.dense.weight"] += 0.01
    save_file(tensors, str(moved / "model.safetensors"), metadata={"format": "pt"})
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(recipe_text.replace(str(text_models["bert"]), str(moved)))
    (run / "sigma_bank.safetensors").write_bytes((runs["bert"] / "sigma_bank.safetensors").read_bytes())
    result = sve("export", run, "--format", "safetensors")
    assert result.code == 2 and "no longer matches the bank" in result.stderr


@pytest.mark.slow
def test_real_minilm_member_exports_and_matches(sve, tmp_path):
    recipe = {"model": {"path": "builtin:minilm"},
              "task": {"type": "text_classification", "dataset": "builtin:tweets", "max_length": 24,
                       "max_train_examples": 64, "max_eval_examples": 16},
              "ensemble": {"method": "sve", "members": 2},
              "train": {"max_steps": 2, "batch_size": 16, "lr": 1e-2}}
    path = tmp_path / "minilm.yaml"
    path.write_text(yaml.safe_dump(recipe))
    train(load_recipe(path), tmp_path / "run")
    texts = ["what a lovely morning", "my flight got cancelled again"]
    logits, inputs, _ = _member_logits(tmp_path / "run", texts)
    out = tmp_path / "export"
    result = sve("export", tmp_path / "run", "--format", "safetensors", "--member", "1", "--out", out)
    assert result.code == 0, result.stderr
    # all-MiniLM-L6-v2 is mean-pooled (its 1_Pooling/config.json): the head reads that, and the
    # member exports as a sentence-transformers folder
    assert (out / "modules.json").exists()
    plain = _sentence_transformers_logits(out, texts, tmp_path)
    torch.testing.assert_close(plain, logits[:, 1], rtol=1e-4, atol=1e-4)
    bank = sve("export", tmp_path / "run", "--format", "sigma-bank", "--out", tmp_path / "bank.safetensors")
    share = float(bank.stdout.split("% of the base")[0].rsplit(" ", 1)[1])
    assert share < 5.0


def test_multiple_choice_run_evaluates_with_arc_style_ood(sve, runs, tmp_path):
    ood = tmp_path / "ood.jsonl"
    ood.write_text("".join(json.dumps({"question": f"Which is a planet? ({i})",
                                       "choices": {"text": ["Mars", "milk", "mud"], "label": ["1", "2", "3"]},
                                       "answerKey": "1"}) + "\n" for i in range(10)))
    result = sve("evaluate", runs["llama"], "--ood", ood, "--report", tmp_path / "report")
    assert result.code == 0, result.stderr
    assert json.loads((tmp_path / "report" / "report.json").read_text())["data"]["sizes"]["ood.ood"] == 10
    assert_one_error_line(sve("evaluate", runs["llama"], "--ood", "tweets"), "need 'question' and 'choices' columns")
