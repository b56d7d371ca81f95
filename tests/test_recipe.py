from pathlib import Path

import pytest

from sve_cli.errors import RecipeError
from sve_cli.recipe import load_recipe, parse_overrides, recipe_yaml

from conftest import assert_one_error_line

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
MINIMAL = "model:\n  path: builtin:minilm\ntask:\n  type: text_classification\n  dataset: builtin:tweets\n"


def test_every_shipped_recipe_validates_and_documents_its_command():
    assert {p.name for p in RECIPES} >= {"quickstart.yaml", "smollm2_bbc_mc.yaml", "digits_vit.yaml", "arc_easy.yaml",
                                          "sst2.yaml", "flowers102.yaml", "pets.yaml"}
    for path in RECIPES:
        recipe = load_recipe(path)
        header = path.read_text().split("\nmodel:")[0]
        assert f"sve train recipes/{path.name}" in header and "Cost" in header, path.name
        assert recipe.ensemble.members >= 1


def test_paper_settings():
    arc = load_recipe(RECIPES[[p.name for p in RECIPES].index("arc_easy.yaml")])
    assert arc.ensemble.members == 16 and arc.task.type == "multiple_choice"
    sst2 = load_recipe(RECIPES[[p.name for p in RECIPES].index("sst2.yaml")])
    assert sst2.ensemble.members == 8


def _write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_and_overrides(tmp_path):
    path = _write(tmp_path, MINIMAL)
    recipe = load_recipe(path, ["train.lr=3e-4", "ensemble.members=8", "ensemble.bias=false", "task.label_names=[a, b, c]"])
    assert recipe.train.lr == 3e-4 and recipe.ensemble.members == 8 and recipe.ensemble.bias is False
    assert recipe.task.label_names == ["a", "b", "c"] and recipe.ensemble.method == "sve"
    assert load_recipe(_write(tmp_path, recipe_yaml(recipe), "again.yaml")) == recipe  # resolved recipe round-trips
    assert load_recipe(_write(tmp_path, MINIMAL + "train:\n  lr: 1e-2\n", "yaml11.yaml")).train.lr == 0.01  # a YAML 1.1 string


@pytest.mark.parametrize("text,fragments", [
    (MINIMAL + "ensemble:\n  members: 0\n", ["ensemble.members", "greater than or equal to 1"]),
    (MINIMAL + "train:\n  lr: -1\n", ["train.lr", "greater than 0"]),
    (MINIMAL + "train:\n  lr: fast\n", ["1 problem: train.lr: expected a number or auto, not 'fast'"]),
    (MINIMAL + "train:\n  lr: true\n", ["1 problem: train.lr: expected a number or auto, not True"]),
    ("model:\n  path: x\ntask:\n  type: text_classification\n  dataset: 5\n",
     ["1 problem: task.dataset: expected a dataset name, a path or a mapping of split names to files, not 5"]),
    (MINIMAL + "train:\n  learning_rate: 0.1\n", ["train.learning_rate", "unknown key"]),
    (MINIMAL + "eval:\n  split: holdout\n", ["eval.split 'holdout' is none of the task's splits"]),
    (MINIMAL + "ensemble:\n  method: svf\n  members: 4\n", ["method 'svf' trains one model"]),
    (MINIMAL + "ensemble:\n  method: bagging\n", ["ensemble.method", "'sve'"]),
    ("task:\n  type: text_classification\n", ["model: Field required", "task.dataset: Field required"]),
    (MINIMAL + "  letters: [A, A, B]\n", ["task.letters", "'A' appears more than once"]),
    (MINIMAL + "eval:\n  calibration: platt\n", ["eval.calibration", "'temperature' or 'none'"]),
])
def test_bad_recipes_name_the_key_and_the_file(tmp_path, text, fragments):
    path = _write(tmp_path, text)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    message = str(caught.value)
    assert message.startswith(str(path)) and "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_all_problems_are_reported_at_once(tmp_path):
    path = _write(tmp_path, MINIMAL + "ensemble:\n  members: 0\ntrain:\n  lr: -1\n  colour: red\n")
    with pytest.raises(RecipeError, match="3 problems") as caught:
        load_recipe(path)
    assert all(key in str(caught.value) for key in ("ensemble.members", "train.lr", "train.colour"))


@pytest.mark.parametrize("text,fragment", [
    (MINIMAL + "train:\n\tlr: 1\n", "not valid YAML (line 7"),
    (MINIMAL + "model:\n  path: x\n", "duplicate key 'model'"),
    ("base: &b\n  path: builtin:minilm\nmodel: *b\n", "aliases"),
    ("- just\n- a list\n", "a recipe is a mapping"),
    ("", "a recipe is a mapping"),
    ("model: !!python/object/apply:os.system ['echo hacked']\n", "not valid YAML"),
])
def test_malformed_yaml(tmp_path, text, fragment):
    with pytest.raises(RecipeError, match=fragment.replace("(", "\\(")):
        load_recipe(_write(tmp_path, text))


def test_missing_and_binary_recipe_files(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(RecipeError, match="not a UTF-8 text file"):
        load_recipe(tmp_path / "binary.yaml")


def test_override_syntax():
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}
    with pytest.raises(RecipeError, match="not key.path=value"):
        parse_overrides(["train.lr"])


def test_shipped_recipes_are_package_data_and_found_by_name_anywhere(tmp_path, monkeypatch):
    from sve_cli.recipe import SHIPPED, find_recipe, shipped_recipes

    assert SHIPPED.parent.name == "sve_cli" and {p.name for p in RECIPES} == {f"{n}.yaml" for n in shipped_recipes()}
    monkeypatch.chdir(tmp_path)  # outside a clone: no recipes/ folder here
    for name in ("recipes/quickstart.yaml", "quickstart.yaml", "quickstart"):
        assert find_recipe(name) == SHIPPED / "quickstart.yaml"
    (tmp_path / "quickstart.yaml").write_text(MINIMAL)  # a local file wins
    assert find_recipe("quickstart.yaml") == Path("quickstart.yaml")
    with pytest.raises(RecipeError, match="nor is it a shipped recipe: arc_easy"):
        find_recipe("other/quickstart.yaml")


def test_sve_recipes_lists_prints_and_copies(sve, tmp_path):
    from sve_cli.recipe import SHIPPED, shipped_recipes

    listing = sve("recipes")
    assert listing.code == 0
    for name, (_, summary) in shipped_recipes().items():
        assert f"{name}" in listing.stdout and summary[:40] in " ".join(listing.stdout.split())
    printed = sve("recipes", "sst2")
    assert printed.code == 0 and printed.stdout == (SHIPPED / "sst2.yaml").read_text()
    copy = tmp_path / "mine.yaml"
    assert sve("recipes", "quickstart", "--copy", copy).code == 0
    assert copy.read_text() == (SHIPPED / "quickstart.yaml").read_text()
    copy.write_text("edited")
    assert_one_error_line(sve("recipes", "quickstart", "--copy", copy), "already exists; sve never replaces it")
    assert copy.read_text() == "edited"
    assert_one_error_line(sve("recipes", "nope"), "no shipped recipe named 'nope'")
