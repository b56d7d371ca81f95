"""Everything sve knows about a transformer family, in one place: one `Architecture` per `model_type`.

A spec says which weights SVE targets (globs over the parameter names as checkpoints store them), what
the family's own Hugging Face classifier reads (`representation`), where that classifier's head and
stem live (so a merged member exports as that standard class), whether the family is a decoder, and
whether its layers are `nn.Linear` or GPT-2's `Conv1D` (weights stored `[in, out]`). Every other
module asks this one. Adding a family is one entry here (and one row in tests/test_architectures.py).

A `model_type` without an entry gets an inferred spec (`infer`): the model is built on the meta device
(no weights), every `nn.Linear` / `Conv1D` inside its repeated block list becomes a target, decoders read
the last non-pad token into `…ForSequenceClassification`'s score, and encoders read BERT-style poolers
when their classifier does, otherwise the mean of the tokens (exported as a sentence-transformers folder).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace
from functools import lru_cache

from sve_cli.errors import SveError, TargetError



@dataclass(frozen=True)
class StemSpec:
    """The dense layer + activation between the first token and the head in a family's classifier
    (BERT's pooler, RoBERTa's `classifier.dense`, DistilBERT's `pre_classifier`, …). Frozen in sve: taken
    from the checkpoint when it has one, otherwise initialised as transformers would (and kept in the bank)."""

    dense: str  # module name in the classification class, without the backbone prefix when `in_backbone`
    activation: str  # a name of `transformers.activations.ACT2FN`
    in_backbone: bool = False  # BERT's pooler lives inside BertModel (`bert.pooler.dense`)
    activation_key: str | None = None  # a config key that overrides `activation` (DeBERTa's pooler_hidden_act)
    size_key: str | None = None  # a config key with the stem's output size (DeBERTa's pooler_hidden_size)


@dataclass(frozen=True)
class Architecture:
    model_type: str
    attention: tuple[str, ...]  # target globs over stored parameter names
    mlp: tuple[str, ...]
    representation: str  # what the family's classifier reads: pooler | cls | cls_mean | last_token | mean
    classifier: str | None  # …ForSequenceClassification / …ForImageClassification (None: sentence-transformers)
    prefix: str  # the backbone's attribute in that class (base_model_prefix)
    head: tuple[str, str | None]  # the classifier's final layer: weight, bias (None when it has none)
    decoder: bool = False
    causal_lm: str | None = None  # …ForCausalLM, for letter heads
    lm_head: str = "lm_head.weight"  # the LM head in that class
    embeddings: str = "embed_tokens.weight"  # input embeddings, under the prefix (a tied LM head reads them)
    stem: StemSpec | None = None
    conv1d: bool = False  # GPT-2: Conv1D layers store W as [in, out]
    pooler_option: bool = False  # the backbone class takes add_pooling_layer (turned off: sve reads no pooler)
    drop: tuple[str, ...] = ()  # backbone tensors the classification class does not hold (e.g. an unused pooler)
    inferred: bool = False
    unresolved: str | None = None  # an inferred spec whose layers could not be listed: why (said when a preset is asked)
    fused: tuple[str, ...] = ()  # block modules transformers loads as 3-D parameters (MoE experts): never targets

    @property
    def image(self) -> bool:
        return self.representation in ("cls", "cls_mean") and self.classifier is not None \
            and self.classifier.endswith("ForImageClassification")

    def patterns(self, part: str) -> list[str]:
        """Globs of the `all`, `attention` or `mlp` preset."""
        return list(self.attention + self.mlp) if part == "all" else list(getattr(self, part))


_BERT_ATTENTION = ("*.attention.self.query.weight", "*.attention.self.key.weight", "*.attention.self.value.weight",
                   "*.attention.output.dense.weight")
_BERT_MLP = ("*.intermediate.dense.weight", "*[0-9].output.dense.weight")
_DECODER_ATTENTION = ("*.self_attn.q_proj.weight", "*.self_attn.k_proj.weight", "*.self_attn.v_proj.weight",
                      "*.self_attn.o_proj.weight")
_DECODER_MLP = ("*.mlp.gate_proj.weight", "*.mlp.up_proj.weight", "*.mlp.down_proj.weight")
_VIT_ATTENTION = ("*.attention.attention.query.weight", "*.attention.attention.key.weight",
                  "*.attention.attention.value.weight", "*.attention.output.dense.weight")


def _encoder(model_type: str, cls: str, prefix: str, stem: StemSpec, head: str = "classifier", **more) -> Architecture:
    return Architecture(model_type, more.pop("attention", _BERT_ATTENTION), more.pop("mlp", _BERT_MLP), "pooler",
                        f"{cls}ForSequenceClassification", prefix, (f"{head}.weight", f"{head}.bias"), stem=stem, **more)


def _decoder(model_type: str, cls: str, prefix: str = "model", **more) -> Architecture:
    return Architecture(model_type, more.pop("attention", _DECODER_ATTENTION), more.pop("mlp", _DECODER_MLP),
                        "last_token", f"{cls}ForSequenceClassification", prefix, ("score.weight", None), decoder=True,
                        causal_lm=more.pop("causal_lm", f"{cls}ForCausalLM"), **more)


def _vision(model_type: str, cls: str, prefix: str, representation: str = "cls", **more) -> Architecture:
    return Architecture(model_type, more.pop("attention", _VIT_ATTENTION), more.pop("mlp", _BERT_MLP), representation,
                        f"{cls}ForImageClassification", prefix, ("classifier.weight", "classifier.bias"), **more)


_ROBERTA_STEM = StemSpec("classifier.dense", "tanh")
ARCHITECTURES: dict[str, Architecture] = {spec.model_type: spec for spec in (
    # encoders: the classifier reads the first token through the family's own stem
    _encoder("bert", "Bert", "bert", StemSpec("pooler.dense", "tanh", in_backbone=True), pooler_option=True),
    _encoder("roberta", "Roberta", "roberta", _ROBERTA_STEM, "classifier.out_proj", pooler_option=True,
             drop=("pooler.",)),
    _encoder("xlm-roberta", "XLMRoberta", "roberta", _ROBERTA_STEM, "classifier.out_proj", pooler_option=True,
             drop=("pooler.",)),
    _encoder("electra", "Electra", "electra", StemSpec("classifier.dense", "gelu"), "classifier.out_proj"),
    _encoder("distilbert", "DistilBert", "distilbert", StemSpec("pre_classifier", "relu"),
             attention=("*.attention.q_lin.weight", "*.attention.k_lin.weight", "*.attention.v_lin.weight",
                        "*.attention.out_lin.weight"), mlp=("*.ffn.lin1.weight", "*.ffn.lin2.weight")),
    _encoder("deberta-v2", "DebertaV2", "deberta",
             StemSpec("pooler.dense", "gelu", activation_key="pooler_hidden_act", size_key="pooler_hidden_size"),
             attention=("*.attention.self.query_proj.weight", "*.attention.self.key_proj.weight",
                        "*.attention.self.value_proj.weight", "*.attention.output.dense.weight")),
    # decoders: the last non-pad token into `score`, or the LM head's answer-letter rows
    _decoder("llama", "Llama"), _decoder("mistral", "Mistral"), _decoder("qwen2", "Qwen2"), _decoder("qwen3", "Qwen3"),
    _decoder("phi3", "Phi3", attention=("*.self_attn.qkv_proj.weight", "*.self_attn.o_proj.weight"),
             mlp=("*.mlp.gate_up_proj.weight", "*.mlp.down_proj.weight")),
    _decoder("gpt2", "GPT2", "transformer", causal_lm="GPT2LMHeadModel", embeddings="wte.weight", conv1d=True,
             attention=("*.attn.c_attn.weight", "*.attn.c_proj.weight"), mlp=("*.mlp.c_fc.weight", "*.mlp.c_proj.weight")),
    _decoder("gpt_neox", "GPTNeoX", "gpt_neox", lm_head="embed_out.weight", embeddings="embed_in.weight",
             attention=("*.attention.query_key_value.weight", "*.attention.dense.weight"),
             mlp=("*.mlp.dense_h_to_4h.weight", "*.mlp.dense_4h_to_h.weight")),
    # vision: the CLS token (DINOv2: CLS ⊕ mean of the patches) after the final layer norm
    _vision("vit", "ViT", "vit", pooler_option=True, drop=("pooler.",)),
    _vision("deit", "DeiT", "deit", pooler_option=True, drop=("pooler.",)),
    _vision("dinov2", "Dinov2", "dinov2", "cls_mean", mlp=("*.mlp.fc1.weight", "*.mlp.fc2.weight")),
)}


# families whose backbone sve cannot run as it runs every other: refused in one line at decompose and train
_T5 = ("an encoder–decoder whose base model needs decoder inputs and whose layers read their weights' dtype "
       "directly; BART-style encoder–decoders and every encoder-only or decoder-only family work")
UNSUPPORTED = {name: _T5 for name in ("t5", "mt5", "umt5", "longt5", "switch_transformers")}


def architecture(checkpoint) -> Architecture:
    """The registered spec of `checkpoint`'s `model_type`, or one inferred from its structure."""
    model_type = checkpoint.model_type
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    if model_type in UNSUPPORTED:
        raise TargetError(f"model_type '{model_type}' is not supported: {UNSUPPORTED[model_type]}")
    if not model_type:
        raise TargetError(f"{checkpoint.source} has no model_type in its config.json, so transformers cannot build "
                          "it (`sve decompose --targets GLOBS` can still decompose named layers)")
    return infer(checkpoint.directory, tuple(checkpoint.names))


# --------------------------------------------------------------------------- inferring a spec


def meta_model(directory, cls: str | None = None, num_labels: int | None = None, **options):
    """The model of `directory`'s config on the meta device (shapes only, no memory): AutoModel, or the
    named transformers class; None when transformers cannot build it."""
    import torch
    import transformers

    from sve_cli.checkpoint import quiet_transformers

    quiet_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(directory)
        if num_labels is not None:
            config.num_labels = num_labels
        with torch.device("meta"):
            if cls is None:
                return transformers.AutoModel.from_config(config, **options)
            return getattr(transformers, cls)._from_config(config, **options)
    except (ValueError, KeyError, AttributeError, TypeError, OSError, ImportError, RuntimeError):
        return None


def block_list(model):
    """The longest `nn.ModuleList` whose children are all of one class: the transformer blocks."""
    from torch import nn

    lists = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1]
    if not lists:
        return None, None
    return max(lists, key=lambda item: (len(item[1]), -item[0].count(".")))


