"""Turn a Hugging Face model + its decomposition into an M-member SVE ensemble.

`build_ensemble` loads the backbone (`AutoModel`: BertModel, LlamaModel, GPT2Model, ViTModel, …),
freezes it, replaces every targeted `nn.Linear` (or GPT-2's `Conv1D`) by an `SVELinear` and attaches
per-member heads on the representation the family's classifier reads (`sve_cli.architectures`).
Targets are matched to modules by the fingerprint of their weight, not by name: the decomposition was
taken from the checkpoint's tensors, and transformers may rename modules on load (ViT does), so content
is the only reliable key. This also proves the cache belongs to this model.

`SVEModel(**inputs)` runs the backbone once for all members and returns logits `[B, M, C]`: the blocks
below the first target on the batch's `B` rows, the rest on `M·B` rows, member-major (`sve_cli.prefix`);
with `member_major=True` the inputs already hold one batch per member (`[M·B, …]`, e.g. each member's
own shuffle of the data) and every block runs on them. `active_members(start, stop)` runs only a
chunk of the members (`train.members_per_pass`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from sve_cli.architectures import Architecture, BackboneLayout, architecture, check_config, check_generation
from sve_cli.checkpoint import Checkpoint, open_checkpoint, quiet_transformers
from sve_cli.factors import FactorCache
from sve_cli.errors import ForeignDecompositionError, SveError
from sve_cli.heads import MemberHead, Stem, TokenHead, features, resolve_representation
from sve_cli.layer import SVELinear
from sve_cli.prefix import SharedPrefix, shared_prefix
from sve_cli.recipe import EnsembleConfig
from sve_cli.tensors import TORCH_DTYPES, source_fingerprint, tensor_fingerprint


@dataclass
class Identity:
    """What a Σ bank must agree with to be loaded onto this ensemble."""

    base_model: str
    model_type: str
    decomposition_fingerprint: str
    source_fingerprint: str
    targets: list[str] = field(default_factory=list)
    method: str = "sve"
    base_fingerprint: str = ""  # every tensor of the checkpoint, sampled (`Checkpoint.sampled_fingerprint`)


class SVEModel(nn.Module):
    def __init__(self, backbone: nn.Module, head: MemberHead, layers: dict[str, nn.Module],
                 members: int, representation: str, pad_token_id: int | None, identity: Identity,
                 head_kind: str, stem: Stem | None = None, prefix: SharedPrefix | None = None):
        super().__init__()
        self.backbone, self.head, self.stem = backbone, head, stem
        self.prefix = prefix  # runs the blocks below the first target once per batch (None: fan out at the input)
        self.layers = layers  # target parameter name -> its member layer (registered inside backbone)
        self.members, self.representation, self.pad_token_id = members, representation, pad_token_id
        self.identity, self.head_kind = identity, head_kind
        self.compute_dtype: torch.dtype | None = None  # set by `use_low_precision`

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each transformer block in the backward pass (non-reentrant: frozen inputs are fine)."""
        if not getattr(self.backbone, "supports_gradient_checkpointing", False):
            raise SveError(f"{type(self.backbone).__name__} does not support gradient checkpointing")
        enable = getattr(self.backbone, "activation_checkpointing_enable", None)  # transformers ≥ 5.2x
        if enable is not None:
            enable({"use_reentrant": False})
        else:
            self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def use_low_precision(self, dtype: torch.dtype = torch.bfloat16) -> None:
        """Store every frozen tensor (weights, shared factors) in `dtype` and run the backbone under
        autocast; what trains (sigma, biases, heads) keeps its float32 master copy."""
        for module in self.modules():
            for name, parameter in module.named_parameters(recurse=False):
                if not parameter.requires_grad:
                    parameter.data = parameter.data.to(dtype)
            for name, buffer in module.named_buffers(recurse=False):  # vectors (e.g. S) are cheap: kept exact
                if buffer is not None and buffer.is_floating_point() and buffer.dim() > 1:
                    setattr(module, name, buffer.to(dtype))
        self.compute_dtype = dtype

    @property
    def active(self) -> range:
        """The members a forward pass runs (all of them unless `active_members` narrowed it)."""
        return self.head.active

    @contextlib.contextmanager
    def active_members(self, start: int, stop: int) -> Iterator[None]:
        """Run members `start … stop-1` only: every member layer and the head slice their tensors."""
        previous = self.active
        for module in (*self.layers.values(), self.head):
            module.active = range(start, stop)
        try:
            yield
        finally:
            for module in (*self.layers.values(), self.head):
                module.active = previous

    def forward(self, member_major: bool = False, **inputs: torch.Tensor) -> torch.Tensor:
        """Logits `[B, m, C]` of the active members `m`; inputs `[B, …]` (or `[m·B, …]` when
        `member_major`). A generation ensemble (`head_kind` "tokens") takes `target_ids [B, T]` too and
        returns the next-token logits `[N, m, V]` at the N positions whose next token is a target's."""
        members = len(self.active)
        target_ids = inputs.pop("target_ids", None)  # [B, T]: the next token where it is a target's, else -100
        sizes = {name: value.shape[0] for name, value in inputs.items()}
        if not all(torch.is_tensor(value) for value in inputs.values()) or len(set(sizes.values())) != 1:
            raise ValueError(f"every input must be a tensor of the same batch size, got {sizes}")
        backbone_inputs = inputs
        if self.prefix is not None:
            self.prefix.set(None if member_major else next(iter(sizes.values())), members)
        if not member_major:
            inputs = {name: value.repeat(members, *[1] * (value.dim() - 1))  # [m·B, …] member-major
                      for name, value in inputs.items()}
            if self.prefix is None or not self.prefix.active:
                backbone_inputs = inputs  # [m·B, …]: every block on every member's rows
        device = next(iter(inputs.values())).device
        with torch.autocast(device.type, dtype=self.compute_dtype or torch.float32, enabled=self.compute_dtype is not None):
            outputs = self.backbone(**backbone_inputs)  # [m·B, T, d] either way
            if self.head_kind == "tokens":  # the hidden states that predict a target token
                if target_ids is None:
                    raise ValueError("a generation ensemble scores target tokens: give target_ids")
                hidden = outputs.last_hidden_state  # [m·B, T, d]
                selected = hidden.view(members, -1, *hidden.shape[1:])[:, target_ids != -100]  # [m, N, d]
                return self.head(selected.reshape(-1, hidden.shape[-1]))  # [N, m, V]
            representation = features(self.representation, outputs, inputs.get("input_ids"),
                                      inputs.get("attention_mask"), self.pad_token_id)  # [m·B, d]
            if self.stem is not None:
                representation = self.stem(representation)  # [m·B, d']
        return self.head(representation)  # [B, m, C]

    def eval_cache_bytes(self) -> int:
        """What caching every SVE layer's `[M, out, in]` member weights for evaluation would hold."""
        return sum(layer.members * layer.out_features * layer.in_features * layer.U.element_size()
                   for layer in self.layers.values() if isinstance(layer, SVELinear))

    def fit_eval_cache(self, budget: int) -> bool:
        """Allow the eval weight cache only when all of it fits `budget` bytes; otherwise evaluation takes the
        factored path, which never builds a member's weight. Returns whether the cache is allowed."""
        allowed = self.eval_cache_bytes() <= budget
        for layer in self.layers.values():
            if isinstance(layer, SVELinear):
                layer.eval_factored, layer.cache_weights = not allowed, allowed
                if not allowed:
                    layer._cache = None
        return allowed

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.named_parameters() if p.requires_grad}


