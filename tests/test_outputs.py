"""Nothing lost, nothing silently wrong: the output-safety rule of every command, numbers checked where
they enter, every broken input one line, and no failed or killed command blocking the next try.

Each refusal asserts exit code 2, one `error:` line, no traceback, and the bytes of every file that
existed before unchanged."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import REPO, assert_one_error_line, sentiment_file, train_run, write_recipe


def _snapshot(*roots: Path) -> dict[Path, bytes]:
    files = {}
    for root in roots:
        paths = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        files.update({p: p.read_bytes() for p in paths if p.name != ".sve.lock"})
    return files


@pytest.fixture(scope="module")
def world(text_models, tmp_path_factory):
    """A trained run beside a folder of other runs, a data file and a user's own folder of files."""
    root = tmp_path_factory.mktemp("outputs")
    data = sentiment_file(root)
    (root / "runs").mkdir()
    run = train_run(root / "runs", "run", text_models["bert"], data)
    (root / "runs" / "notes.txt").write_text("my notes")
    mine = root / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("\\section{precious}")
    # sve's own export, with a user's file inside a folder of it; a pipe; symbolic links, one broken
    from sve_cli.cli import main

    nested = root / "exported-nested"
    argv, sys.argv = sys.argv, ["sve", "export", str(run), "--format", "safetensors", "--out", str(nested)]
    try:
        main()
    except SystemExit as exit_:
        assert not exit_.code
    finally:
        sys.argv = argv
    (nested / "extra").mkdir()
    (nested / "extra" / "mine.txt").write_text("mine")
    (root / "lookalike.csv").write_text("prediction,confidence,entropy\n1,0.9,0.3\n")  # sve's columns are no marker
    (root / ".lookalike.csv.tmp-7").write_text("mine, named like a temporary of lookalike.csv")
    os.mkfifo(root / "pipe")
    (root / "link").symlink_to(mine / "thesis.tex")
    (root / "broken").symlink_to(root / "nowhere")
    return {"root": root, "run": run, "data": data, "mine": mine, "model": text_models["bert"], "nested": nested}


# --------------------------------------------------------------------------- data loss


def _refusals(world):
    run, data, mine, root = world["run"], world["data"], world["mine"], world["root"]
    return {
        "export into its own run": (["export", run, "--format", "safetensors", "--out", run, "--overwrite"],
                                    "is one of this command's inputs"),
        "export over a folder of runs": (["export", run, "--format", "safetensors", "--out", run.parent, "--overwrite"],
                                         "contains"),
        "export over a user's folder": (["export", run, "--format", "safetensors", "--out", mine, "--overwrite"],
                                        "is not an sve export; sve never replaces it"),
        "export over the base model": (["export", run, "--format", "safetensors", "--out", world["model"], "--overwrite"],
                                       "is one of this command's inputs"),
        "bank export over the run's bank": (["export", run, "--format", "sigma-bank", "--out",
                                             run / "sigma_bank.safetensors", "--overwrite"], "is one of this command's inputs"),
        "bank export over a user's file": (["export", run, "--format", "sigma-bank", "--out", mine / "thesis.tex",
                                            "--overwrite"], "is not an sve Σ bank"),
        "predict over its input": (["predict", run, "--data", data, "--out", data, "--overwrite"],
                                   "is one of this command's inputs"),
        "predict over a user's file": (["predict", run, "--data", data, "--out", root / "mine.jsonl", "--overwrite"],
                                       "is not an sve predictions file"),
        "predict over a user's file with sve's columns": (["predict", run, "--data", data, "--out",
                                                           root / "lookalike.csv", "--overwrite"],
                                                          "is not an sve predictions file"),

        "report into the run": (["evaluate", run, "--report", run, "--overwrite"], "is one of this command's inputs"),
        "report over a user's folder": (["evaluate", run, "--report", mine, "--overwrite"], "is not an sve report"),
        "train over a user's folder": (["train", run / "recipe.yaml", "--out", mine, "--overwrite"],
                                       "holds files that are not an sve run"),
    }


