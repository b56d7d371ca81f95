"""Generation runs (`task.type: generation`): prompt / target encoding, the target-token loss against a plain
`transformers` causal LM, validation scores against an independent computation, and the answers' judges
(ROUGE-L against torchmetrics', PRR against a direct transcription of LM-Polygraph's, AUROC against
scikit-learn's); end to end: train, evaluate, generate, export, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from sve_cli.answers import WRONG_BELOW, judge, prr, rejection_curve
from sve_cli.architectures import ARCHITECTURES
from sve_cli.data import Examples
from sve_cli.errors import RecipeError, SveError
from sve_cli.inference import target_sums
from sve_cli.metrics import target_metrics
from sve_cli.pipeline import Encoded, ensemble_for, generation_ids
from sve_cli.recipe import EnsembleConfig, load_recipe

from conftest import assert_one_error_line
from test_architectures import DECODERS
from test_prefix import _save, _upper_targets

REGISTERED = [family for family in DECODERS if family in ARCHITECTURES]


def _copy_task(directory, count: int = 48, words: tuple[str, ...] = ("red", "blue", "green", "cat", "dog", "sun",
                                                                      "moon", "tree")):
    """A learnable toy generation set: say a word twice."""
    rows = [{"prompt": f"Say {words[i % len(words)]} twice:", "target": f"{words[i % len(words)]} {words[i % len(words)]}"}
            for i in range(count)]
    path = directory / "copy.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _generation_recipe(path, model, data, **train):
    import yaml

    recipe = {"model": {"path": str(model)},
              "task": {"type": "generation", "dataset": str(data), "max_length": 24, "max_target_length": 8},
              "ensemble": {"method": "sve", "members": 2, "targets": "*.layers.1.self_attn.*_proj.weight"},
              "train": {"max_steps": 4, "batch_size": 8, "lr": 3e-2, "eval_every_steps": 2, **train},
              "eval": {"batch_size": 16, "metric": "nll"}}
    path.write_text(yaml.safe_dump(recipe))
    return path


class _Tokenizer:
    """Whitespace 'tokenizer' over a fixed vocabulary: every word one id, EOS 1, no special tokens."""

    eos_token_id, pad_token_id = 1, 0

    def __init__(self):
        self.vocabulary: dict[str, int] = {}

    def _ids(self, text: str) -> list[int]:
        return [self.vocabulary.setdefault(word, 10 + len(self.vocabulary)) for word in text.split()]

    def __call__(self, texts, add_special_tokens: bool = True):
        return {"input_ids": [self._ids(text) for text in texts]}


def test_generation_ids_join_prompt_and_target_and_cut_the_prompt_from_the_left():
    tokenizer = _Tokenizer()
    examples = Examples(torch.zeros(3, dtype=torch.long), texts=["a b c d e", "x y ", "p"],
                        targets=["t u", "v", "w w w w w w"])
    rows, prompt_lengths = generation_ids(tokenizer, examples, max_length=6, max_target_length=4, delimiter=" ")
    ids = tokenizer.vocabulary
    assert rows[0] == [ids["c"], ids["d"], ids["e"], ids["t"], ids["u"], 1]  # prompt cut from the left, EOS added
    assert prompt_lengths == [3, 2, 1]
    assert rows[1] == [ids["x"], ids["y"], ids["v"], 1]
    assert rows[2] == [ids["p"], ids["w"], ids["w"], ids["w"], ids["w"]]  # target cut at 4 tokens, EOS included
    with pytest.raises(SveError, match="prompt has no tokens"):
        generation_ids(tokenizer, Examples(torch.zeros(1, dtype=torch.long), texts=[""], targets=["t"]), 6, 4, " ")


def test_encoded_batch_marks_exactly_the_positions_that_predict_a_target_token():
    tokenizer = _Tokenizer()
    examples = Examples(torch.zeros(2, dtype=torch.long), texts=["a b c", "d"], targets=["t u", "v"])
    encoded = Encoded(examples, tokenizer, max_length=16, max_target_length=8)
    batch = encoded.batch(torch.tensor([0, 1]))
    for row, prompt_length in enumerate(encoded.prompt_lengths):
        ids, targets = batch["input_ids"][row], batch["target_ids"][row]
        length = int(batch["attention_mask"][row].sum())
        marked = (targets != -100).nonzero()[:, 0].tolist()
        assert marked == list(range(prompt_length - 1, length - 1))
        assert targets[marked].tolist() == ids[[t + 1 for t in marked]].tolist()


@pytest.mark.parametrize("family", REGISTERED)
def test_target_token_loss_at_base_values_is_the_plain_causal_lm_loss(family, tmp_path):
    from transformers import AutoModelForCausalLM

    path = _save(family, tmp_path / family)
    config = EnsembleConfig(members=2, targets=_upper_targets(path), bias=False, dropout=False, sigma_init=0.0)
    ensemble = ensemble_for(path, config, tokens=True, seed=1).double().eval()
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    ids = torch.randint(5, 60, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding, as training batches are laid out
    targets = torch.full_like(ids, -100)
    targets[0, 2:6], targets[1, 3:4] = ids[0, 3:7], ids[1, 4:5]
    with torch.no_grad():
        logits = ensemble(input_ids=ids, attention_mask=mask, target_ids=targets)  # [N, M, V]
        labels = torch.full_like(ids, -100)
        labels[:, 1:] = targets[:, :-1]  # HF shifts the labels itself
        expected = reference(input_ids=ids, attention_mask=mask, labels=labels)
    selected = targets != -100
    for member in range(2):  # the SVD reconstructs each weight to float32 precision
        torch.testing.assert_close(logits[:, member], expected.logits[selected], rtol=1e-4, atol=1e-4)
        loss = torch.nn.functional.cross_entropy(logits[:, member], targets[selected])
        torch.testing.assert_close(loss.float(), expected.loss.float(), rtol=1e-5, atol=1e-5)  # HF's is float32


def test_target_sums_equal_an_independent_computation_and_chunking_changes_nothing(tmp_path):
    path = _save("llama", tmp_path / "llama")
    config = EnsembleConfig(members=3, targets=_upper_targets(path), bias=False, dropout=False, sigma_init=0.3)
    ensemble = ensemble_for(path, config, tokens=True, seed=1).double().eval()
    ids = torch.randint(5, 60, (2, 6), generator=torch.Generator().manual_seed(1))
    targets = torch.full_like(ids, -100)
    targets[0, 1:5], targets[1, 2:5] = ids[0, 2:6], ids[1, 3:6]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "target_ids": targets}
    with torch.no_grad():
        sums = target_sums(ensemble, batch)  # [B, M + 3]
        chunked = target_sums(ensemble, batch, members_per_pass=2)
        logits = ensemble(**batch).numpy()  # [N, M, V]
    torch.testing.assert_close(chunked, sums, rtol=1e-12, atol=1e-12)
    log_probs = logits - logsumexp(logits, axis=-1, keepdims=True)
    tokens = targets[targets != -100].numpy()
    member = log_probs[np.arange(len(tokens)), :, tokens]  # [N, M]
    mixture = logsumexp(log_probs, axis=1) - np.log(3)  # [N, V]
    rows = (targets != -100).nonzero()[:, 0].numpy()
    for row in range(2):
        here = rows == row
        np.testing.assert_allclose(sums[row, :3].numpy(), member[here].sum(0), rtol=1e-10)
        np.testing.assert_allclose(float(sums[row, 3]), mixture[here, tokens[here]].sum(), rtol=1e-10)
        assert float(sums[row, 4]) == float((mixture[here].argmax(-1) == tokens[here]).sum())
        assert float(sums[row, 5]) == here.sum()
    metrics = target_metrics(sums)
    assert metrics["tokens"] == len(tokens)
    assert metrics["nll"] == pytest.approx(-mixture[np.arange(len(tokens)), tokens].mean(), rel=1e-10)
    assert metrics["member_nll"] == pytest.approx(-member.mean(), rel=1e-10)


def _polygraph_prr(uncertainty: np.ndarray, quality: np.ndarray) -> float:
    """LM-Polygraph's PredictionRejectionArea, normalised by the oracle's and random's areas, transcribed."""
    def area(scores):
        order = np.argsort(scores, kind="stable")
        kept = np.cumsum(quality[order]) / np.arange(1, len(scores) + 1)
        return kept[::-1].sum() / len(scores)

    random, oracle = quality.mean(), area(-quality)
    return (area(uncertainty) - random) / (oracle - random)


