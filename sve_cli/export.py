"""`sve export`: a merged member as a plain Hugging Face checkpoint, or the compact Σ bank.

The merged checkpoint is streamed tensor by tensor from the base checkpoint, the decomposition
cache and the bank — the model is never built in memory: every targeted weight becomes
`U diag(f(sigma_m)) Vh` (f = relu or softplus), its bias `b_m`, and member m's head becomes the
architecture's own classifier (or the LM-head rows of the answer letters). Plain `transformers`
loads the result with no `sve` import and reproduces member m's logits.

A member whose head reads another representation than the architecture's classifier (MiniLM's
mean pooling) is written as a sentence-transformers folder instead: the merged backbone
(`AutoModel`), its `Pooling` module and a `Dense` module (identity activation) holding the head,
so `SentenceTransformer(folder).encode(texts)` returns the member's logits.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from sve_cli import __version__
from sve_cli.bank import read_bank_metadata
from sve_cli.checkpoint import Checkpoint, open_checkpoint, source_fingerprint, tensor_fingerprint
from sve_cli.writing import (SAFETENSORS_DTYPES, ShardWriter, parse_size, plan_shards, save_safetensors, write_index,
                             write_json)
from sve_cli.factors import FactorCache, default_output
from sve_cli.errors import OutputExistsError, SveError
from sve_cli.heads import native_representation
from sve_cli.layer import nonnegative
from sve_cli.selective import file_fingerprint
from sve_cli.rundir import BANK, RECIPE, THRESHOLDS, open_run

# model_type -> (classification class, base-model prefix, head weight, head bias)
CLASSIFIERS = {
    "bert": ("BertForSequenceClassification", "bert", "classifier.weight", "classifier.bias"),
    "vit": ("ViTForImageClassification", "vit", "classifier.weight", "classifier.bias"),
    "dinov2": ("Dinov2ForImageClassification", "dinov2", "classifier.weight", "classifier.bias"),
    **{t: (f"{n}ForSequenceClassification", "model", "score.weight", None)
       for t, n in (("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2"), ("qwen3", "Qwen3"))},
}
CAUSAL = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
          "qwen3": "Qwen3ForCausalLM"}
BACKBONES = {"bert": "BertModel", "llama": "LlamaModel", "mistral": "MistralModel", "qwen2": "Qwen2Model",
             "qwen3": "Qwen3Model"}  # what sentence-transformers' Transformer module loads
ST_POOLING = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens",
              "last_token": "pooling_mode_lasttoken"}
HEAD_PREFIXES = ("classifier.", "score.", "lm_head.", "cls.")  # never part of the exported backbone
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "preprocessor_config.json", "generation_config.json")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class RunBank:
    """A finished run: its recipe, bank tensors (lazy) and metadata, and its base checkpoint."""

    run: Path
    recipe: object
    metadata: dict
    bank: object  # safe_open handle
    base: Checkpoint

    @classmethod
    def open(cls, run: Path, bank: Path | None = None) -> "RunBank":
        run = Path(run)
        recipe, bank = open_run(run, bank)
        metadata = read_bank_metadata(bank)
        base = open_checkpoint(recipe.model.path)
        targets = metadata["targets"]
        missing = [t for t in targets if t not in base.files]
        fingerprints = {} if missing else {t: tensor_fingerprint(base.read(t)) for t in targets}
        if missing or source_fingerprint(fingerprints) != metadata["source_fingerprint"]:
            raise SveError(f"the base checkpoint {recipe.model.path} no longer matches the bank of {run} "
                           "(its targeted weights changed since training)")
        return cls(run, recipe, metadata, safe_open(str(bank), framework="pt"), base)

    def tensor(self, name: str) -> torch.Tensor:
        return self.bank.get_tensor(name)


def _member_value(bank: RunBank, name: str, member: int | str) -> torch.Tensor:
    """Member m's slice of a bank tensor `[M, …]`, or the mean over members."""
    tensor = bank.tensor(name).float()
    return tensor.mean(dim=0) if member == "mean" else tensor[member]