def _is_layer(module) -> bool:
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


@lru_cache(maxsize=16)
def infer(directory, names: tuple[str, ...]) -> Architecture:
    from transformers.models.auto import modeling_auto

    base = meta_model(directory)
    if base is None:
        raise TargetError(f"model_type '{_model_type(directory)}' is neither known to sve nor to this transformers, "
                          "so it cannot be built (upgrade transformers; `sve decompose --targets GLOBS` can still "
                          "decompose named layers)")
    config, model_type = base.config, base.config.model_type
    blocks_name, blocks = block_list(base)
    attention, mlp, conv1d, unresolved = [], [], False, None
    fused = tuple(sorted({name.split(".", 1)[1] for name, module in (blocks.named_modules() if blocks is not None else ())
                          if "." in name and any(p.dim() >= 3 for p in module.parameters(recurse=False))}))
    if blocks is None:
        unresolved = f"cannot find the transformer blocks of a {model_type} model"
    for name, module in blocks.named_modules() if blocks is not None else ():
        if not _is_layer(module):
            continue
        conv1d |= type(module).__name__ == "Conv1D"
        suffix = f"{blocks_name}.{name}.weight"
        stored = [n for n in names if n == suffix or n.endswith("." + suffix)]
        if len(stored) != 1:
            unresolved = f"cannot tell which stored tensor is {model_type}'s '{suffix}'"
            attention, mlp = [], []
            break
        within = name.split(".", 1)[1]  # the layer's path inside one block
        pattern = f"{stored[0][:len(stored[0]) - len(suffix)]}{blocks_name}.*.{within}.weight"  # every block
        part = attention if any(word in within.lower() for word in ("attn", "attention", "self")) else mlp
        if pattern not in attention + mlp:
            part.append(pattern)
    causal = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    decoder = causal is not None and (model_type not in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
                                      or any("CausalLM" in a or "LMHead" in a for a in config.architectures or []))
    classifier = modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(model_type)
    head = ("score.weight", None) if decoder else ("classifier.weight", "classifier.bias")
    spec = Architecture(model_type, tuple(attention), tuple(mlp), "mean", None, base.base_model_prefix or "model",
                        head, decoder=decoder, causal_lm=causal if decoder else None,
                        conv1d=conv1d, inferred=True, unresolved=unresolved, fused=fused)
    return replace(spec, **_inferred_head(directory, classifier, decoder))


