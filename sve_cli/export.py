"""`sve export`: a merged member as a plain Hugging Face checkpoint, or the compact Σ bank.

The merged checkpoint is streamed tensor by tensor from the base checkpoint, the decomposition
cache and the bank — the model is never built in memory: every targeted weight becomes
`U diag(s_m) Vh` (s_m = S ⊙ relu(1 + sigma_m) `relative`, relu(sigma_m) `clamp`, softplus(sigma_m)
`softplus`: `sve_cli.layer.singular_values`), its bias `b_m`, and member m's head becomes the
architecture's own classifier (or the LM-head rows of the answer letters). Plain `transformers`
loads the result with no `sve` import and reproduces member m's logits.

A member whose head reads another representation than the architecture's classifier (MiniLM's
mean pooling) is written as a sentence-transformers folder instead: the merged backbone
(`AutoModel`), its `Pooling` module and a `Dense` module (identity activation) holding the head,
so `SentenceTransformer(folder).encode(texts)` returns the member's logits.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from sve_cli import __version__
from sve_cli.bank import BANK_OUTPUT, base_changed, read_bank_metadata
from sve_cli.checkpoint import Checkpoint, open_checkpoint
from sve_cli.tensors import DTYPE_NAMES, TORCH_DTYPES, source_fingerprint
from sve_cli.writing import (ShardWriter, claim_temporary, forget_temporary, parse_size, plan_shards,
                             record_temporary, remove_temporary, save_safetensors, write_index, write_json)
from sve_cli.factors import FactorCache, default_output
from sve_cli.errors import SveError
from sve_cli.outputs import EXPORT, check_output, output_lock
from sve_cli.architectures import Architecture, BackboneLayout, architecture
from sve_cli.baselines import lora_merged
from sve_cli.layer import merged_weight, singular_values
from sve_cli.metrics import temperature_of
from sve_cli.rundir import BANK, CONFORMAL, RECIPE, THRESHOLDS, open_run, read_fitted

ST_POOLING = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens",
              "last_token": "pooling_mode_lasttoken"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "preprocessor_config.json", "generation_config.json")
EXPORT_DTYPES = ("float32", "float16", "bfloat16")


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
        fingerprints = {} if missing else {t: base.fingerprint(t) for t in targets}
        if missing or source_fingerprint(fingerprints) != metadata["source_fingerprint"]:
            raise SveError(f"the base checkpoint {recipe.model.path} no longer matches the bank of {run} "
                           "(its targeted weights changed since training)")
        if metadata.get("base_fingerprint", "") not in ("", base.sampled_fingerprint()):  # banks before 0.1 lack it
            raise SveError(base_changed(recipe.model.path))
        return cls(run, recipe, metadata, safe_open(str(bank), framework="pt"), base)

    def tensor(self, name: str) -> torch.Tensor:
        return self.bank.get_tensor(name)


def _member_value(bank: RunBank, name: str, member: int | str) -> torch.Tensor:
    """Member m's slice of a bank tensor `[M, …]`, or the mean over members."""
    tensor = bank.tensor(name).float()
    return tensor.mean(dim=0) if member == "mean" else tensor[member]


def member_temperature(metadata: dict, member: int | str) -> float:
    """The temperature member m's classifier is divided by on export (its own, fitted on validation at the
    end of training): its logits are then calibrated with no sve code. 1 for 'mean' and uncalibrated runs."""
    return 1.0 if member == "mean" else temperature_of(metadata.get("calibration"), member)


def _calibrated_head(bank: RunBank, name: str, member: int | str) -> torch.Tensor:
    """Member m's head tensor (`head.weight` [C, d] or `head.bias` [C]) with its temperature folded in."""
    return _member_value(bank, name, member) / member_temperature(bank.metadata, member)


