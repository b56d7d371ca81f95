"""Every common family end to end, as a new user would run it: a tiny random checkpoint saved the way
users' checkpoints are (a masked-LM, causal-LM or base-model class, a real tokenizer beside it), default
recipe keys, no `--targets`: decompose -> train -> evaluate -> export, and the exported member, loaded by
plain transformers (or sentence-transformers) in a fresh process, reproduces the member's logits."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import _copy_tokenizer, assert_one_error_line, sentiment_file, train_run, write_recipe

pytestmark = pytest.mark.slow  # the family matrix (~100 s of setup) runs in `make test`, not `make test-fast`

COMMON = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
ENCODER = dict(COMMON, vocab_size=30522, pad_token_id=0)
DECODER = dict(COMMON, vocab_size=49152, num_key_value_heads=2, pad_token_id=2, bos_token_id=1, eos_token_id=2)
VISION = dict(COMMON, image_size=8, patch_size=4, num_channels=1)
# family -> (config class, saved model class, config overrides, tokenizer, class the member exports to)
FAMILIES = {
    "bert": ("BertConfig", "BertForMaskedLM", ENCODER, "minilm", "BertForSequenceClassification"),
    "roberta": ("RobertaConfig", "RobertaForMaskedLM", ENCODER, "minilm", "RobertaForSequenceClassification"),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaForMaskedLM", ENCODER, "minilm", "XLMRobertaForSequenceClassification"),
    "distilbert": ("DistilBertConfig", "DistilBertForMaskedLM", dict(vocab_size=30522, dim=32, hidden_dim=48, n_layers=2,
                   n_heads=4, max_position_embeddings=64, pad_token_id=0), "minilm", "DistilBertForSequenceClassification"),
    "deberta-v2": ("DebertaV2Config", "DebertaV2ForMaskedLM", ENCODER, "minilm", "DebertaV2ForSequenceClassification"),
    "electra": ("ElectraConfig", "ElectraForPreTraining", dict(ENCODER, embedding_size=16), "minilm",
                "ElectraForSequenceClassification"),
    "llama": ("LlamaConfig", "LlamaForCausalLM", DECODER, "smollm2", "LlamaForSequenceClassification"),
    "mistral": ("MistralConfig", "MistralForCausalLM", DECODER, "smollm2", "MistralForSequenceClassification"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", DECODER, "smollm2", "Qwen2ForSequenceClassification"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(DECODER, head_dim=8), "smollm2", "Qwen3ForSequenceClassification"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", DECODER, "smollm2", "Phi3ForSequenceClassification"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=49152, n_embd=32, n_layer=2, n_head=4, n_positions=64,
             bos_token_id=1, eos_token_id=2), "smollm2", "GPT2ForSequenceClassification"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", DECODER, "smollm2", "GPTNeoXForSequenceClassification"),
    "vit": ("ViTConfig", "ViTModel", VISION, None, "ViTForImageClassification"),
    "deit": ("DeiTConfig", "DeiTModel", VISION, None, "DeiTForImageClassification"),
    "dinov2": ("Dinov2Config", "Dinov2Model", VISION, None, "Dinov2ForImageClassification"),
    # in none of sve's tables: the spec is inferred
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(DECODER, n_layer=2, n_head=4), "smollm2",
              "BloomForSequenceClassification"),
    "megatron-bert": ("MegatronBertConfig", "MegatronBertForMaskedLM", ENCODER, "minilm",
                      "MegatronBertForSequenceClassification"),
    "mpnet": ("MPNetConfig", "MPNetForMaskedLM", ENCODER, "minilm", "SentenceTransformer"),
    # a mixture of experts: its attention is ensembled, its experts (3-D tensors once loaded) stay frozen
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(DECODER, num_local_experts=4, num_experts_per_tok=2),
                "smollm2", "MixtralForSequenceClassification"),
}
DECODERS = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2", "gpt_neox", "bloom", "mixtral"]
TEXTS = ["the film was great", "the meal was truly awful and cold", "the trip was lovely"]
PROMPTS = ["Which is a colour? (1)\nA) red\nB) run\nC) rock\nAnswer:", "Which is a colour? (22)\nA) red\nB) run\nC) rock\nAnswer:"]


def _save_family(family: str, directory, tokenizers) -> None:
    import transformers

    config_class, model_class, options, tokenizer, _ = FAMILIES[family]
    torch.manual_seed(0)
    getattr(transformers, model_class)(getattr(transformers, config_class)(**options)).save_pretrained(directory)
    if tokenizer:
        _copy_tokenizer(tokenizers[tokenizer], directory)


def _arc_file(directory):
    path = directory / "arc.jsonl"
    path.write_text("".join(json.dumps({"question": f"Which is a colour? ({i})",
                                        "choices": {"text": ["red", "run", "rock"], "label": ["A", "B", "C"]},
                                        "answerKey": "ABC"[i % 3]}) + "\n" for i in range(48)))
    return path


def _member_logits(run, member: int):
    """Member `member`'s calibrated logits from the run's own ensemble, and the inputs they were computed on."""
    from sve_cli.data import Examples, load_splits
    from sve_cli.pipeline import load_ensemble
    from sve_cli.recipe import load_recipe

    recipe = load_recipe(run / "recipe.yaml")
    pipeline, model, metadata = load_ensemble(recipe, run / "sigma_bank.safetensors")
    if recipe.task.type == "image_classification":
        splits, _ = load_splits(recipe.task, recipe.task.dataset)
        inputs = pipeline.encode(splits[recipe.task.test_split]).batch(torch.arange(3))
    else:
        texts = PROMPTS if recipe.task.type == "multiple_choice" else TEXTS
        encoded = pipeline.encode(Examples(torch.zeros(len(texts), dtype=torch.long), texts=texts))
        inputs = encoded.batch(torch.arange(len(texts)))
    with torch.no_grad():  # an exported member folds its own fitted temperature into its classifier
        logits = model(**inputs)[:, member] / metadata["calibration"]["member_temperatures"][member]  # [B, C]
    letters = None
    if recipe.task.type == "multiple_choice":
        from sve_cli.pipeline import letter_token_id

        letters = [letter_token_id(pipeline.tokenizer, letter) for letter in metadata["letters"]]
    return logits, inputs, letters


PLAIN = textwrap.dedent("""
    import json, sys, torch, transformers
    from safetensors.torch import load_file, save_file
    results = {}
    for job in json.load(open(sys.argv[1])):
        inputs = load_file(job["inputs"])
        if job["class"] == "SentenceTransformer":
            from sentence_transformers import SentenceTransformer
            logits = SentenceTransformer(job["directory"], device="cpu").encode(job["texts"], convert_to_tensor=True)
        else:
            model = getattr(transformers, job["class"]).from_pretrained(job["directory"]).eval()
            with torch.no_grad():
                logits = model(**inputs).logits
            if logits.dim() == 3:  # causal LM: the last real position of every row, the letters' columns
                last = inputs["attention_mask"].sum(1) - 1
                logits = logits[torch.arange(len(last)), last][:, job["letters"]]
        results[job["name"]] = logits.contiguous()
    assert not any(name.startswith("sve_cli") for name in sys.modules), "sve was imported"
    save_file(results, sys.argv[2])