def test_overwrite_never_replaces_what_the_command_did_not_make(sve, world):
    (world["root"] / "mine.jsonl").write_text('{"text": "my own data", "label": 1}\n')
    before = _snapshot(world["root"])
    for name, (args, fragment) in _refusals(world).items():
        assert_one_error_line(sve(*args), fragment)
        assert _snapshot(world["root"]) == before, name


def test_export_never_replaces_the_current_directory(sve, world, monkeypatch):
    first = world["root"] / "exported"
    assert sve("export", world["run"], "--format", "safetensors", "--out", first).code == 0
    before = _snapshot(first)
    monkeypatch.chdir(first)
    assert_one_error_line(sve("export", world["run"], "--format", "safetensors", "--out", ".", "--overwrite"),
                          "is the current directory or one of its parents")
    monkeypatch.chdir(first / "..")
    assert _snapshot(first) == before
    again = sve("export", world["run"], "--format", "safetensors", "--out", first, "--overwrite")  # its own: replaced
    assert again.code == 0, again.stderr


CANDIDATES = ["run", "runs", "mine", "model", "data", "bank", "notes", "nested", "pipe", "link", "broken", "lookalike"]


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(command=st.sampled_from(["export", "bank", "predict", "report", "train", "decompose"]),
       target=st.sampled_from(CANDIDATES))
def test_property_overwrite_changes_nothing_it_did_not_make(sve, world, command, target):
    """For any command and any --out that is not that command's own output, --overwrite changes nothing."""
    run = world["run"]
    paths = {"run": run, "runs": run.parent, "mine": world["mine"], "model": world["model"], "data": world["data"],
             "bank": run / "sigma_bank.safetensors", "notes": run.parent / "notes.txt", "nested": world["nested"],
             "pipe": world["root"] / "pipe", "link": world["root"] / "link", "broken": world["root"] / "broken",
             "lookalike": world["root"] / "lookalike.csv"}
    out = paths[target]
    args = {"export": ["export", run, "--format", "safetensors", "--out", out],
            "bank": ["export", run, "--format", "sigma-bank", "--out", out],
            "predict": ["predict", run, "--data", world["data"], "--out", out],
            "report": ["evaluate", run, "--report", out],
            "train": ["train", run / "recipe.yaml", "--out", out],
            "decompose": ["decompose", world["model"], "--out", out]}[command]
    if command == "train" and target == "run":
        return  # the run is train's own output: --overwrite replaces it, by design
    before = _snapshot(world["root"], world["model"])
    kinds = {path: _kind(path) for path in world["root"].rglob("*")}
    result = sve(*args, "--overwrite")
    assert result.code == 2 and "Traceback" not in result.stderr, (command, target, result.stderr)
    assert _snapshot(world["root"], world["model"]) == before, (command, target)
    assert {path: _kind(path) for path in world["root"].rglob("*")} == kinds, (command, target)


def _kind(path: Path) -> str:
    """What a path is, without following it: pipes and links must survive as what they were."""
    import stat

    mode = path.lstat().st_mode
    return "link:" + str(path.readlink()) if stat.S_ISLNK(mode) else "pipe" if stat.S_ISFIFO(mode) else \
        "dir" if stat.S_ISDIR(mode) else "file"


def test_concurrent_exports_into_one_new_output_never_both_succeed(world, tmp_path):
    out = tmp_path / "together"
    command = [sys.executable, "-m", "sve_cli", "export", str(world["run"]), "--format", "safetensors", "--out", str(out)]
    first, second = (subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for _ in range(2))
    results = sorted([(p.wait(), p.stderr.read()) for p in (first, second)])
    assert [code for code, _ in results] == [0, 2], results
    assert "already exists; pass --overwrite" in results[1][1]
    assert json.loads((out / "config.json").read_text())["sve"]["member"] == 0