def _model_type(directory) -> str:
    import json
    from pathlib import Path

    try:
        return str(json.loads((Path(directory) / "config.json").read_text()).get("model_type"))
    except (OSError, ValueError, AttributeError):
        return "?"


def _inferred_head(directory, classifier: str | None, decoder: bool) -> dict:
    """Where a family nobody listed keeps its classifier, read off its classification class (meta
    device): decoders' last-token `score`, or an encoder's BERT-style pooler + linear classifier."""
    model = meta_model(directory, classifier, num_labels=2) if classifier else None
    if model is None:
        return {}
    prefix = model.base_model_prefix
    outside = [(name, module) for name, module in model.named_modules()
               if name and not name.startswith(prefix) and _is_layer(module)]
    if len(outside) != 1:
        return {}  # a head with its own hidden layers: activation unknowable, read the mean instead
    name, layer = outside[0]
    head = (f"{name}.weight", f"{name}.bias" if getattr(layer, "bias", None) is not None else None)
    embeddings = next((n.removeprefix(f"{prefix}.") + ".weight" for n, m in model.named_modules()
                       if m is model.get_input_embeddings()), "embed_tokens.weight")
    if decoder:
        return {"representation": "last_token", "classifier": classifier, "prefix": prefix, "head": head,
                "embeddings": embeddings}
    pooler = getattr(getattr(model, prefix, None), "pooler", None)
    dense, activation = getattr(pooler, "dense", None), getattr(pooler, "activation", None)
    activations = _activation_names()
    if _is_layer(dense) and type(activation) in activations:
        return {"representation": "pooler", "classifier": classifier, "prefix": prefix, "head": head,
                "stem": StemSpec("pooler.dense", activations[type(activation)], in_backbone=True), "pooler_option": True}
    return {}