def _merged_weight(bank: RunBank, cache: FactorCache | None, target: str, member: int | str) -> torch.Tensor:
    module, method = target.removesuffix(".weight"), bank.metadata["method"]
    if method in ("sve", "svf"):
        sigma = _member_value(bank, f"{module}.sigma", member)
        values = nonnegative(sigma, bank.metadata["parameterisation"])
        U, _, Vh = cache.factors(target)
        return (U.float() * values) @ Vh.float()  # [out, in]
    if method == "lora_ensemble":
        scale = bank.recipe.ensemble.lora_alpha / bank.recipe.ensemble.lora_rank
        update = (_member_value(bank, f"{module}.lora_B", member) @ _member_value(bank, f"{module}.lora_A", member)
                  if member != "mean" else
                  (bank.tensor(f"{module}.lora_B").float() @ bank.tensor(f"{module}.lora_A").float()).mean(0))
        return bank.base.read(target).float() + scale * update
    return _member_value(bank, f"{module}.weight", member)


def sentence_transformers_layout(bank: RunBank) -> bool:
    """True when the member's head reads another representation than the architecture's classifier."""
    native = native_representation(bank.base.model_type)
    return bank.metadata["head"] != "letters" and bank.metadata.get("representation", native) != native


def _plan_tensors(bank: RunBank, member: int | str) -> tuple[dict[str, tuple], dict[str, object], str]:
    """Output name -> (shape, source); plus config changes and the output class."""
    base, metadata = bank.base, bank.metadata
    model_type = base.model_type
    letters = metadata["head"] == "letters"
    pooled = sentence_transformers_layout(bank)
    if pooled:  # the backbone alone, unprefixed as AutoModel saves it; the head goes into 2_Dense
        architecture, prefix = BACKBONES.get(model_type), CLASSIFIERS.get(model_type, (None, "model"))[1]
    elif letters:
        architecture, prefix = CAUSAL.get(model_type), "model"
    elif model_type in CLASSIFIERS:
        architecture, prefix = CLASSIFIERS[model_type][:2]
    else:
        architecture = None
    if architecture is None:
        what = f"{metadata.get('representation')}-pooled encoder" if pooled else "causal LM" if letters else "classifier"
        raise SveError(f"exporting a {model_type} {what} is not supported")
    targets = set(metadata["targets"])
    dropped = HEAD_PREFIXES + (("pooler.",) if model_type in ("vit", "dinov2") else ())  # their classifiers add none
    plan: dict[str, tuple] = {}
    for name in base.names:
        if name.startswith(dropped) or name.removeprefix(f"{prefix}.").startswith(dropped):
            continue
        if pooled:
            out_name = name.removeprefix(f"{prefix}.")
        else:
            out_name = name if name.startswith(f"{prefix}.") else f"{prefix}.{name}"
        plan[out_name] = (base.shape(name), ("target", name) if name in targets else ("copy", name))
        module = name.removesuffix(".weight")
        if name in targets and f"{module}.bias" in bank.bank.keys():
            bias_name = f"{module}.bias"
            if bias_name not in base.files:
                raise SveError(f"members own a bias on '{module}', which {architecture} cannot hold; "
                               "train with ensemble.bias: false to export this model")
            plan[out_name.removesuffix(".weight") + ".bias"] = (base.shape(bias_name), ("bias", bias_name))
    config_update: dict[str, object] = {"architectures": [architecture]}
    if pooled:
        return plan, config_update, architecture
    if letters:
        embed = "lm_head.weight" if "lm_head.weight" in base.files else f"{prefix}.embed_tokens.weight"
        plan["lm_head.weight"] = (base.shape(embed), ("letters", embed))
        config_update["tie_word_embeddings"] = False  # the letter rows differ from the embeddings now
    else:
        _, _, weight_name, bias_name = CLASSIFIERS[model_type]
        head = bank.tensor("head.weight")
        plan[weight_name] = (tuple(head.shape[1:]), ("head", "head.weight"))
        if bias_name:
            plan[bias_name] = ((head.shape[1],), ("head", "head.bias"))
        labels = metadata["label_names"]
        config_update.update(num_labels=len(labels), id2label={str(i): l for i, l in enumerate(labels)},
                             label2id={l: i for i, l in enumerate(labels)})
        if model_type in CAUSAL and bank.recipe.task.type != "image_classification":
            config_update["pad_token_id"] = _pad_token_id(base)
    return plan, config_update, architecture


def _pad_token_id(base: Checkpoint) -> int | None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base.directory)
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _cache_for(bank: RunBank) -> FactorCache | None:
    if bank.metadata["method"] not in ("sve", "svf"):
        return None
    recipe = bank.recipe
    path = Path(recipe.model.decomposition) if recipe.model.decomposition else default_output(
        recipe.model.path, recipe.ensemble.targets)
    cache = FactorCache(path)
    if cache.fingerprint != bank.metadata["decomposition_fingerprint"]:
        raise SveError(f"decomposition {path} is not the one the bank was trained with")
    return cache