def _load_backbone(checkpoint: Checkpoint, spec: Architecture, dropout: bool, trust_remote_code: bool) -> nn.Module:
    from transformers import AutoModel

    quiet_transformers()  # e.g. "weights not used" for the classifier we read ourselves
    options = {"add_pooling_layer": False} if spec.pooler_option else {}  # a pooler is read through `heads.Stem`
    if not dropout:  # e.g. hidden_dropout_prob, attention_probs_dropout_prob, attention_dropout
        options.update({key: 0.0 for key, value in checkpoint.config.items()
                        if "dropout" in key and isinstance(value, float)})
    check_config(checkpoint, spec)  # config.json against the weights' shapes, before anything is built
    try:
        return AutoModel.from_pretrained(checkpoint.directory, dtype=torch.float32,
                                         trust_remote_code=trust_remote_code, **options).eval()
    except (OSError, ValueError, RuntimeError) as error:
        raise SveError(f"transformers cannot load {checkpoint.source}: {str(error).splitlines()[0]}") from None


def _replace_targets(backbone: nn.Module, targets: list[dict], make_layer, where: str) -> dict[str, nn.Module]:
    """Swap each `nn.Linear` / `Conv1D` whose weight has a target's fingerprint for `make_layer(target, layer)`.

    `targets` are dicts with `name`, `fingerprint`, `shape` and `source_dtype`, in a fixed order (the
    manifest's): layers are created in that order, so seeded initialisation is reproducible. Only layers
    of a target's shape are hashed.
    """
    from transformers.pytorch_utils import Conv1D

    by_fingerprint = {t["fingerprint"]: t for t in targets}
    shapes = {tuple(t["shape"]) for t in targets}
    dtypes = {TORCH_DTYPES.get(t["source_dtype"], torch.float32) for t in targets}
    found: dict[str, tuple[str, nn.Module]] = {}
    for module_name, module in backbone.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)) and tuple(module.weight.shape) in shapes:
            for dtype in dtypes:
                if (target := by_fingerprint.get(tensor_fingerprint(module.weight.detach().to(dtype)))) is not None:
                    found[target["name"]] = (module_name, module)
    missing = [t["name"] for t in targets if t["name"] not in found]
    if missing:
        raise ForeignDecompositionError(f"{where} does not belong to this model: "
                       f"{len(missing)} target(s) not found, first '{missing[0]}'")
    layers = {}
    for target in targets:
        module_name, linear = found[target["name"]]
        layer = make_layer(target, linear)
        parent_name, _, child = module_name.rpartition(".")
        setattr(backbone.get_submodule(parent_name) if parent_name else backbone, child, layer)
        layers[target["name"]] = layer
    return layers