def _activation_names() -> dict[type, str]:
    """Activation module class -> its name in transformers' ACT2FN (nn.Tanh -> "tanh", …)."""
    from transformers.activations import ACT2CLS

    names: dict[type, str] = {}
    for name, value in ACT2CLS.items():
        names.setdefault(value[0] if isinstance(value, tuple) else value, name)
    return names


def resolve_patterns(spec: str | None, checkpoint) -> tuple[list[str], Architecture | None]:
    """Globs for a `--targets` value (None: the family's full preset) and the spec they came from."""
    spec = (spec or "all").strip()
    if spec in ARCHITECTURES:
        return ARCHITECTURES[spec].patterns("all"), ARCHITECTURES[spec]
    if spec not in ("all", "attention", "mlp"):
        return [pattern.strip() for pattern in spec.split(",") if pattern.strip()], None
    family = architecture(checkpoint)
    patterns = family.patterns(spec)
    if not patterns and family.fused and spec == "mlp":
        raise TargetError(experts_note(family) + ": `--targets attention` (what `all` covers) is what sve can ensemble")
    if not patterns:
        why = family.unresolved or f"the inferred {family.model_type} spec has no '{spec}' layers"
        raise TargetError(f"{why}: name the layers to target with globs (`--targets` of sve decompose, "
                          "`ensemble.targets` of a recipe), e.g. '*.q_proj.weight,*.v_proj.weight'")
    return patterns, family