def _produce(bank: RunBank, cache: FactorCache | None, source: tuple[str, str], member: int | str) -> torch.Tensor:
    kind, name = source
    if kind == "copy":
        return bank.base.read(name)
    if kind == "target":
        return _merged_weight(bank, cache, name, member)
    if kind == "bias":
        return _member_value(bank, f"{name.removesuffix('.bias')}.bias", member)
    if kind == "head":
        return _member_value(bank, name, member)
    lm_head = bank.base.read(name).float().clone()  # "letters": the member's rows replace the letters'
    from transformers import AutoTokenizer

    from sve_cli.pipeline import letter_token_id

    tokenizer = AutoTokenizer.from_pretrained(bank.base.directory)
    rows = [letter_token_id(tokenizer, letter) for letter in bank.metadata["letters"]]
    lm_head[rows] = _member_value(bank, "head.weight", member)
    return lm_head


def export_merged(run: Path, out: Path, member: int | str = 0, dtype: str | None = None,
                  max_shard_size: str = "5GB", overwrite: bool = False) -> dict:
    """Write member `member` (or "mean") of `run` as a standard HF checkpoint directory at `out`."""
    bank = RunBank.open(run)
    members = bank.metadata["members"]
    if member != "mean" and not 0 <= member < members:
        raise SveError(f"--member {member} is out of range: the run has {members} member(s) (0…{members - 1})")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it")
    if dtype is not None and dtype not in DTYPES:
        raise SveError(f"unknown --dtype '{dtype}' (float32, float16 or bfloat16)")
    cache = _cache_for(bank)
    plan, config_update, architecture = _plan_tensors(bank, member)
    codes = {code: torch_dtype for torch_dtype, code in SAFETENSORS_DTYPES.items()}
    reference = bank.metadata["targets"][0] if bank.metadata["targets"] else bank.base.names[0]
    out_dtype = DTYPES[dtype] if dtype else codes[bank.base.dtype(reference)]  # follows the base
    sizes = [(name, torch.Size(shape).numel() * out_dtype.itemsize) for name, (shape, _) in plan.items()]
    shards = plan_shards(sizes, parse_size(max_shard_size), prefix="model", single_name="model.safetensors")

    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with ShardWriter(staging) as writer:
            for shard in shards:
                layout = [(name, out_dtype, tuple(plan[name][0])) for name in shard.names]
                writer.begin(shard.filename, layout, {})
                for name in shard.names:
                    writer.add(name, _produce(bank, cache, plan[name][1], member).to(out_dtype).contiguous())
                writer.commit()
        if len(shards) > 1:
            write_index(staging / "model.safetensors.index.json",
                        {name: s.filename for s in shards for name in s.names}, sum(size for _, size in sizes))
        config = {**bank.base.config, **config_update, "dtype": str(out_dtype).removeprefix("torch."),
                  "sve": {"run": str(Path(run).resolve()), "member": member, "members": members,
                          "method": bank.metadata["method"], "tool": f"sve {__version__}"}}
        config.pop("torch_dtype", None)
        write_json(staging / "config.json", config)
        for name in TOKENIZER_FILES:
            if (bank.base.directory / name).exists():
                shutil.copy2(bank.base.directory / name, staging / name)
        shutil.copy2(Path(run) / RECIPE, staging / "sve_recipe.yaml")
        if sentence_transformers_layout(bank):
            _sentence_transformers_modules(bank, member, staging, out_dtype)
            architecture = "SentenceTransformer"
        (staging / "README.md").write_text(_model_card(bank, member, architecture), encoding="utf-8")
        _replace_directory(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"out": out, "architecture": architecture, "shards": len(shards), "bytes": sum(size for _, size in sizes)}