def _merged_weight(bank: RunBank, cache: FactorCache | None, target: str, member: int | str) -> torch.Tensor:
    """Member m's weight of `target`, in the orientation the checkpoint stores it."""
    module, spec = target.removesuffix(".weight"), architecture(bank.base)
    if bank.recipe.ensemble.uses_decomposition:  # the cache factors the stored tensor itself
        sigma = _member_value(bank, f"{module}.sigma", member)
        U, S, Vh = cache.factors(target)
        values = singular_values(sigma, S.float(), bank.metadata["parameterisation"])  # [k]
        return merged_weight(U.float(), values, Vh.float())  # as stored
    if bank.recipe.ensemble.spec.adapter:  # members' adapters act on the linear map [out, in]
        scale = bank.recipe.ensemble.lora_alpha / bank.recipe.ensemble.lora_rank
        base = bank.base.read(target).float()
        base = base.T if spec.conv1d else base
        if member == "mean":  # the mean of the members' updates
            updates = bank.tensor(f"{module}.lora_B").float() @ bank.tensor(f"{module}.lora_A").float()  # [M, out, in]
            weight = base + scale * updates.mean(0)
        else:
            weight = lora_merged(base, _member_value(bank, f"{module}.lora_A", member),
                                 _member_value(bank, f"{module}.lora_B", member), scale)
    else:
        weight = _member_value(bank, f"{module}.weight", member)  # dense members, [out, in]
    return weight.T if spec.conv1d else weight


@dataclass(frozen=True)
class ExportFormat:
    """What a merged member is written as: a transformers class (`classifier`, `causal`) or a
    sentence-transformers folder around the family's base model."""

    kind: str  # classifier | causal | sentence-transformers
    architecture: str  # the class named in config.json

    @property
    def library(self) -> str:
        return "sentence-transformers" if self.kind == "sentence-transformers" else "transformers"


def export_format(spec: Architecture, representation: str, causal: bool) -> ExportFormat:
    """The standard class a member of this family, read this way (`causal`: a letter head or generation),
    exports to; one clear error if none."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    if causal:
        if spec.causal_lm is None:
            raise SveError(f"a {spec.model_type} member has no causal-LM class to export to")
        return ExportFormat("causal", spec.causal_lm)
    if representation == spec.representation and spec.classifier is not None:
        return ExportFormat("classifier", spec.classifier)
    if representation in ST_POOLING and spec.model_type in MODEL_MAPPING_NAMES:
        return ExportFormat("sentence-transformers", MODEL_MAPPING_NAMES[spec.model_type])
    raise SveError(f"a {spec.model_type} member reading '{representation}' has no standard class to export to "
                   f"(its classifier reads '{spec.representation}')")


def bias_conflicts(targets: list[str], member_biases: set[str], base: Checkpoint) -> list[str]:
    """Targeted modules whose members own a bias the base layer does not have (no HF class holds it)."""
    modules = [t.removesuffix(".weight") for t in targets]
    return [m for m in modules if m in member_biases and f"{m}.bias" not in base.files]


def recipe_export_notes(recipe) -> list[str]:
    """`export_notes` for a recipe, from its checkpoint's header and config alone (nothing is built)."""
    from sve_cli.heads import resolve_representation
    from sve_cli.targets import resolve_targets

    base = open_checkpoint(recipe.model.path, shapes_only=True)
    spec = architecture(base)
    causal = recipe.task.type in ("multiple_choice", "generation")
    representation = "last_token" if causal else resolve_representation(recipe.ensemble.representation, spec,
                                                                         base.directory)
    targets = [t.name for t in resolve_targets(base, recipe.ensemble.targets)]
    member_bias = recipe.ensemble.bias and recipe.ensemble.uses_decomposition
    return export_notes(spec, representation, causal, targets, member_bias, base)