def test_prr_is_lm_polygraphs_and_is_1_for_the_oracle():
    generator = np.random.default_rng(0)
    quality = generator.random(200)
    noisy = -quality + 0.5 * generator.standard_normal(200)
    assert prr(torch.tensor(noisy), torch.tensor(quality)) == pytest.approx(_polygraph_prr(noisy, quality), rel=1e-12)
    assert prr(torch.tensor(-quality), torch.tensor(quality)) == pytest.approx(1.0)
    assert prr(torch.tensor(quality), torch.tensor(quality)) < -0.9  # the worst order
    shuffled = np.mean([prr(torch.tensor(generator.random(200)), torch.tensor(quality)) for _ in range(200)])
    assert abs(shuffled) < 0.05  # a random order: about 0
    assert np.isnan(prr(torch.tensor(noisy), torch.ones(200, dtype=torch.float64)))
    curve = rejection_curve(torch.tensor(noisy), torch.tensor(quality))
    assert float(curve[0]) == pytest.approx(quality.mean())  # nothing rejected


def test_judge_matches_torchmetrics_rouge_and_sklearn_auroc():
    from sklearn.metrics import roc_auc_score
    from torchmetrics.text.rouge import ROUGEScore

    from sve_cli.answers import rouge_l

    answers = ["Howard attacks Budget", "Disney settles charges", "Box office blow", "the cat sat", "Roche turns down"]
    references = ["Howard attacks 'pay later' Budget", "Disney settles disclosure charges", "Box office blow for Alexander",
                  "a dog ran", "Roche 'turns down Federer offer'"]
    ours = rouge_l(answers, references)
    theirs = [float(ROUGEScore(rouge_keys="rougeL")(a, r)["rougeL_fmeasure"]) for a, r in zip(answers, references)]
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    nll = [3.0, 2.0, 4.0, 9.0, 1.0]
    rows = [{"rouge_l": q, "exact_match": 0.0, "log_likelihood": -n, "log_likelihood_per_token": -n / 3,
             "total_entropy_mean": n, "total_entropy_max": n, "expected_entropy_mean": n,
             "mutual_information_mean": 0.1 * n} for q, n in zip(ours, nll)]
    judged = judge(rows, members=4)
    wrong = np.array(ours) < WRONG_BELOW
    assert judged["scores"]["nll"]["auroc_wrong"] == pytest.approx(roc_auc_score(wrong, nll))
    assert judged["rouge_l"] == pytest.approx(np.mean(ours))
    assert "mutual_information" not in judge(rows, members=1)["scores"]  # a single model has no MI


