"""The command line: exit codes, one-line errors, help text, and real end-to-end runs."""

import json

import pytest

from conftest import assert_one_error_line, sve_subprocess


def test_version(sve):
    from sve_cli import __version__

    result = sve("--version")
    assert result.code == 0 and result.stdout.strip() == f"sve {__version__}"


def test_every_command_help_ends_with_an_example(sve):
    from sve_cli.cli import app

    import typer.main

    for name, command in typer.main.get_command(app).commands.items():
        result = sve(name, "--help")
        assert result.code == 0
        collapsed = " ".join(result.stdout.split())  # rich wraps long lines
        epilog = " ".join(command.epilog.split())
        assert epilog.startswith(f"Example: sve {name} ")
        assert collapsed.endswith(epilog), collapsed[-200:]  # the worked example is the last thing printed


def test_help_reads_like_a_well_kept_tool(sve, monkeypatch):
    """Arguments in capitals in the usage line, no `{recipe}` braces, and flags without a `<bool>` metavar
    (what typer 0.27+ prints; constraints.txt pins a typer that does not)."""
    from sve_cli.cli import app

    import typer.main

    monkeypatch.setenv("COLUMNS", "250")
    usages = {"decompose": "MODEL", "train": "RECIPE", "evaluate": "RUNS...", "export": "RUN", "predict": "SOURCE",
              "recipes": "[NAME]", "init": "", "generate": "SOURCE"}
    for name, command in typer.main.get_command(app).commands.items():
        shown = sve(name, "--help").stdout
        assert f"Usage: sve {name} [OPTIONS] {usages[name]}" in " ".join(shown.split()), shown[:300]
        assert "{" not in shown.split("Arguments")[0] and "<bool>" not in shown and "<path>" not in shown
        for param in command.params:
            if getattr(param, "is_flag", False):
                line = next(line for line in shown.splitlines() if f"{param.opts[0]} " in line)
                assert "BOOLEAN" not in line and "<" not in line.split(param.opts[0])[1].split()[0], line


def test_every_option_help_is_printed_whole(sve, monkeypatch):
    """Rich reads `[...]` as markup and silently drops it; every help string must reach the screen
    (on a terminal wide enough that no cell wraps into its neighbour)."""
    from sve_cli.cli import app

    import typer.main

    monkeypatch.setenv("COLUMNS", "250")
    for name, command in typer.main.get_command(app).commands.items():
        shown = " ".join(sve(name, "--help").stdout.replace("│", " ").split())
        for param in command.params:
            if param.help:
                assert " ".join(param.help.split()) in shown, (name, param.name)


def test_dry_run_lists_targets_and_writes_nothing(sve, tiny_checkpoints, tmp_path):
    result = sve("decompose", tiny_checkpoints["llama"], "--out", tmp_path / "cache", "--dry-run")
    assert result.code == 0
    assert "model.layers.1.mlp.down_proj.weight" in result.stdout and "32×48" in result.stdout
    assert "would write" in result.stdout and not (tmp_path / "cache").exists()


def test_decompose_then_rerun_reuses(sve, tiny_checkpoints, tmp_path):
    first = sve("decompose", tiny_checkpoints["bert"], "--out", tmp_path / "cache")
    assert first.code == 0 and "12 decomposed" in first.stdout
    again = sve("decompose", tiny_checkpoints["bert"], "--out", tmp_path / "cache")
    assert again.code == 0 and "12 reused" in again.stdout


@pytest.mark.parametrize("make_input,extra,fragment", [
    (lambda tmp, ck: tmp / "missing", [], "no such file or directory"),
    (lambda tmp, ck: (tmp / "empty").mkdir() or tmp / "empty", [], "no config.json"),
    (lambda tmp, ck: _config_only(tmp), [], "no *.safetensors weights"),
    (lambda tmp, ck: _corrupt(tmp, ck), [], "not a readable safetensors file"),
    (lambda tmp, ck: _unknown_arch(tmp, ck), [], "model_type 'mystery' is neither known to sve nor to this transformers"),
    (lambda tmp, ck: ck["llama"], ["--targets", "*.nope.weight"], "matches no tensor"),
    (lambda tmp, ck: ck["llama"], ["--targets", "*.post_attention_layernorm.weight"], "only 2-D"),
    (lambda tmp, ck: ck["llama"], ["--max-shard-size", "big"], "cannot read size"),
    (lambda tmp, ck: "builtin:nothing", [], "unknown built-in model"),
    (lambda tmp, ck: "org/model-that-is-not-here", [], "could not be fetched"),
])
def test_bad_inputs_give_one_clear_line(sve, tiny_checkpoints, tmp_path, make_input, extra, fragment):
    model = make_input(tmp_path, tiny_checkpoints)
    result = sve("decompose", model, "--out", tmp_path / "cache", *extra)
    assert_one_error_line(result, fragment)
    assert not (tmp_path / "cache").exists()