def linear_weight(layer: nn.Module) -> torch.Tensor:
    """The `[out, in]` weight of an `nn.Linear`, or of GPT-2's `Conv1D` (which stores it `[in, out]`)."""
    return layer.weight.T if type(layer).__name__ == "Conv1D" else layer.weight


def _checkpoint_targets(checkpoint: Checkpoint, spec: str | None) -> list[dict]:
    """Targets of the non-SVE methods, fingerprinted from the checkpoint itself."""
    from sve_cli.targets import resolve_targets

    return [{"name": t.name, "source_dtype": t.dtype, "shape": [t.out_features, t.in_features],
             "fingerprint": checkpoint.fingerprint(t.name)} for t in resolve_targets(checkpoint, spec)]


def _source_fingerprint(targets: list[dict]) -> str:
    return source_fingerprint({t["name"]: t["fingerprint"] for t in targets})


def _attach_method(backbone: nn.Module, checkpoint: Checkpoint, config: EnsembleConfig,
                   factors: FactorCache | None, generator: torch.Generator) -> tuple[dict[str, nn.Module], str, str]:
    """Replace the targets for `config.method`; returns (layers, identity fingerprint, source fingerprint)."""
    if config.uses_decomposition:
        if factors is None:
            raise SveError(f"method {config.method} needs the decomposition of {checkpoint.source}")

        def make_sve(target: dict, layer: nn.Module) -> SVELinear:
            U, S, Vh = factors.factors(target["name"])  # of the stored tensor
            if type(layer).__name__ == "Conv1D":  # stored W^T = U S Vh, so the linear map is Vh^T S U^T
                U, Vh = Vh.T, U.T
            return SVELinear(U.float(), S.float(), Vh.float(), config.members,
                             base_bias=None if layer.bias is None else layer.bias.detach(),
                             bias=config.bias or layer.bias is not None, sigma_init=config.sigma_init,
                             parameterisation=config.parameterisation, strategy=config.strategy,
                             generator=generator)

        layers = _replace_targets(backbone, factors.manifest["targets"], make_sve, f"decomposition {factors.directory}")
        return layers, factors.fingerprint, factors.manifest["source"]["fingerprint"]

    targets = _checkpoint_targets(checkpoint, config.targets)
    source = _source_fingerprint(targets)
    if not config.trains_targets:
        return {}, source, source
    def make_layer(target: dict, layer: nn.Module) -> nn.Module:
        return config.spec.member_layer(linear_weight(layer), layer.bias, config, generator)

    return _replace_targets(backbone, targets, make_layer, checkpoint.source), source, source