def test_a_killed_export_is_swept_and_lookalike_temporaries_are_not(sve, world, tmp_path):
    """What a killed export left is removed by the next export; files that merely carry a temporary's name
    (sve did not journal them) are the user's and stay byte for byte."""
    out = tmp_path / "export"
    command = [sys.executable, "-m", "sve_cli", "export", str(world["run"]), "--format", "safetensors", "--out", str(out)]
    killed = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "SVE_KILL_AT": "shard-begun"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "export"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".export.tmp-"), leftovers  # the killed staging folder
    (tmp_path / ".export.tmp-99999").mkdir()
    (tmp_path / ".export.tmp-99999" / "mine.txt").write_text("mine")
    (tmp_path / ".export.old-5").write_text("also mine")
    before = _snapshot(tmp_path / ".export.tmp-99999", tmp_path / ".export.old-5")
    assert sve("export", world["run"], "--format", "safetensors", "--out", out).code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".export.old-5", ".export.tmp-99999", "export"]
    assert _snapshot(tmp_path / ".export.tmp-99999", tmp_path / ".export.old-5") == before
    (out / ".model.safetensors.tmp-7").write_text("mine, named like a temporary, inside the export")
    assert_one_error_line(sve("export", world["run"], "--format", "safetensors", "--out", out, "--overwrite"),
                          "holds files sve did not write there (e.g. .model.safetensors.tmp-7)")
    assert (out / ".model.safetensors.tmp-7").read_text() == "mine, named like a temporary, inside the export"


def test_predict_overwrite_replaces_only_the_file_it_wrote(sve, world, tmp_path):
    out = tmp_path / "predictions.csv"
    (tmp_path / ".predictions.csv.tmp-7").write_text("mine")  # named like a temporary of the output: not swept
    assert sve("predict", world["run"], "--data", world["data"], "--out", out).code == 0
    assert (tmp_path / ".predictions.csv.tmp-7").read_text() == "mine"
    assert sve("predict", world["run"], "--data", world["data"], "--out", out, "--overwrite").code == 0
    text = out.read_text()
    out.unlink()
    out.write_text(text)  # the same columns, but a file the user wrote
    assert_one_error_line(sve("predict", world["run"], "--data", world["data"], "--out", out, "--overwrite"),
                          "is not an sve predictions file")
    assert out.read_text() == text


def test_messages_never_name_temporaries(sve, world, tmp_path, monkeypatch):
    import sve_cli.writing

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / f".bank.safetensors.tmp-{os.getpid()}"))

    monkeypatch.setattr(sve_cli.writing, "save_file", full_disk)
    result = sve("export", world["run"], "--format", "sigma-bank", "--out", tmp_path / "bank.safetensors")
    assert_one_error_line(result, "No space left on device")
    assert ".tmp-" not in result.stderr and "bank.safetensors" in result.stderr


# --------------------------------------------------------------------------- silently wrong


def _copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, ignore=shutil.ignore_patterns(".sve.lock", "report"))
    return to


def test_a_bank_holding_nan_is_refused(sve, world, tmp_path):
    run = _copy_run(world["run"], tmp_path / "nan")
    bank = run / "sigma_bank.safetensors"
    with safe_open(str(bank), "pt") as handle:
        metadata, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    tensors["head.weight"][0, 0, 0] = float("nan")
    save_file(tensors, str(bank), metadata=metadata)
    (run / "thresholds.json").unlink(missing_ok=True)
    for args in (["predict", run, "--data", world["data"], "--out", tmp_path / "p.jsonl"], ["evaluate", run]):
        assert_one_error_line(sve(*args), "holds NaN or infinite values")
    assert not (tmp_path / "p.jsonl").exists()


def test_an_altered_decomposition_is_refused(sve, world, tmp_path):
    cache = tmp_path / "cache"
    assert sve("decompose", world["model"], "--out", cache).code == 0
    run = _copy_run(world["run"], tmp_path / "run")
    recipe = (run / "recipe.yaml").read_text().replace("decomposition: null", f"decomposition: {cache}")
    (run / "recipe.yaml").write_text(recipe)
    shard = next(cache.glob("factors-*.safetensors"))
    tensors, metadata = load_file(shard), safe_open(str(shard), "pt").metadata()
    name = next(k for k in tensors if k.endswith(".S"))
    tensors[name][0] *= 1.5  # one value; the header and every shape intact
    save_file(tensors, str(shard), metadata=metadata)
    result = sve("evaluate", run, "--report", tmp_path / "r")
    assert_one_error_line(result, "has changed since `sve decompose` wrote it")