def test_generation_recipes_refuse_what_does_not_apply(tmp_path):
    data = _copy_task(tmp_path)
    path = _generation_recipe(tmp_path / "r.yaml", tmp_path / "model", data)
    with pytest.raises(RecipeError) as error:
        load_recipe(path, ["train.member_batches=shuffled", "eval.metric=ece"])
    assert "train.member_batches" in str(error.value) and "eval.metric" in str(error.value)
    with pytest.raises(RecipeError, match="single_mode"):
        load_recipe(path, ["ensemble.method=single", "ensemble.members=1", "ensemble.single_mode=head"])


def test_generation_run_end_to_end(sve, text_models, tmp_path):
    from transformers import AutoModelForCausalLM

    from sve_cli.rundir import BANK

    data = _copy_task(tmp_path)
    recipe = _generation_recipe(tmp_path / "gen.yaml", text_models["llama"], data)
    run = tmp_path / "run"
    result = sve("train", recipe, "--out", run)
    assert result.code == 0, result.stderr
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"accuracy", "nll", "member_nll", "tokens"} <= set(history[-1])
    from safetensors import safe_open

    with safe_open(str(run / BANK), framework="pt") as handle:  # the shared LM head is not the bank's
        assert not [name for name in handle.keys() if name.startswith("head.")]

    result = sve("evaluate", run, "--max-examples", "4")
    assert result.code == 0, result.stderr
    report = json.loads((run / "report" / "report.json").read_text())
    assert report["examples"] == 4 and len(report["answers"]) == 4
    assert set(report["scores"]) == {"nll", "nll_per_token", "entropy_mean", "entropy_max", "expected_entropy",
                                     "mutual_information"}
    assert (run / "report" / "rejection.png").stat().st_size > 0
    assert_one_error_line(sve("evaluate", run, "--ood", "tweets"), "does not apply to generation runs")
    assert_one_error_line(sve("predict", run, "--data", data), "sve generate")

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {word} twice:"}) + "\n" for word in ("red", "sun", "owl")))
    generations = tmp_path / "generations.jsonl"
    assert_one_error_line(sve("generate", run, "--data", prompts, "--out", generations, "--abstain-coverage", "0.5"),
                          "--fit-thresholds")
    result = sve("evaluate", run, "--max-examples", "4", "--fit-thresholds", "--overwrite")
    assert result.code == 0, result.stderr
    report = json.loads((run / "report" / "report.json").read_text())
    fitted = json.loads((run / "thresholds.json").read_text())
    assert fitted["task"] == "generation" and fitted["examples"] == 4
    validation = sorted(-row["log_likelihood"] for row in report["validation_answers"])
    assert fitted["scores"]["nll"]["coverage"]["0.5"] == validation[1]  # the 2nd surest of 4 keeps half
    threshold = fitted["scores"]["mutual_information"]["coverage"]["0.75"]
    result = sve("generate", run, "--data", prompts, "--out", generations, "--max-new-tokens", "4",
                 "--abstain-coverage", "0.75")
    assert result.code == 0, result.stderr
    rows = [json.loads(line) for line in generations.read_text().splitlines()]
    assert [row["abstain"] for row in rows] == [row["mutual_information_mean"] > threshold for row in rows]
    assert_one_error_line(sve("generate", run, "--data", prompts, "--out", generations, "--overwrite",
                              "--abstain-coverage", "0.9", "--abstain-score", "msp"), "none of")

    out = tmp_path / "member1"
    assert sve("export", run, "--format", "safetensors", "--member", "1", "--out", out).code == 0
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    from sve_cli.pipeline import load_ensemble
    from sve_cli.rundir import open_run

    pipeline, model, _ = load_ensemble(*open_run(run))
    batch = pipeline.encode(pipeline_examples(run)).batch(torch.arange(3))
    with torch.no_grad():
        ours = model(**batch)[:, 1]  # [N, V]: member 1
        theirs = exported(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(ours, theirs[batch["target_ids"] != -100], rtol=1e-4, atol=1e-4)

    from sve_cli.ensemble import lm_head_weight
    from sve_cli.generation import decoder_for

    decoder = decoder_for(model, pipeline, 4)[0]  # decodes with the run's own LM head, not a second copy
    assert decoder.lm_head.data_ptr() == model.head.weight.data_ptr()
    assert torch.equal(decoder.lm_head, lm_head_weight(pipeline.checkpoint))


def pipeline_examples(run):
    from sve_cli.data import load_splits
    from sve_cli.rundir import open_run

    recipe, _ = open_run(run)
    return load_splits(recipe.task, "test")[0][recipe.task.test_split]


def test_builtin_bbc_headlines_pairs_each_articles_opening_with_its_own_title():
    from sve_cli.data import HEADLINE_WORDS, load_source

    articles = load_source("builtin:bbc_news").frame["text"]
    headlines = load_source("builtin:bbc_headlines").frame
    assert len(headlines) == len(articles)
    for index in (0, 500, len(articles) - 1):
        title, _, body = articles[index].partition("\n")
        assert headlines["target"][index] == title.strip() and title.strip()
        prompt = headlines["prompt"][index]
        assert prompt == "Article: " + " ".join(body.split()[:HEADLINE_WORDS]) + "\nHeadline:"


def _two_word_model(source, directory):
    """The tiny LLaMA rigged to say only " red" or " blue": the final norm keeps one hidden dimension, and
    the (tied) output rows of those two words read it with opposite signs, so every answer is a string of
    them — a random model's answers would share no word with any reference (ROUGE-L 0 everywhere)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from conftest import _copy_tokenizer

    model = LlamaForCausalLM.from_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    (red,), (blue,) = tokenizer(" red")["input_ids"], tokenizer(" blue")["input_ids"]
    with torch.no_grad():
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        embeddings = model.model.embed_tokens.weight
        embeddings[red], embeddings[blue] = 0.0, 0.0
        embeddings[red, 0], embeddings[blue, 0] = 10.0, -10.0
    model.save_pretrained(directory)
    _copy_tokenizer(source, directory)
    return directory


def test_rouge_l_validation_keeps_the_step_whose_answers_evaluate_reproduces(sve, text_models, tmp_path):
    """`eval.metric: rouge_l` answers the validation prompts at each evaluation and keeps the best step; `sve
    evaluate --fit-thresholds` answering the same split with the kept bank finds the same mean ROUGE-L."""
    data = _copy_task(tmp_path, words=("red", "blue", "cat"))
    model = _two_word_model(text_models["llama"], tmp_path / "two_words")
    recipe = _generation_recipe(tmp_path / "gen.yaml", model, data)
    run = tmp_path / "run"
    result = sve("train", recipe, "--out", run, "--set", "eval.metric=rouge_l")
    assert result.code == 0, result.stderr
    assert "ROUGE-L" in result.stdout
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in history] == [2, 4] and all(0 <= line["rouge_l"] <= 1 for line in history)
    state = json.loads((run / "trainer_state.json").read_text())
    kept = next(line for line in history if line["step"] == state["best_step"])
    assert kept["rouge_l"] == max(line["rouge_l"] for line in history) == state["best"]

    assert sve("evaluate", run, "--fit-thresholds").code == 0
    answers = json.loads((run / "report" / "report.json").read_text())["validation_answers"]
    assert {word for row in answers for word in row["answer"].split()} <= {"red", "blue"}
    assert 0 < kept["rouge_l"] < 1  # some answers share a word with their reference, not all of them
    assert answers and abs(sum(row["rouge_l"] for row in answers) / len(answers) - kept["rouge_l"]) < 1e-12

    timed = sve("train", recipe, "--out", tmp_path / "timed", "--set", "eval.metric=rouge_l", "--dry-run", "--time")
    assert timed.code == 0 and "evaluation(s)" in timed.stdout, timed.stderr


def test_rouge_l_is_refused_for_a_classification_recipe():
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "sve_cli" / "recipes" / "quickstart.yaml"
    with pytest.raises(RecipeError, match="eval.metric: rouge_l judges generated answers, and this is a "
                                          "text_classification recipe"):
        load_recipe(recipe, ["eval.metric=rouge_l"])