""")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, minilm_path):
    """Every family trained, evaluated and exported (member 1); plain logits computed in one fresh process."""
    from sve_cli.checkpoint import resolve_model
    from sve_cli.evaluate import evaluate_run
    from sve_cli.export import export_merged

    root = tmp_path_factory.mktemp("families")
    tokenizers = {"minilm": minilm_path, "smollm2": resolve_model("builtin:smollm2")}
    texts, arc = sentiment_file(root), _arc_file(root)
    jobs, ours, results = [], {}, {}
    runs = [(family, "text") for family in FAMILIES] + [(family, "letters") for family in DECODERS]
    for family, task in runs:
        name = f"{family}-{task}"
        model = root / "models" / family
        if not model.exists():
            _save_family(family, model, tokenizers)
        image = FAMILIES[family][3] is None
        sections = {"ensemble": {"members": 2}, "train": {"max_steps": 2, "lr": 5e-2}}
        if image:
            sections["task"] = {"type": "image_classification", "dataset": "builtin:digits", "max_train_examples": 32,
                                "max_eval_examples": 16}
        elif task == "letters":
            sections["task"] = {"type": "multiple_choice", "max_length": 48}
        (root / "runs").mkdir(exist_ok=True)
        run = train_run(root / "runs", name, model, arc if task == "letters" else texts, **sections)
        evaluation = evaluate_run(run)
        export = export_merged(run, root / "exports" / name, member=1)
        logits, inputs, letters = _member_logits(run, 1)
        save_file({k: v.contiguous() for k, v in inputs.items()}, str(root / f"{name}.inputs.safetensors"))
        jobs.append({"name": name, "directory": str(root / "exports" / name), "inputs": str(root / f"{name}.inputs.safetensors"),
                     "class": "SentenceTransformer" if export["library"] == "sentence-transformers" else
                     export["architecture"], "letters": letters, "texts": TEXTS})
        ours[name] = logits
        results[name] = {"export": export, "evaluation": evaluation, "run": run}
    (root / "jobs.json").write_text(json.dumps(jobs))
    script = root / "plain.py"
    script.write_text(PLAIN)
    done = subprocess.run([sys.executable, str(script), str(root / "jobs.json"), str(root / "plain.safetensors")],
                          capture_output=True, text=True, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    plain = load_file(root / "plain.safetensors")
    return {name: {**results[name], "ours": ours[name], "plain": plain[name]} for name in ours}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_exports_its_own_classifier_and_reproduces_the_member(exported, family):
    result = exported[f"{family}-text"]
    expected = FAMILIES[family][4]
    shown = "SentenceTransformer" if result["export"]["library"] == "sentence-transformers" else result["export"]["architecture"]
    assert shown == expected
    assert 0.0 <= result["evaluation"].metrics["accuracy"] <= 1.0 and result["evaluation"].prediction.members == 2
    torch.testing.assert_close(result["plain"], result["ours"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", DECODERS)
def test_decoder_letter_head_exports_as_its_causal_lm(exported, family):
    result = exported[f"{family}-letters"]
    assert result["export"]["architecture"].endswith(("ForCausalLM", "LMHeadModel"))
    torch.testing.assert_close(result["plain"], result["ours"], rtol=1e-4, atol=1e-4)


def test_members_own_a_bias_exactly_where_the_base_layer_has_one(exported):
    from safetensors import safe_open

    with safe_open(str(exported["qwen2-text"]["run"] / "sigma_bank.safetensors"), "pt") as bank:
        biases = {key.rsplit(".", 2)[-2] for key in bank.keys() if key.endswith(".bias") and not key.startswith("head")}
    assert biases == {"q_proj", "k_proj", "v_proj"}  # Qwen2's attention projections, never its MLP


def test_unlisted_families_are_inferred_and_say_so(sve, exported, tmp_path):
    from sve_cli.architectures import ARCHITECTURES

    assert not {"bloom", "megatron-bert", "mpnet"} & set(ARCHITECTURES)
    model = exported["bloom-text"]["run"].parent.parent / "models" / "bloom"
    result = sve("decompose", model, "--dry-run")
    assert result.code == 0, result.stderr
    assert "these targets were inferred" in " ".join(result.stdout.split())
    from sve_cli.decompose import plan_decomposition

    plan = plan_decomposition(str(model))
    layers = {t.name.split(".", 3)[3] for t in plan.targets}  # transformer.h.<i>.<layer>
    assert plan.inferred and layers == {"self_attention.query_key_value.weight", "self_attention.dense.weight",
                                        "mlp.dense_h_to_4h.weight", "mlp.dense_4h_to_h.weight"}
    assert len(plan.targets) == 2 * 4  # two blocks; never embeddings, norms or heads


def test_a_mixture_of_experts_says_its_experts_stay_frozen(sve, exported):
    model = exported["mixtral-text"]["run"].parent.parent / "models" / "mixtral"
    plan = " ".join(sve("decompose", model, "--dry-run").stdout.split())
    assert "mixture of experts that transformers loads as 3-D tensors" in plan and "experts stay frozen" in plan
    assert_one_error_line(sve("decompose", model, "--targets", "mlp", "--dry-run"), "`--targets attention`")
    assert_one_error_line(sve("decompose", model, "--targets", "*.experts.0.w1.weight", "--dry-run"), "experts stay frozen")
    from sve_cli.bank import read_bank_metadata

    targets = read_bank_metadata(exported["mixtral-text"]["run"] / "sigma_bank.safetensors")["targets"]
    assert len(targets) == 8 and all(".self_attn." in name for name in targets)  # 4 projections × 2 blocks


@pytest.mark.parametrize("kind", ["T5ForConditionalGeneration", "T5EncoderModel"])
def test_t5_is_refused_in_one_line_at_decompose_and_train(sve, kind, tmp_path):
    import transformers

    model = tmp_path / "t5"
    torch.manual_seed(0)
    getattr(transformers, kind)(transformers.T5Config(vocab_size=64, d_model=32, d_ff=48, num_layers=2, num_heads=4,
                                                      d_kv=8)).save_pretrained(model)
    assert_one_error_line(sve("decompose", model, "--out", tmp_path / "cache"), "model_type 't5' is not supported")
    recipe = write_recipe(tmp_path / "r.yaml", model, sentiment_file(tmp_path), ensemble={"targets": "*.q.weight"})
    assert_one_error_line(sve("train", recipe, "--out", tmp_path / "run"), "model_type 't5' is not supported")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()