def export_notes(spec: Architecture, representation: str, causal: bool, targets: list[str], member_bias: bool,
                 base: Checkpoint) -> list[str]:
    """What `sve export` will and will not be able to write for a run set up this way (said at its start)."""
    try:
        output = export_format(spec, representation, causal)
    except SveError as error:
        return [f"export: {error}; the run will export as a Σ bank only (`sve export --format sigma-bank`)"]
    conflicts = bias_conflicts(targets, {t.removesuffix(".weight") for t in targets} if member_bias else set(), base)
    if conflicts:
        return [f"export: members will own biases on {len(conflicts)} layer(s) the base model has none on (first "
                f"'{conflicts[0]}'), which {output.architecture} cannot hold: `sve export --format safetensors` will "
                "refuse this run, the Σ bank exports (ensemble.bias: false lets every member export)"]
    return [f"export: each member can be written as a plain {output.library} {output.architecture}"]


def _plan_tensors(bank: RunBank, member: int | str) -> tuple[dict[str, tuple], dict[str, object], ExportFormat]:
    """Output name -> (shape, source); plus config changes and the output format."""
    base, metadata = bank.base, bank.metadata
    spec = architecture(base)
    output = export_format(spec, metadata.get("representation", spec.representation),
                           metadata["head"] in ("letters", "tokens"))
    conflicts = bias_conflicts(metadata["targets"], {k.removesuffix(".bias") for k in bank.bank.keys()}, base)
    if conflicts:
        raise SveError(f"members own a bias on '{conflicts[0]}', which {output.architecture} cannot hold; "
                       "train with ensemble.bias: false to export this model")
    layout = BackboneLayout(spec, base.names)
    prefix = "" if output.kind == "sentence-transformers" else f"{spec.prefix}."
    targets, plan = set(metadata["targets"]), {}
    for name, short in layout.backbone().items():
        plan[prefix + short] = (base.shape(name), ("target", name) if name in targets else ("copy", name))
        bias = name.removesuffix("weight") + "bias"
        if name in targets and bias in base.files and bias in bank.bank.keys():
            plan[prefix + short.removesuffix("weight") + "bias"] = (base.shape(bias), ("bias", bias))
    labels = metadata["label_names"]
    if metadata["head"] == "tokens":  # generation: the LM head is the base's own, as stored (tied or not)
        if spec.lm_head in base.files:
            plan[spec.lm_head] = (base.shape(spec.lm_head), ("copy", spec.lm_head))
        return plan, {"architectures": [output.architecture]}, output
    config_update: dict[str, object] = {"architectures": [output.architecture], "id2label": dict(enumerate(labels)),
                                        "label2id": {label: i for i, label in enumerate(labels)}}
    if output.kind == "sentence-transformers":  # the head goes into 2_Dense
        if spec.stem is not None and spec.stem.in_backbone:  # unused, but the base class builds it: the
            for part in ("weight", "bias"):                   # checkpoint's own, so loading warns of nothing
                stored = layout.stored(f"{spec.stem.dense}.{part}")
                if stored is not None:
                    plan[f"{spec.stem.dense}.{part}"] = (base.shape(stored), ("copy", stored))
        return plan, config_update, output
    if output.kind == "causal":
        source = spec.lm_head if spec.lm_head in base.files else layout.stored(spec.embeddings)
        plan[spec.lm_head] = (base.shape(source), ("letters", source))
        config_update["tie_word_embeddings"] = False  # the letter rows differ from the embeddings now
        return plan, config_update, output
    if metadata.get("representation") == "pooler":
        stem = f"{spec.prefix}.{spec.stem.dense}" if spec.stem.in_backbone else spec.stem.dense
        for part in ("weight", "bias"):
            plan[f"{stem}.{part}"] = (tuple(bank.tensor(f"stem.{part}").shape), ("stem", f"stem.{part}"))
    weight_name, bias_name = spec.head
    head = bank.tensor("head.weight")
    plan[weight_name] = (tuple(head.shape[1:]), ("head", "head.weight"))
    if bias_name:
        plan[bias_name] = ((head.shape[1],), ("head", "head.bias"))
    config_update["num_labels"] = len(labels)
    if spec.decoder:
        config_update["pad_token_id"] = _pad_token_id(base)
    return plan, config_update, output