def build_ensemble(model: str, config: EnsembleConfig, classes: int | None = None,
                   letter_token_ids: list[int] | None = None, factors: FactorCache | None = None,
                   pad_token_id: int | None = None, seed: int = 0, trust_remote_code: bool = False,
                   tokens: bool = False) -> SVEModel:
    """An ensemble of `model` (`config.method`, `config.members` members) with a classification
    head of `classes` classes, or (for a causal LM) a letter head scoring `letter_token_ids` with
    the LM head's own rows, or (`tokens`, for generation) the LM head itself, shared and frozen.
    `seed` fixes every random initialisation.

    `factors` is the decomposition of `model` the SVE methods need, resolved by the caller (building
    never decomposes: `sve_cli.pipeline.ensemble_for` resolves and builds).
    `config.head_init`: "normal" (N(0, 0.01²) per member) or "checkpoint" (copy the checkpoint's
    own classifier into every member). `pad_token_id` overrides the config's (the tokenizer's pad
    token decides which position is the last real token).
    """
    if (classes is not None) + (letter_token_ids is not None) + tokens != 1:
        raise SveError("give one of: the number of classes, the answer-letter token ids, tokens")
    checkpoint = open_checkpoint(model)
    if not (checkpoint.directory / "config.json").exists():
        raise SveError(f"{model} needs a config.json beside its weights to build a model")
    spec = architecture(checkpoint)
    if tokens:
        check_generation(checkpoint)
    if letter_token_ids is not None and not spec.decoder:
        raise SveError(f"a letter head needs a causal LM; {model} is a {checkpoint.model_type}")
    representation = "last_token" if letter_token_ids is not None or tokens else resolve_representation(
        config.representation, spec, checkpoint.directory)
    backbone = _load_backbone(checkpoint, spec, config.dropout, trust_remote_code)
    backbone.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    layers, fingerprint, source_fingerprint = _attach_method(backbone, checkpoint, config, factors, generator)
    layout = BackboneLayout(spec, checkpoint.names)

    stem = _stem(checkpoint, spec, layout, backbone.config, generator) if representation == "pooler" else None
    hidden = stem.weight.shape[0] if stem is not None else _hidden_size(backbone, spec, representation)
    if tokens:
        head = TokenHead(config.members, lm_head_weight(checkpoint), checkpoint.config.get("logit_scale"),
                         checkpoint.config.get("final_logit_softcapping"))
    elif letter_token_ids is not None:
        head = MemberHead(config.members, hidden, len(letter_token_ids), bias=False)
        head.init_from(lm_head_weight(checkpoint)[letter_token_ids], jitter=config.copy_jitter, generator=generator)
    else:
        dropout = 0.0
        if representation == "pooler" and config.dropout:
            config_dropout = getattr(backbone.config, "classifier_dropout", None)
            dropout = config_dropout if config_dropout is not None else getattr(backbone.config, "hidden_dropout_prob", 0.0)
        weight_name, bias_name = spec.head
        head = MemberHead(config.members, hidden, classes, bias=bias_name is not None, dropout=dropout)
        if config.head_init == "checkpoint":
            if representation != spec.representation:
                raise SveError(f"head_init: checkpoint copies the {checkpoint.model_type} classifier, which reads "
                               f"'{spec.representation}', not '{representation}': set ensemble.representation: "
                               f"{spec.representation}")
            if weight_name not in checkpoint.files:
                raise SveError(f"{model} has no classifier ('{weight_name}') to initialise the heads from")
            head.init_from(checkpoint.read(weight_name).float(),
                           checkpoint.read(bias_name).float() if bias_name else None, config.copy_jitter, generator)
        else:
            head.init_normal(generator)

    identity = Identity(model, checkpoint.model_type, fingerprint, source_fingerprint, list(layers), config.method,
                        checkpoint.sampled_fingerprint())
    if pad_token_id is None:
        pad_token_id = getattr(backbone.config, "pad_token_id", None)
    return SVEModel(backbone, head, layers, config.members, representation, pad_token_id, identity,
                    "tokens" if tokens else "letters" if letter_token_ids is not None else "classification", stem,
                    None if spec.inferred else shared_prefix(backbone, layers))


def lm_head_weight(checkpoint: Checkpoint) -> torch.Tensor:
    """A causal LM's output embedding `[V, d]` (float32): its LM head, or the input embeddings it ties to."""
    spec = architecture(checkpoint)
    name = spec.lm_head if spec.lm_head in checkpoint.files else BackboneLayout(spec, checkpoint.names).stored(spec.embeddings)
    if name is None:
        raise SveError(f"{checkpoint.source} has neither an LM head ('{spec.lm_head}') nor input embeddings "
                       "to read tokens with")
    return checkpoint.read(name).float()


def _hidden_size(backbone: nn.Module, spec: Architecture, representation: str) -> int:
    """Width of the representation: a decoder's last hidden state has its embeddings' width (OPT's
    may differ from hidden_size); DINOv2's CLS ⊕ mean is twice the hidden size."""
    if spec.decoder:
        width = backbone.get_input_embeddings().weight.shape[1]
    else:
        width = backbone.config.hidden_size
    return 2 * width if representation == "cls_mean" else width


def _stem(checkpoint: Checkpoint, spec: Architecture, layout: BackboneLayout, config, generator: torch.Generator) -> Stem:
    """The family's classifier stem, from the checkpoint when it holds one (BERT's pooler, a fine-tuned
    RoBERTa's classifier.dense), else initialised as transformers initialises it: N(0, initializer_range²),
    zero bias (the bank keeps it, so export and evaluation use the same values)."""
    stem = spec.stem
    activation = getattr(config, stem.activation_key, None) if stem.activation_key else None
    stored = layout.stored(f"{stem.dense}.weight") if stem.in_backbone else (
        f"{stem.dense}.weight" if f"{stem.dense}.weight" in checkpoint.files else None)
    if stored is not None:
        weight, bias = checkpoint.read(stored).float(), checkpoint.read(stored.removesuffix("weight") + "bias").float()
    else:
        width = config.hidden_size
        size = getattr(config, stem.size_key, None) if stem.size_key else None
        std = getattr(config, "initializer_range", 0.02)
        weight = torch.randn(size or width, width, generator=generator) * std  # [d', d]
        bias = torch.zeros(size or width)
    return Stem(weight, bias, activation or stem.activation)
