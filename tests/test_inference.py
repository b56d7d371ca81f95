"""Batched inference: the eval weight cache stays within its budget, and predictions do not depend on it."""

import torch

import sve_cli.layer
from sve_cli.inference import cache_budget, predict
from sve_cli.layer import SVELinear

from conftest import sentiment_file, train_run


def test_the_eval_cache_is_never_built_past_its_budget_and_changes_no_prediction(text_models, tmp_path, monkeypatch):
    from sve_cli.data import load_splits
    from sve_cli.pipeline import load_ensemble
    from sve_cli.recipe import load_recipe

    run = train_run(tmp_path, "run", text_models["bert"], sentiment_file(tmp_path), ensemble={"members": 3},
                    train={"max_steps": 2})
    recipe = load_recipe(run / "recipe.yaml")
    pipeline, model, _ = load_ensemble(recipe, run / "sigma_bank.safetensors")
    data = pipeline.encode(load_splits(recipe.task, "test")[0]["test"])
    layers = [layer for layer in model.layers.values() if isinstance(layer, SVELinear)]
    needed = model.eval_cache_bytes()
    assert needed == sum(3 * layer.out_features * layer.in_features * 4 for layer in layers)
    built = []  # every member weight built: [M, out, in] for the cache, [m, out, in] for one call
    merged = sve_cli.layer.merged_weight
    monkeypatch.setattr(sve_cli.layer, "merged_weight", lambda *args: built.append(1) or merged(*args))
    cached = predict(model, data, 64, budget=str(needed))  # exactly enough: the layers may cache
    assert len(built) > 0
    built.clear()
    factored = predict(model, data, 64, budget=str(needed - 1))  # one byte short: no member weight is ever built
    assert built == [] and all(layer._cache is None for layer in layers)
    off = predict(model, data, 64, budget="0")
    assert built == []
    torch.testing.assert_close(factored, cached, rtol=1e-5, atol=1e-5)
    assert torch.equal(off, factored)
    assert cache_budget("4GB", torch.device("cpu")) == 4_000_000_000 and cache_budget("auto", torch.device("cpu")) > 0