def test_a_base_changed_outside_the_targets_is_refused(sve, world, tmp_path):
    """Embeddings × 3 in the base checkpoint after training: every command that reads the run says so, in
    one line, and writes nothing."""
    model = tmp_path / "model"
    shutil.copytree(world["model"], model)
    run = _copy_run(world["run"], tmp_path / "run")
    (run / "recipe.yaml").write_text((run / "recipe.yaml").read_text().replace(str(world["model"]), str(model)))
    assert sve("evaluate", run, "--report", tmp_path / "before").code == 0  # the copy is the same checkpoint
    weights = load_file(model / "model.safetensors")
    name = next(k for k in weights if "word_embeddings" in k)
    weights[name] = weights[name] * 3
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    before = _snapshot(tmp_path)
    for args in (["evaluate", run, "--report", tmp_path / "r"],
                 ["predict", run, "--data", world["data"], "--out", tmp_path / "p.jsonl"],
                 ["export", run, "--format", "safetensors", "--out", tmp_path / "e"]):
        assert_one_error_line(sve(*args), "changed since this bank was trained")
    assert _snapshot(tmp_path) == before


def test_a_report_cut_short_is_replaced_with_overwrite_and_named_by_its_option(sve, world, tmp_path):
    """What a report killed (or out of disk) halfway leaves — sve's marker and some files — is sve's own:
    refused without --overwrite, replaced with it; refusals name --report, the option the user gave."""
    from sve_cli import __version__

    report = tmp_path / "report"
    report.mkdir()
    (report / "report.json").write_text(json.dumps({"tool": f"sve {__version__}", "complete": False,
                                                    "files": ["report.json", "report.md", "reliability.png"]}))
    (report / "report.md").write_text("# sve evaluation — cut sh")
    assert_one_error_line(sve("evaluate", world["run"], "--report", report), "already exists; pass --overwrite")
    result = sve("evaluate", world["run"], "--report", report, "--overwrite")
    assert result.code == 0, result.stderr
    assert "metrics" in json.loads((report / "report.json").read_text())
    assert_one_error_line(sve("evaluate", world["run"], "--report", world["mine"], "--overwrite"),
                          "choose another --report")


def test_a_bank_of_other_labels_is_refused(sve, world, tmp_path):
    other_data = tmp_path / "other.jsonl"
    other_data.write_text("".join(json.dumps({"text": f"text {i}", "label": ["x", "y", "z"][i % 3]}) + "\n"
                                  for i in range(60)))
    other = train_run(tmp_path, "other", world["model"], other_data, train={"max_steps": 2})
    assert_one_error_line(sve("evaluate", world["run"], "--bank", other / "sigma_bank.safetensors",
                              "--report", tmp_path / "r"), "was trained for another")


def test_two_ood_files_of_one_name_stay_apart(sve, world, tmp_path):
    for folder, word in (("a", "x"), ("b", "y")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.jsonl").write_text("".join(json.dumps({"text": f"{word} {i}"}) + "\n" for i in range(5)))
    result = sve("evaluate", world["run"], "--ood", tmp_path / "a" / "x.jsonl", "--ood", tmp_path / "b" / "x.jsonl",
                 "--report", tmp_path / "r")
    assert result.code == 0, result.stderr
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert sorted(report["ood"]) == ["x", "x-2"]
    assert report["data"]["ood_sources"] == {"x": str(tmp_path / "a" / "x.jsonl"), "x-2": str(tmp_path / "b" / "x.jsonl")}


# --------------------------------------------------------------------------- one line, never a traceback


def _bad_thresholds(run: Path, tmp: Path, text: str) -> Path:
    copy = _copy_run(run, tmp / "thresholds")
    (copy / "thresholds.json").write_text(text)
    return copy


def _bank_metadata_not_json(run: Path, tmp: Path) -> Path:
    copy = _copy_run(run, tmp / "badmeta")
    bank = copy / "sigma_bank.safetensors"
    metadata = dict(safe_open(str(bank), "pt").metadata())
    metadata["sve.label_names"] = "[not json"
    save_file(load_file(bank), str(bank), metadata=metadata)
    return copy


def _truncated_checkpoint(world, tmp: Path) -> list:
    recipe = write_recipe(tmp / "r.yaml", world["model"], world["data"], train={"max_steps": 4, "eval_every_steps": 2})
    out = tmp / "halfway"
    from sve_cli.recipe import load_recipe
    from sve_cli.train import train

    train(load_recipe(recipe), out)
    checkpoint = out / "checkpoint.safetensors"
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    return ["train", recipe, "--out", out, "--resume"]


def _mismatched_config(world, tmp: Path) -> Path:
    model = tmp / "model"
    shutil.copytree(world["model"], model)
    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] = 40
    (model / "config.json").write_text(json.dumps(config))
    return model


