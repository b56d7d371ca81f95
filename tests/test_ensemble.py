"""Exactness of the wrapped ensemble against plain Hugging Face models."""

import pytest
import torch
from safetensors.torch import load_file

from sve_cli.tensors import tensor_fingerprint
from sve_cli.pipeline import ensemble_for
from sve_cli.recipe import EnsembleConfig
from sve_cli.errors import SveError

KINDS = {"bert": "BertForSequenceClassification", "llama-cls": "LlamaForSequenceClassification",
         "vit": "ViTForImageClassification"}


def _inputs(kind, batch=3):
    generator = torch.Generator().manual_seed(3)
    if kind == "vit":
        return {"pixel_values": torch.randn(batch, 1, 8, 8, generator=generator)}
    ids = torch.randint(1, 64, (batch, 9), generator=generator)
    ids[1, 6:] = 0  # padding: masks and last-non-pad pooling must agree with HF
    ids[2, 3:] = 0
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def _reference(kind, path):
    import transformers

    return getattr(transformers, KINDS[kind]).from_pretrained(path).eval()


@pytest.mark.parametrize("strategy", ["factored", "materialised", "auto"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_zero_noise_members_equal_the_plain_model(tiny_checkpoints, kind, strategy):
    path = tiny_checkpoints[kind]
    reference = _reference(kind, path)
    config = EnsembleConfig(members=3, sigma_init=0.0, strategy=strategy, head_init="checkpoint")
    ensemble = ensemble_for(str(path), config, classes=3 if kind != "vit" else 10).eval()
    inputs = _inputs(kind)
    with torch.no_grad():
        expected = reference(**inputs).logits  # [B, C]
        logits = ensemble(**inputs)  # [B, M, C]
    assert logits.shape == (3, 3, expected.shape[-1])
    torch.testing.assert_close(logits, expected[:, None].expand_as(logits), rtol=1e-5, atol=1e-5)


def _member_reference(kind, path, ensemble, member):
    """A plain HF model whose targeted weights are U diag(relu(s_m)) Vh and biases b_m."""
    from sve_cli.factors import FactorCache

    reference = _reference(kind, path)
    cache = FactorCache(next(iter(_caches(ensemble))))
    originals = load_file(path / "model.safetensors")
    by_fingerprint = {tensor_fingerprint(originals[name]): name for name in ensemble.layers}
    replaced = 0
    for module in reference.modules():
        if isinstance(module, torch.nn.Linear) and (name := by_fingerprint.get(tensor_fingerprint(module.weight.detach()))):
            U, S, Vh = cache.factors(name)
            layer = ensemble.layers[name]
            with torch.no_grad():
                module.weight.copy_(U @ torch.diag(torch.relu(layer.sigma[member])) @ Vh)
                if layer.bias is not None:
                    module.bias.copy_(layer.bias[member])
            replaced += 1
    assert replaced == len(ensemble.layers)
    head = ensemble.head
    classifier = reference.score if kind == "llama-cls" else reference.classifier
    with torch.no_grad():
        classifier.weight.copy_(head.weight[member])
        if head.bias is not None:
            classifier.bias.copy_(head.bias[member])
    return reference


def _caches(ensemble):
    from sve_cli.factors import default_output

    yield default_output(ensemble.identity.base_model)  # where build_ensemble decomposed it


@pytest.mark.parametrize("kind", list(KINDS))
def test_trained_like_members_equal_plain_models_with_merged_weights(tiny_checkpoints, kind):
    path = tiny_checkpoints[kind]
    outputs = {}
    for strategy in ("factored", "materialised"):
        config = EnsembleConfig(members=3, strategy=strategy, bias=kind != "llama-cls")
        ensemble = ensemble_for(str(path), config, classes=3 if kind != "vit" else 10, seed=5).eval()
        generator = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for layer in ensemble.layers.values():
                layer.sigma.mul_(1 + 0.5 * torch.randn(layer.sigma.shape, generator=generator))
                layer.sigma[:, -1] = -1.0  # a clamped singular value
                if layer.bias is not None:
                    layer.bias.add_(0.1 * torch.randn(layer.bias.shape, generator=generator))
            ensemble.head.weight.normal_(generator=generator)
            logits = ensemble(**_inputs(kind))
        outputs[strategy] = logits
        for member in range(3):
            reference = _member_reference(kind, path, ensemble, member)
            with torch.no_grad():
                expected = reference(**_inputs(kind)).logits
            torch.testing.assert_close(logits[:, member], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outputs["factored"], outputs["materialised"], rtol=1e-4, atol=1e-5)


def test_only_sigma_bias_and_heads_learn(tiny_checkpoints):
    ensemble = ensemble_for(str(tiny_checkpoints["bert"]), EnsembleConfig(members=2), classes=3)
    ensemble.train()
    trainable = ensemble.trainable_parameters()
    sve_modules = {name for name, module in ensemble.named_modules() if module in ensemble.layers.values()}
    assert len(sve_modules) == len(ensemble.layers) == 12
    assert set(trainable) == {f"{m}.{p}" for m in sve_modules for p in ("sigma", "bias")} | {"head.weight", "head.bias"}
    frozen_before = {name: t.clone() for name, t in ensemble.state_dict().items() if name not in trainable}
    trainable_before = {name: p.detach().clone() for name, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2, weight_decay=0.05)
    logits = ensemble(**_inputs("bert"))  # [B, M, C]
    labels = torch.tensor([0, 1, 2])[:, None].expand(-1, 2)
    torch.nn.functional.cross_entropy(logits.reshape(-1, 3), labels.reshape(-1)).backward()
    assert {n for n, p in ensemble.named_parameters() if p.grad is not None} == set(trainable)
    optimizer.step()
    after = ensemble.state_dict()
    for name, tensor in frozen_before.items():
        assert torch.equal(after[name], tensor), name  # bit-identical
    assert all(not torch.equal(trainable[n].detach(), trainable_before[n]) for n in trainable)
    for layer in ensemble.layers.values():  # frozen factors are buffers, not parameters
        assert not layer.U.requires_grad and not layer.Vh.requires_grad


def test_deep_ensemble_members_start_apart_even_with_a_copied_letter_head(tiny_checkpoints):
    """Shared batches, no dropout and a letter head copied into every member: exact copies would stay
    one model, so deep-ensemble copies carry SVE's relative init noise; `single` stays the plain model."""
    path = tiny_checkpoints["llama"]
    originals = load_file(path / "model.safetensors")
    letters = [5, 6, 7]

    def build(method, members, sigma_init):
        config = EnsembleConfig(method=method, members=members, sigma_init=sigma_init, bias=False)
        return ensemble_for(str(path), config, letter_token_ids=letters).eval()

    deep = build("deep_ensemble", 3, 0.01)
    for name, layer in deep.layers.items():
        relative = layer.weight.detach() / originals[name] - 1  # [M, out, in]
        assert 0.009 < relative.std() < 0.011 and relative.mean().abs() < 1e-3
        assert not torch.equal(layer.weight[0], layer.weight[1])
    head_relative = deep.head.weight.detach() / originals["lm_head.weight"][letters] - 1
    assert 0.007 < head_relative.std() < 0.013 and not torch.equal(deep.head.weight[0], deep.head.weight[1])
    with torch.no_grad():
        logits = deep(**_inputs("llama-cls"))  # [B, M, C]
    assert (logits[:, 0] - logits[:, 1]).abs().max() > 1e-4

    for method, members in (("single", 1), ("deep_ensemble", 3)):
        exact = build(method, members, 0.01 if method == "single" else 0.0)
        for name, layer in exact.layers.items():
            assert all(torch.equal(layer.weight[m], originals[name]) for m in range(members))


def test_decomposition_of_another_model_is_refused(tiny_checkpoints, tmp_path):
    from sve_cli.decompose import decompose, plan_decomposition

    decompose(plan_decomposition(str(tiny_checkpoints["llama"])), tmp_path / "llama-cache")
    with pytest.raises(SveError, match="does not belong to this model"):
        ensemble_for(str(tiny_checkpoints["llama-cls"]), EnsembleConfig(members=2), classes=3,
                       decomposition=tmp_path / "llama-cache")


def test_bad_ensemble_requests(tiny_checkpoints):
    with pytest.raises(ValueError, match="members"):
        EnsembleConfig(members=0)
    with pytest.raises(SveError, match="letter head needs a causal LM"):
        ensemble_for(str(tiny_checkpoints["bert"]), EnsembleConfig(members=2), letter_token_ids=[5, 6])
    with pytest.raises(SveError, match="no classifier"):
        ensemble_for(str(tiny_checkpoints["llama"]), EnsembleConfig(members=2, head_init="checkpoint"), classes=3)


@pytest.mark.slow
def test_real_minilm_members_equal_bert_for_sequence_classification(minilm_path, tmp_path):
    from transformers import BertForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(minilm_path, num_labels=3).eval()
    model.save_pretrained(tmp_path / "minilm-cls")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    inputs = dict(tokenizer(["what a wonderful day", "the train was late again, as always"],
                            padding=True, return_tensors="pt"))
    ensemble = ensemble_for(str(tmp_path / "minilm-cls"), EnsembleConfig(members=4, sigma_init=0.0, head_init="checkpoint"),
                              classes=3).eval()
    with torch.no_grad():
        expected = model(**inputs).logits
        logits = ensemble(**inputs)
    torch.testing.assert_close(logits, expected[:, None].expand_as(logits), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_smollm2_letter_head_reproduces_the_lm_letter_logits():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sve_cli.checkpoint import resolve_model

    path = resolve_model("builtin:smollm2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    letters = [tokenizer.encode(letter, add_special_tokens=False)[0] for letter in " A B C D E".split(" ")[1:]]
    prompts = ["Which topic? A) sport B) politics C) tech D) business E) film\nAnswer:",
               "Question: is the sky green?\nA) yes\nB) no\nAnswer:"]
    tokenizer.padding_side = "left"
    inputs = dict(tokenizer(prompts, padding=True, return_tensors="pt"))
    ensemble = ensemble_for("builtin:smollm2", EnsembleConfig(members=2, sigma_init=0.0, bias=False),
                              letter_token_ids=letters).eval()
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = lm(**inputs).logits[:, -1, letters]  # left padding: the last position is the prompt's end
        logits = ensemble(**inputs)
    torch.testing.assert_close(logits, expected[:, None].expand_as(logits), rtol=1e-4, atol=1e-4)


def test_stale_default_cache_is_refreshed(tiny_checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "bert"
    model.mkdir()
    for file in tiny_checkpoints["bert"].iterdir():
        (model / file.name).write_bytes(file.read_bytes())
    first = ensemble_for(str(model), EnsembleConfig(members=2), classes=3)
    tensors = load_file(model / "model.safetensors")
    tensors["bert.encoder.layer.0.attention.self.query.weight"] *= 2  # the checkpoint changes in place
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    second = ensemble_for(str(model), EnsembleConfig(members=2), classes=3)
    assert second.identity.decomposition_fingerprint != first.identity.decomposition_fingerprint
    layer = second.layers["bert.encoder.layer.0.attention.self.query.weight"]
    torch.testing.assert_close(layer.U @ torch.diag(layer.sigma[0].detach()) @ layer.Vh,
                               tensors["bert.encoder.layer.0.attention.self.query.weight"], rtol=0.05, atol=0.05)


def test_representation_follows_the_checkpoints_own_pooling(tiny_checkpoints, minilm_path, tmp_path):
    """all-MiniLM-L6-v2 says it is mean-pooled (modules.json + 1_Pooling/config.json); a plain BERT
    classifier checkpoint is read through its pooler; a recipe may name another representation."""
    import json

    from sve_cli.architectures import ARCHITECTURES
    from sve_cli.heads import resolve_representation, sentence_transformers_pooling

    bert, llama, vit = ARCHITECTURES["bert"], ARCHITECTURES["llama"], ARCHITECTURES["vit"]
    assert resolve_representation("auto", bert, minilm_path) == "mean"
    assert resolve_representation("auto", bert, tiny_checkpoints["bert"]) == "pooler"
    assert resolve_representation("cls", bert, minilm_path) == "cls"
    assert resolve_representation("auto", llama, tiny_checkpoints["llama-cls"]) == "last_token"
    with pytest.raises(SveError, match="does not apply to a vit"):
        resolve_representation("pooler", vit, tiny_checkpoints["vit"])
    folder = tmp_path / "st"
    (folder / "pool").mkdir(parents=True)
    (folder / "modules.json").write_text(json.dumps([{"path": "pool", "type": "sentence_transformers.models.Pooling"}]))
    for config, expected in (({"pooling_mode": "cls"}, "cls"), ({"pooling_mode": ["max"]}, "max"),
                             ({"pooling_mode_lasttoken": True}, "last_token"),
                             ({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}, "mean")):
        (folder / "pool" / "config.json").write_text(json.dumps(config))
        assert sentence_transformers_pooling(folder) == expected
    (folder / "pool" / "config.json").write_text(json.dumps({"pooling_mode": "weightedmean"}))
    with pytest.raises(SveError, match="pooling \\['weightedmean'\\] is not supported"):
        sentence_transformers_pooling(folder)


@pytest.mark.parametrize("kind", ["mean", "max", "cls"])
def test_pooled_representations_ignore_padding(tiny_checkpoints, kind):
    """A padded row gives the same logits as the row alone: pooling never reads padding."""
    ensemble = ensemble_for(str(tiny_checkpoints["bert"]), EnsembleConfig(members=2, representation=kind),
                              classes=3).eval()
    ids = torch.tensor([[5, 6, 7, 8, 0, 0], [5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        padded = ensemble(input_ids=ids, attention_mask=(ids != 0).long())
        alone = ensemble(input_ids=ids[:1, :4], attention_mask=torch.ones(1, 4, dtype=torch.long))
    torch.testing.assert_close(padded[:1], alone, rtol=1e-5, atol=1e-6)
    assert ensemble.representation == kind