def _config_only(tmp):
    (tmp / "config_only").mkdir()
    (tmp / "config_only" / "config.json").write_text('{"model_type": "bert"}')
    return tmp / "config_only"


def _corrupt(tmp, checkpoints):
    (tmp / "corrupt").mkdir()
    (tmp / "corrupt" / "config.json").write_text('{"model_type": "bert"}')
    data = (checkpoints["bert"] / "model.safetensors").read_bytes()
    (tmp / "corrupt" / "model.safetensors").write_bytes(data[: len(data) - 1000])
    return tmp / "corrupt"


def _unknown_arch(tmp, checkpoints):
    (tmp / "mystery").mkdir()
    (tmp / "mystery" / "config.json").write_text('{"model_type": "mystery"}')
    (tmp / "mystery" / "model.safetensors").write_bytes((checkpoints["bert"] / "model.safetensors").read_bytes())
    return tmp / "mystery"


def test_existing_output_of_another_model_is_refused_and_kept(sve, tiny_checkpoints, tmp_path):
    cache = tmp_path / "cache"
    assert sve("decompose", tiny_checkpoints["bert"], "--out", cache).code == 0
    before = {p.name: p.read_bytes() for p in cache.iterdir()}
    result = sve("decompose", tiny_checkpoints["llama"], "--out", cache)
    assert_one_error_line(result, "pass --overwrite")
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == before
    assert sve("decompose", tiny_checkpoints["llama"], "--out", cache, "--overwrite").code == 0
    manifest = json.loads((cache / "decomposition.json").read_text())
    assert manifest["source"]["model_type"] == "llama"


def test_output_that_is_a_file_is_refused(sve, tiny_checkpoints, tmp_path):
    (tmp_path / "file").write_text("keep me")
    assert_one_error_line(sve("decompose", tiny_checkpoints["bert"], "--out", tmp_path / "file"), "is a file")
    assert (tmp_path / "file").read_text() == "keep me"