def experts_note(family: Architecture) -> str:
    """Why a mixture-of-experts family's experts are never targets."""
    return (f"{family.model_type}'s MLP is a mixture of experts that transformers loads as 3-D tensors "
            f"({', '.join(family.fused)}), not linear layers: sve ensembles linear layers only, so the experts stay "
            "frozen")


def matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


@dataclass
class BackboneLayout:
    """Which stored tensors are the backbone, and their names in the classification class."""

    spec: Architecture
    names: list[str] = field(default_factory=list)

    @property
    def prefixed(self) -> bool:
        return any(name.startswith(self.spec.prefix + ".") for name in self.names)

    def backbone(self) -> dict[str, str]:
        """Stored name -> unprefixed name, for every tensor the backbone holds."""
        prefix, prefixed = self.spec.prefix + ".", self.prefixed
        kept = {}
        for name in self.names:
            if prefixed and not name.startswith(prefix):
                continue  # a head of another class (lm_head., cls., discriminator_predictions., …)
            short = name.removeprefix(prefix) if prefixed else name
            if short.startswith(self.spec.drop) or (self.spec.stem and self.spec.stem.in_backbone
                                                     and short.startswith(self.spec.stem.dense + ".")):
                continue
            kept[name] = short
        return kept

    def stored(self, short: str) -> str | None:
        """The stored name of a backbone tensor (`embed_tokens.weight`), prefixed or not; None if absent."""
        for candidate in (f"{self.spec.prefix}.{short}", short):
            if candidate in self.names:
                return candidate
        return None


def check_representation(spec: Architecture, requested: str) -> None:
    """Refuse a representation the family has no way to produce."""
    if requested == "pooler" and spec.stem is None:
        raise SveError(f"ensemble.representation 'pooler' does not apply to a {spec.model_type} model: its classifier "
                       f"reads '{spec.representation}' (use auto, cls, mean or max)")
    if spec.image and requested == "last_token":
        raise SveError(f"ensemble.representation 'last_token' does not apply to a {spec.model_type} image model")


def check_config(checkpoint, spec: Architecture) -> None:
    """config.json against the weights, before a model is built: every tensor the config's model holds
    under the name the checkpoint stores must have the stored shape (one line naming the first that does not)."""
    model = meta_model(checkpoint.directory, **({"add_pooling_layer": False} if spec.pooler_option else {}))
    if model is None:
        return  # transformers' own loading reports what it cannot build
    layout = BackboneLayout(spec, checkpoint.names)
    for name, tensor in model.state_dict(keep_vars=True).items():
        stored = layout.stored(name)
        if stored is not None and tuple(checkpoint.shape(stored)) != tuple(tensor.shape):
            raise SveError(f"{checkpoint.directory / 'config.json'} does not match the weights: '{stored}' is "
                           f"{list(checkpoint.shape(stored))} on disk, the config makes it {list(tensor.shape)}")


def check_generation(checkpoint) -> None:
    """Generation is tested exact on the decoder families of sve's registry; one line for any other."""
    spec = architecture(checkpoint)
    if not spec.decoder or spec.inferred:
        known = ", ".join(name for name, family in ARCHITECTURES.items() if family.decoder)
        raise SveError(f"generation supports the decoder families sve's registry tests ({known}); "
                       f"{checkpoint.source} is a {checkpoint.model_type}")