def _pad_token_id(base: Checkpoint) -> int | None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base.directory)
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _cache_for(bank: RunBank) -> FactorCache | None:
    if not bank.recipe.ensemble.uses_decomposition:
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
        return _calibrated_head(bank, name, member)
    if kind == "stem":
        return bank.tensor(name)
    lm_head = bank.base.read(name).float().clone()  # "letters": the member's rows replace the letters'
    from transformers import AutoTokenizer

    from sve_cli.pipeline import letter_token_id

    tokenizer = AutoTokenizer.from_pretrained(bank.base.directory)
    rows = [letter_token_id(tokenizer, letter) for letter in bank.metadata["letters"]]
    lm_head[rows] = _calibrated_head(bank, "head.weight", member)
    return lm_head


def export_merged(run: Path, out: Path, member: int | str = 0, dtype: str | None = None,
                  max_shard_size: str = "5GB", overwrite: bool = False) -> dict:
    """Write member `member` (or "mean") of `run` as a standard HF checkpoint directory at `out`."""
    bank = RunBank.open(run)
    members = bank.metadata["members"]
    if member != "mean" and not 0 <= member < members:
        raise SveError(f"--member {member} is out of range: the run has {members} member(s) (0…{members - 1})")
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise SveError(f"unknown --dtype '{dtype}' (float32, float16 or bfloat16)")
    cache = _cache_for(bank)
    inputs = [run, bank.base.path, cache and cache.directory]
    check_output(out, EXPORT, overwrite, inputs)  # before any work
    plan, config_update, output = _plan_tensors(bank, member)
    reference = bank.metadata["targets"][0] if bank.metadata["targets"] else bank.base.names[0]
    out_dtype = DTYPE_NAMES[dtype] if dtype else TORCH_DTYPES[bank.base.dtype(reference)]  # follows the base
    sizes = [(name, torch.Size(shape).numel() * out_dtype.itemsize) for name, (shape, _) in plan.items()]
    shards = plan_shards(sizes, parse_size(max_shard_size), prefix="model", single_name="model.safetensors")

    with output_lock(out), _staging(out) as staging:
        check_output(out, EXPORT, overwrite, inputs)  # again: another export may have finished meanwhile
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
        for name in TOKENIZER_FILES:
            if (bank.base.directory / name).exists():
                shutil.copy2(bank.base.directory / name, staging / name)
        shutil.copy2(Path(run) / RECIPE, staging / "sve_recipe.yaml")
        if output.kind == "sentence-transformers":
            _sentence_transformers_modules(bank, member, staging, out_dtype)
        (staging / "README.md").write_text(_model_card(bank, member, output), encoding="utf-8")
        config = {**bank.base.config, **config_update, "dtype": str(out_dtype).removeprefix("torch."),
                  "sve": {"run": Path(run).resolve().name, "member": member, "members": members,
                          "temperature": member_temperature(bank.metadata, member),
                          "method": bank.metadata["method"], "tool": f"sve {__version__}",
                          "files": sorted([p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file()]
                                          + ["config.json"])}}
        config.pop("torch_dtype", None)
        write_json(staging / "config.json", config)
        _replace_directory(staging, out)
    return {"out": out, "architecture": output.architecture, "library": output.library, "shards": len(shards),
            "bytes": sum(size for _, size in sizes)}


def _sentence_transformers_modules(bank: RunBank, member: int | str, staging: Path, dtype: torch.dtype) -> None:
    """modules.json, the pooling config, and a Dense module that holds member m's head."""
    weight = _calibrated_head(bank, "head.weight", member)  # [C, d]
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
    bias = _calibrated_head(bank, "head.bias", member) if "head.bias" in bank.bank.keys() else torch.zeros(weight.shape[0])
    save_safetensors(staging / "2_Dense" / "model.safetensors",
                     {"linear.weight": weight.to(dtype).contiguous(), "linear.bias": bias.to(dtype).contiguous()}, {})


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A new staging directory, journaled as sve's own, that never outlives the export, finished or failed."""
    staging = claim_temporary(out)
    staging.mkdir()
    record_temporary(staging)
    try:
        yield staging
    finally:
        remove_temporary(staging)