@pytest.mark.slow
def test_real_minilm_end_to_end_in_a_subprocess(tmp_path):
    result = sve_subprocess("decompose", "builtin:minilm", "--out", tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    assert "36 (36 decomposed, 0 reused)" in result.stdout
    manifest = json.loads((tmp_path / "cache" / "decomposition.json").read_text())
    assert manifest["source"]["model"] == "builtin:minilm" and len(manifest["targets"]) == 36
    assert max(t["rel_error"] for t in manifest["targets"]) < 1e-5
    bad = sve_subprocess("decompose", tmp_path / "nowhere")
    assert bad.returncode == 2 and bad.stderr.startswith("error: no such file") and "Traceback" not in bad.stderr


COMMANDS = {"decompose": ["builtin:minilm"], "train": ["recipe.yaml"], "evaluate": ["run"], "export": ["run", "--format", "safetensors"]}


@pytest.mark.parametrize("args,message", [
    (["evalute"], "No such command 'evalute'. Did you mean 'evaluate'? Usage"[:-6]),
    (["--frobnicate"], "No such option '--frobnicate'"),
    *[([name, *args, "--frobnicate"], "No such option '--frobnicate'") for name, args in COMMANDS.items()],
    *[([name], "Missing argument") for name in COMMANDS],
    (["export", "run"], "Missing option '--format'"),
    (["evaluate", "run", "--bins", "abc"], "Invalid value for '--bins'"),
    (["evaluate", "run", "--bins", "0"], "Invalid value for '--bins'"),
    (["evaluate", "run", "--combine", "median"], "Invalid value for '--combine'"),
    (["decompose", "builtin:minilm", "--device", "tpu9", "--dry-run"], "Invalid value for '--device'"),
    (["decompose", "builtin:minilm", "--dtype", "int4"], "Invalid value for '--dtype'"),
    (["export", "run", "--format", "zip"], "Invalid value for '--format'"),
    (["export", "run", "--format", "safetensors", "--dtype", "int8"], "Invalid value for '--dtype'"),
    (["train", "recipe.yaml", "--set"], "requires an argument"),
])
def test_usage_mistakes_print_typers_usage_line_and_exit_2(sve, args, message):
    """Every mistake in the command line itself: typer's short usage message on stderr, exit 2."""
    result = sve(*args)
    assert result.code == 2, (result.code, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    if args[-1] != "--set":  # click reports an option missing its value without the usage lines
        assert result.stderr.startswith("Usage: sve") and "Try 'sve" in result.stderr, result.stderr
    assert "Error: " in result.stderr and message in " ".join(result.stderr.split()), result.stderr
    assert result.stderr.count("Did you mean") <= 1, result.stderr  # one suggestion, not click's and typer's both


def test_usage_mistake_in_a_real_process_has_no_traceback():
    result = sve_subprocess("train")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("Usage: sve train") and "Missing argument" in result.stderr


def test_help_and_usage_mistakes_do_not_wait_for_torch():
    """`sve --help`, `--version` and a usage line answer in half a second: the command line imports torch,
    transformers and pandas only inside the command that runs."""
    import subprocess
    import sys

    code = "import sys, sve_cli.cli; print(sorted({'torch', 'transformers', 'pandas'} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"


@pytest.mark.parametrize("args,fragment", [
    (["predict", "run", "--data", "x.csv", "--conformal-score", "aps"], "give --conformal LEVEL too"),
    (["predict", "run", "--data", "x.csv", "--abstain-risk", "1"], "--abstain-risk 1 is not a fitted level"),
    (["predict", "run", "--data", "x.csv", "--abstain-risk", "0.03"], "fits 0.01, 0.02, 0.05, 0.1, 0.2"),
    (["train", "quickstart", "--nproc", "1000"], "--nproc 1000 is more than this machine's"),
    (["train", "quickstart", "--time"], "--time estimates a run's duration within --dry-run"),
    (["train", "quickstart", "--dry-run", "--nproc", "3"], "train.batch_size 16 is not divisible by --nproc 3"),
])
def test_options_that_cannot_apply_are_refused_before_anything_loads(sve, tmp_path, monkeypatch, args, fragment):
    """An option that would be silently ignored, or promise what the real run refuses: one line, exit 2,
    nothing written (the run directory named does not even exist)."""
    from conftest import assert_one_error_line

    monkeypatch.chdir(tmp_path)
    assert_one_error_line(sve(*args), fragment)
    assert list(tmp_path.iterdir()) == []


def test_dry_run_time_measures_steps_and_writes_no_run(sve, text_models, tmp_path, monkeypatch):
    from conftest import sentiment_file, write_recipe

    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path / "r.yaml", text_models["bert"], sentiment_file(tmp_path),
                          train={"max_steps": 40, "eval_every_steps": 20, "batch_size": 8})
    result = sve("train", recipe, "--dry-run", "--time")
    assert result.code == 0, result.stderr
    line = " ".join(result.stdout.split())
    assert "time on this machine (measured:" in line and "training 40 steps" in line and "2 evaluation(s)" in line
    assert not (tmp_path / "runs").exists()


def test_the_progress_clock_is_never_cut_on_a_narrow_terminal(monkeypatch):
    import io
    import re

    from rich.console import Console
    from rich.progress import BarColumn, TextColumn

    from sve_cli import console

    screen = io.StringIO()
    monkeypatch.setattr(console, "console", Console(file=screen, width=80, force_terminal=True))
    with console.progress_bar(BarColumn(), TextColumn("{task.completed}/{task.total}"), console.status_column()) as bar:
        task = bar.add_task("sve M=4", total=250, status="loss 0.123 acc 0.45 1234 tok/s epoch 1.23 " + "x" * 60)
        bar.update(task, completed=10)
        bar.refresh()
    assert re.search(r"\d:\d\d:\d\d", screen.getvalue()), screen.getvalue()[-400:]
    assert "…" in screen.getvalue()  # the status text was cut instead