def _fingerprint(run: Path) -> str:
    from sve_cli.checkpoint import file_fingerprint

    return file_fingerprint(run / "sigma_bank.safetensors")


def _temperature(run: Path) -> float:
    from sve_cli.bank import read_bank_metadata

    return read_bank_metadata(run / "sigma_bank.safetensors")["calibration"]["temperature"]


def _data(tmp: Path, text: str) -> Path:
    (tmp / "d.jsonl").write_text(text)
    return tmp / "d.jsonl"


def _recipe(world, tmp: Path, data=None, model=None, **sections) -> list:
    return ["train", write_recipe(tmp / "r.yaml", model or world["model"], data or world["data"], **sections),
            "--out", tmp / "new"]


BROKEN = {  # name -> (arguments, fragment of the one error line)
    "jsonl with a null text": (lambda w, t: _recipe(w, t, _data(t, '{"text": null, "label": 0}\n'
                                                                   + '{"text": "a", "label": 1}\n' * 30)), "have no 'text'"),
    "jsonl lines that are not objects": (lambda w, t: _recipe(w, t, _data(t, "[1, 2]\n" * 30)), "must be a JSON object"),
    "float labels": (lambda w, t: _recipe(w, t, _data(t, '{"text": "a", "label": 0.7}\n' * 30)), "label 0.7 is not an integer"),
    "config that does not match the weights": (lambda w, t: _recipe(w, t, model=_mismatched_config(w, t)),
                                               "does not match the weights"),
    "truncated checkpoint on --resume": (lambda w, t: _truncated_checkpoint(w, t), "is damaged"),
    "thresholds that are not JSON": (lambda w, t: ["predict", _bad_thresholds(w["run"], t, "{truncated"), "--data",
                                                   w["data"], "--out", t / "p.jsonl", "--abstain-coverage", "0.9"],
                                     "is not valid JSON"),
    "thresholds of the wrong types": (lambda w, t: ["predict", _bad_thresholds(w["run"], t, json.dumps(
        {"bank": _fingerprint(w["run"]), "combine": "probs", "temperature": _temperature(w["run"]),
         "scores": {"entropy": {"coverage": {"0.9": "high"}}}})),
        "--data", w["data"], "--out", t / "p.jsonl", "--abstain-coverage", "0.9"], "is 'high', not a number"),
    "bank metadata that is not JSON": (lambda w, t: ["evaluate", _bank_metadata_not_json(w["run"], t)],
                                       "metadata is not valid JSON"),
    "malformed YAML in --set": (lambda w, t: [*_recipe(w, t), "--set", "train.lr=[1, 2"], "the value is not valid YAML"),
    "a deeply nested recipe": (lambda w, t: ["train", _data(t, "a: " + "[" * 5000 + "]" * 5000), "--out", t / "n"],
                               "nested too deeply"),
    "an unknown prompt field": (lambda w, t: _recipe(w, t, task={"type": "multiple_choice", "question": "?",
                                                                 "prompt": "{question} {answer}"}),
                                "unknown field {answer}"),
    "a recipe that is a device": (lambda w, t: ["train", "/dev/zero", "--out", t / "z"], "is not a YAML file"),
    "data that is a device": (lambda w, t: ["predict", w["run"], "--data", "/dev/zero", "--out", t / "z.jsonl"],
                              "is not a regular file"),
    "a learning rate that diverges": (lambda w, t: [*_recipe(w, t), "--set", "train.lr=1e12"],
                                      "training diverged at step 2: the loss is nan"),
    "an infinite sigma_init": (lambda w, t: [*_recipe(w, t), "--set", "ensemble.sigma_init=.inf"], "ensemble.sigma_init"),
    "a threshold that is not a number": (lambda w, t: ["predict", w["run"], "--data", w["data"], "--out", t / "p.jsonl",
                                                       "--abstain-threshold", "nan"], "must be a finite number"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_inputs_are_one_line_and_change_nothing(sve, world, tmp_path, name):
    make_args, fragment = BROKEN[name]
    args = make_args(world, tmp_path)
    before = _snapshot(world["root"], world["model"], tmp_path)
    result = sve(*args)
    assert_one_error_line(result, fragment)
    after = _snapshot(world["root"], world["model"], tmp_path)
    assert {p: b for p, b in after.items() if p in before} == before


# --------------------------------------------------------------------------- nothing blocks the next try


def test_a_train_that_fails_before_its_first_checkpoint_leaves_nothing(sve, world, tmp_path):
    broken = _data(tmp_path, '{"text": "a", "label": 0.5}\n' * 30)
    args = ["train", write_recipe(tmp_path / "r.yaml", world["model"], broken), "--out", tmp_path / "run"]
    assert_one_error_line(sve(*args), "is not an integer")
    assert not (tmp_path / "run").exists()
    fixed = ["train", write_recipe(tmp_path / "r.yaml", world["model"], world["data"]), "--out", tmp_path / "run"]
    assert sve(*fixed).code == 0  # no --overwrite needed


def test_a_killed_stub_is_reused_by_a_plain_rerun(sve, world, tmp_path):
    from sve_cli.recipe import load_recipe, recipe_yaml

    recipe = write_recipe(tmp_path / "r.yaml", world["model"], world["data"])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.yaml").write_text(recipe_yaml(load_recipe(recipe)))  # SIGKILLed at its start
    result = sve("train", recipe, "--out", tmp_path / "run")
    assert result.code == 0, result.stderr


def test_a_billion_bins_is_a_usage_line(sve, world):
    result = sve("evaluate", world["run"], "--bins", "1000000000000")
    assert result.code == 2 and "Invalid value for '--bins'" in result.stderr and "Traceback" not in result.stderr


def test_a_diverging_run_stops_at_once_and_keeps_its_last_good_checkpoint(sve, world, tmp_path, monkeypatch):
    """The loss turns NaN at step 3 (of 6, checkpoints every 2): the run stops with one line naming the
    step, and what is on disk is the step-2 checkpoint and bank, exactly."""
    import sve_cli.train

    recipe = write_recipe(tmp_path / "r.yaml", world["model"], world["data"],
                          train={"max_steps": 6, "eval_every_steps": 2})
    calls = {"count": 0}
    cross_entropy = torch.nn.functional.cross_entropy

    def poisoned(*args, **kwargs):
        calls["count"] += 1
        loss = cross_entropy(*args, **kwargs)
        return loss * float("nan") if calls["count"] == 3 else loss

    monkeypatch.setattr(sve_cli.train.torch.nn.functional, "cross_entropy", poisoned)
    result = sve("train", recipe, "--out", tmp_path / "run")
    last = result.stderr.strip().splitlines()[-1]  # after the step-2 evaluation line
    assert result.code == 2 and "Traceback" not in result.stderr
    assert last.startswith("error: training diverged at step 3: the loss is nan; lower the learning rate")
    assert last.endswith("keeps its last good checkpoint and bank")
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    assert state["step"] == 2 and json.loads(safe_open(str(tmp_path / "run" / "sigma_bank.safetensors"), "pt")
                                             .metadata()["sve.step"]) == 2
    kept = load_file(tmp_path / "run" / "checkpoint.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in kept.values() if t.is_floating_point())


def test_sigint_says_where_resume_continues(world, tmp_path):
    import signal
    import time

    recipe = write_recipe(tmp_path / "r.yaml", world["model"], world["data"],
                          train={"max_steps": 400, "eval_every_steps": 2, "checkpoint_every_steps": 2})
    # a terminal's Ctrl-C: SIGINT at its default, even when this suite runs where it is ignored (a shell's `&`
    # job hands SIG_IGN down, and Python then never raises KeyboardInterrupt)
    process = subprocess.Popen([sys.executable, "-m", "sve_cli", "train", str(recipe), "--out", str(tmp_path / "run")],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (tmp_path / "run" / "trainer_state.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("export:")]
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert lines[-1].startswith("interrupted; `sve train") and "--resume` continues from step" in lines[-1], stderr