def _replace_directory(staging: Path, out: Path) -> None:
    """Move the finished export into place; an existing output is removed only after that succeeds."""
    if out.exists():
        old = claim_temporary(out, "old")
        os.replace(out, old)
        record_temporary(old)  # a kill from here on leaves a leftover the next export sweeps
        os.replace(staging, out)
        forget_temporary(staging)
        remove_temporary(old)
    else:
        os.replace(staging, out)
        forget_temporary(staging)


def _model_card(bank: RunBank, member: int | str, output: ExportFormat) -> str:
    metadata, recipe = bank.metadata, bank.recipe
    which = ("the mean of all members' singular values, biases and heads — a single-model summary, "
             "not any trained member" if member == "mean" else f"member {member} of {metadata['members']}")
    library = output.library
    usage = ("`SentenceTransformer(folder).encode(texts)` returns the logits (its last module, a Dense layer, "
             f"is the member's head over the {metadata.get('representation')}-pooled tokens)"
             if library == "sentence-transformers" else f"`{output.architecture}`")
    architecture = "SentenceTransformer" if library == "sentence-transformers" else output.architecture
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
on `{recipe.task.dataset_name}` ({recipe.task.type}). Every targeted weight is `U diag(s_m) Vh` with the
base model's frozen singular vectors; it loads with plain `{library}` ({usage}), no `sve`
import needed. Labels, in the order of the logits: {', '.join(metadata['label_names'])}.

{_calibration_sentence(metadata, member)}

A single member does not carry the ensemble's uncertainty estimates: use `sve evaluate` on the run,
or the Σ bank (`sve export --format sigma-bank`), for those. The recipe that produced it is
`sve_recipe.yaml`.
"""


def _calibration_sentence(metadata: dict, member: int | str) -> str:
    temperature = member_temperature(metadata, member)
    if temperature != 1.0:
        calibration = metadata["calibration"]
        return (f"Its logits are calibrated: the classifier is divided by this member's temperature T = "
                f"{temperature:.4f}, fitted on {calibration.get('examples')} {calibration.get('split', 'validation')} "
                "examples at the end of training, so its softmax is what `sve predict --member` writes.")
    why = "a mean of members has no fitted temperature" if member == "mean" else "the run was not calibrated"
    return f"Its logits are raw ({why})."


def export_bank(run: Path, out: Path, overwrite: bool = False) -> dict:
    """Write the run's Σ bank to `out` (atomically), with its resolved recipe and, when `sve
    evaluate` fitted them for this bank, the abstention and conformal thresholds in its metadata: with
    the base model it is all `sve predict` needs. Returns its size next to the base checkpoint's."""
    bank = RunBank.open(run)
    inputs = [Path(run) / BANK, bank.base.path]
    check_output(out, BANK_OUTPUT, overwrite, inputs)
    with safe_open(str(Path(run) / BANK), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        metadata = dict(handle.metadata() or {})
    metadata.setdefault("sve.recipe", json.dumps(bank.recipe.model_dump(mode="json")))
    for key, name in (("sve.thresholds", THRESHOLDS), ("sve.conformal", CONFORMAL)):
        if (fitted := read_fitted(Path(run) / name, Path(run) / BANK, stale_ok=True)) is not None:
            metadata[key] = json.dumps(fitted)
    with output_lock(out):
        check_output(out, BANK_OUTPUT, overwrite, inputs)
        save_safetensors(out, tensors, metadata)
    base_bytes = sum(f.stat().st_size for f in set(bank.base.files.values()))
    return {"out": out, "bytes": out.stat().st_size, "base_bytes": base_bytes,
            "share": out.stat().st_size / base_bytes, "members": bank.metadata["members"]}