def _sentence_transformers_modules(bank: RunBank, member: int | str, staging: Path, dtype: torch.dtype) -> None:
    """modules.json, the pooling config, and a Dense module that holds member m's head."""
    weight = _member_value(bank, "head.weight", member)  # [C, d]
    modules = [("", "sentence_transformers.models.Transformer"), ("1_Pooling", "sentence_transformers.models.Pooling"),
               ("2_Dense", "sentence_transformers.models.Dense")]
    (staging / "modules.json").write_text(json.dumps(
        [{"idx": i, "name": str(i), "path": path, "type": kind} for i, (path, kind) in enumerate(modules)], indent=2))
    write_json(staging / "sentence_bert_config.json", {"max_seq_length": bank.recipe.task.max_length,
                                                       "do_lower_case": False})
    mode = ST_POOLING[bank.metadata["representation"]]
    write_json(staging / "1_Pooling" / "config.json", {"word_embedding_dimension": weight.shape[1],
                                                       **{key: key == mode for key in ST_POOLING.values()}})
    write_json(staging / "2_Dense" / "config.json", {"in_features": weight.shape[1], "out_features": weight.shape[0],
                                                     "bias": True, "activation_function": "torch.nn.modules.linear.Identity"})
    bias = _member_value(bank, "head.bias", member) if "head.bias" in bank.bank.keys() else torch.zeros(weight.shape[0])
    save_safetensors(staging / "2_Dense" / "model.safetensors",
                     {"linear.weight": weight.to(dtype).contiguous(), "linear.bias": bias.to(dtype).contiguous()}, {})


def _replace_directory(staging: Path, out: Path) -> None:
    """Move the finished export into place; an existing output is removed only after that succeeds."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)


def _model_card(bank: RunBank, member: int | str, architecture: str) -> str:
    metadata, recipe = bank.metadata, bank.recipe
    which = ("the mean of all members' singular values, biases and heads — a single-model summary, "
             "not any trained member" if member == "mean" else f"member {member} of {metadata['members']}")
    library = "sentence-transformers" if architecture == "SentenceTransformer" else "transformers"
    usage = ("`SentenceTransformer(folder).encode(texts)` returns the logits (its last module, a Dense layer, "
             f"is the member's head over the {metadata.get('representation')}-pooled tokens)"
             if library == "sentence-transformers" else f"`{architecture}`")
    return f"""---
base_model: {recipe.model.path}
library_name: {library}
tags:
- sve
- singular-value-ensemble
- {recipe.task.type.replace('_', '-')}
---

# {architecture} exported from an SVE run

This checkpoint is {which} of a {metadata['method']} ensemble trained by `sve` {__version__}
on `{recipe.task.dataset}` ({recipe.task.type}). Every targeted weight is `U diag(s_m) Vh` with the
base model's frozen singular vectors; it loads with plain `{library}` ({usage}), no `sve`
import needed. Labels, in the order of the logits: {', '.join(metadata['label_names'])}.

A single member does not carry the ensemble's uncertainty estimates: use `sve evaluate` on the run,
or the Σ bank (`sve export --format sigma-bank`), for those. The recipe that produced it is
`sve_recipe.yaml`.
"""


def export_bank(run: Path, out: Path, overwrite: bool = False) -> dict:
    """Write the run's Σ bank to `out` (atomically), with its resolved recipe and, when `sve
    evaluate` fitted them for this bank, the abstention thresholds in its metadata: with the base
    model it is all `sve predict` needs. Returns its size next to the base checkpoint's."""
    bank = RunBank.open(run)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it")
    with safe_open(str(Path(run) / BANK), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        metadata = dict(handle.metadata() or {})
    metadata.setdefault("sve.recipe", json.dumps(bank.recipe.model_dump(mode="json")))
    thresholds = Path(run) / THRESHOLDS
    if thresholds.exists():
        fitted = json.loads(thresholds.read_text(encoding="utf-8"))
        if fitted.get("bank") == file_fingerprint(Path(run) / BANK):
            metadata["sve.thresholds"] = json.dumps(fitted)
    save_safetensors(out, tensors, metadata)
    base_bytes = sum(f.stat().st_size for f in set(bank.base.files.values()))
    return {"out": out, "bytes": out.stat().st_size, "base_bytes": base_bytes,
            "share": out.stat().st_size / base_bytes, "members": bank.metadata["members"]}


def bank_share_from_shapes(shapes: list[tuple[int, int]], members: int, bias: bool, base_parameters: int,
                           base_bytes_per_parameter: int, head: tuple[int, int] = (0, 0)) -> float:
    """Bank bytes (float32) over the base checkpoint's bytes, from shapes alone."""
    per_member = sum(min(out, inp) + (out if bias else 0) for out, inp in shapes) + head[0] * (head[1] + 1)
    return 4 * members * per_member / (base_parameters * base_bytes_per_parameter)
