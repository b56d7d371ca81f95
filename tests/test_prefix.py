"""The shared prefix (`sve_cli.prefix`) is exact: logits and gradients equal fanning out at the input.

In float64, so that what is compared is the arithmetic, not float32 rounding of sums taken in another order."""

from __future__ import annotations

import pytest
import torch

from sve_cli.architectures import ARCHITECTURES
from sve_cli.checkpoint import open_checkpoint
from sve_cli.pipeline import ensemble_for
from sve_cli.recipe import EnsembleConfig
from sve_cli.targets import resolve_targets

from conftest import sentiment_file, train_run
from test_architectures import FAMILIES

IMAGE = {"vit", "deit", "dinov2"}  # take pixel values
INFERRED = {family for family in FAMILIES if family not in ARCHITECTURES}  # specs sve infers (BLOOM, …)


def _save(family: str, directory) -> str:
    """A three-block random checkpoint of `family`, saved as users' checkpoints are."""
    import transformers

    config_class, model_class, options, _, _ = FAMILIES[family]
    layers = {key: 3 for key in ("num_hidden_layers", "n_layers", "n_layer") if key in options}
    torch.manual_seed(0)
    getattr(transformers, model_class)(getattr(transformers, config_class)(**{**options, **layers})).save_pretrained(directory)
    return str(directory)


def _upper_targets(path: str) -> str:
    """Every default target of blocks 1 and 2 (block 0 stays shared), as exact names."""
    names = [t.name for t in resolve_targets(open_checkpoint(path), "all")]
    upper = [name for name in names if ".1." in name or ".2." in name]
    assert upper and len(upper) < len(names)
    return ",".join(upper)


def _inputs(family: str, batch: int = 3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    if family in IMAGE:
        return {"pixel_values": torch.randn(batch, 1, 8, 8, generator=generator, dtype=torch.float64)}
    ids = torch.randint(5, 200, (batch, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    return {"input_ids": ids, "attention_mask": mask}


def _perturbed(ensemble) -> None:
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for layer in ensemble.layers.values():
            layer.sigma.add_(0.3 * torch.randn(layer.sigma.shape, generator=generator))
        ensemble.head.weight.normal_(generator=generator)


def _both(ensemble, inputs, train: bool = False):
    """Logits (and, training, the sigma gradients) with the prefix shared and with it off."""
    results = []
    for enabled in (True, False):
        ensemble.prefix.enabled = enabled
        ensemble.zero_grad()
        with torch.set_grad_enabled(train):
            logits = ensemble(**inputs)  # [B, M, C]
            if train:
                logits.logsumexp(-1).sum().backward()
        grads = [layer.sigma.grad.clone() for layer in ensemble.layers.values()] if train else []
        results.append((logits.detach(), grads))
    return results


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_shared_prefix_equals_fanning_out_at_the_input(family, tmp_path):
    path = _save(family, tmp_path / family)
    config = EnsembleConfig(members=4, targets=_upper_targets(path), bias=False, dropout=False)
    ensemble = ensemble_for(path, config, classes=3, seed=1).double().eval()
    if family in INFERRED:  # not in sve's registry: fans out at the input, as BLOOM's ALiBi needs
        assert ensemble.prefix is None
        return
    assert ensemble.prefix is not None and ensemble.prefix.first == 1
    _perturbed(ensemble)
    (shared, _), (fanned, _) = _both(ensemble, _inputs(family))
    torch.testing.assert_close(shared, fanned, rtol=1e-10, atol=1e-12)
    assert (shared[:, 0] - shared[:, 1]).abs().max() > 1e-4  # members differ: the fan-out did happen


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prefix_gradients_are_exact(family, checkpointing, tmp_path):
    path = _save(family, tmp_path / family)
    config = EnsembleConfig(members=4, targets=_upper_targets(path), bias=False, dropout=False)
    ensemble = ensemble_for(path, config, classes=3, seed=1).double().train()
    if checkpointing:
        ensemble.enable_gradient_checkpointing()
    _perturbed(ensemble)
    (shared, shared_grads), (fanned, fanned_grads) = _both(ensemble, _inputs(family), train=True)
    torch.testing.assert_close(shared, fanned, rtol=1e-10, atol=1e-12)
    for ours, theirs in zip(shared_grads, fanned_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_a_trained_bank_and_its_evaluation_equal_fanning_out(text_models, tmp_path, monkeypatch):
    """The whole pipeline, float32: train (shared member batches) and evaluate a run with the prefix shared,
    and again with it off: the banks and every calibrated probability agree to 1e-6."""
    import sve_cli.ensemble
    from safetensors.torch import load_file

    from sve_cli.evaluate import evaluate_run

    data = sentiment_file(tmp_path)
    sections = dict(ensemble={"members": 3, "targets": "*.layers.1.self_attn.*_proj.weight", "bias": False},
                    train={"max_steps": 4, "eval_every_steps": 4, "member_batches": "shared"})
    shared = train_run(tmp_path, "shared", text_models["llama"], data, **sections)
    shared_eval = evaluate_run(shared)
    monkeypatch.setattr(sve_cli.ensemble, "shared_prefix", lambda backbone, layers: None)
    fanned = train_run(tmp_path, "fanned", text_models["llama"], data, **sections)
    fanned_eval = evaluate_run(fanned)
    banks = load_file(shared / "sigma_bank.safetensors"), load_file(fanned / "sigma_bank.safetensors")
    assert banks[0].keys() == banks[1].keys() and any(name.startswith("sigma") or ".sigma" in name for name in banks[0])
    for name in banks[0]:
        torch.testing.assert_close(banks[0][name], banks[1][name], rtol=0, atol=1e-6)
    torch.testing.assert_close(shared_eval.prediction.probs, fanned_eval.prediction.probs, rtol=0, atol=1e-6)
    torch.testing.assert_close(shared_eval.prediction.member_probs, fanned_eval.prediction.member_probs, rtol=0, atol=1e-6)
