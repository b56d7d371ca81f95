"""Per-member heads, on the representation the checkpoint was trained to produce.

By default (`representation: auto`) a head reads what the architecture's own HF classifier reads:

| architecture       | representation (as in HF)                       | exports as                         |
| ------------------ | ----------------------------------------------- | ---------------------------------- |
| bert               | pooler output (dropout in training)             | BertForSequenceClassification      |
| llama-like decoder | hidden state of the last non-pad token          | *ForSequenceClassification (score) |
| vit                | CLS token of the final layer norm               | ViTForImageClassification          |
| dinov2             | CLS token ⊕ mean of the patch tokens            | Dinov2ForImageClassification       |
| decoder, letters   | last non-pad token · LM-head rows of A, B, …    | *ForCausalLM                       |

unless the checkpoint is a sentence-transformers model: its `modules.json` + `1_Pooling/config.json`
say how it was trained to pool (all-MiniLM-L6-v2: the attention-masked mean of the last hidden
states), and the head reads that (such a member exports as a sentence-transformers folder). A recipe
may also name the representation (`pooler`, `cls`, `mean`, `max`, `last_token`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from sve_cli.errors import SveError
from sve_cli.layer import jittered_copies

ARCHITECTURES = {
    "bert": "pooler",
    "llama": "last_token", "mistral": "last_token", "qwen2": "last_token", "qwen3": "last_token",
    "vit": "cls",
    "dinov2": "cls_mean",
}
HEAD_INIT_STD = 0.01  # the reference implementation's N(0, 0.01²)


REPRESENTATIONS = ("pooler", "cls", "mean", "max", "last_token", "cls_mean")
# sentence-transformers pooling modes -> our representation names, and its legacy boolean keys
SENTENCE_TRANSFORMERS_POOLING = {"mean": "mean", "cls": "cls", "max": "max", "lasttoken": "last_token"}
LEGACY_POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                       "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                       "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


def native_representation(model_type: str) -> str:
    """What the architecture's own HF classification class reads."""
    if model_type not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise SveError(f"model_type '{model_type}' is not supported for ensembles yet (supported: {known})")
    return ARCHITECTURES[model_type]


def sentence_transformers_pooling(directory: Path) -> str | None:
    """The representation a sentence-transformers checkpoint was trained with, from its
    `modules.json` and pooling config; None for any other checkpoint."""
    try:
        modules = json.loads((directory / "modules.json").read_text(encoding="utf-8"))
        pooling = next(m for m in modules if m.get("type", "").endswith(".Pooling"))
        config = json.loads((directory / pooling["path"] / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, StopIteration, TypeError, AttributeError, KeyError):
        return None
    modes = config.get("pooling_mode")
    if modes is None:  # the legacy form: one boolean per mode
        modes = [mode for key, mode in LEGACY_POOLING_KEYS.items() if config.get(key) is True]
    modes = [modes] if isinstance(modes, str) else list(modes)
    if len(modes) != 1 or modes[0] not in SENTENCE_TRANSFORMERS_POOLING:
        raise SveError(f"{directory}: sentence-transformers pooling {modes} is not supported "
                       f"(supported: {', '.join(SENTENCE_TRANSFORMERS_POOLING)}); set ensemble.representation")
    return SENTENCE_TRANSFORMERS_POOLING[modes[0]]


def resolve_representation(requested: str, model_type: str, directory: Path) -> str:
    """`auto` -> the checkpoint's own pooling (sentence-transformers) or the architecture's."""
    native = native_representation(model_type)
    if requested == "auto":
        return sentence_transformers_pooling(directory) or native
    if native in ("cls", "cls_mean") and requested in ("pooler", "last_token"):
        raise SveError(f"ensemble.representation '{requested}' does not apply to a {model_type} image model")
    return requested


def last_non_pad_index(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """Rightmost position that is not padding, exactly as HF's *ForSequenceClassification."""
    if pad_token_id is None:
        return torch.full(input_ids.shape[:1], input_ids.shape[-1] - 1, device=input_ids.device)
    non_pad = (input_ids != pad_token_id).int()  # [B, T]
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    return (positions * non_pad).argmax(-1)  # [B]


def features(kind: str, outputs, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
             pad_token_id: int | None) -> torch.Tensor:
    """The `[rows, d]` representation a head reads from the backbone's outputs."""
    if kind == "pooler":
        return outputs.pooler_output
    hidden = outputs.last_hidden_state  # [rows, T, d]
    if kind == "cls":
        return hidden[:, 0]
    if kind == "cls_mean":
        return torch.cat([hidden[:, 0], hidden[:, 1:].mean(dim=1)], dim=1)  # [rows, 2d]
    if kind in ("mean", "max"):  # as sentence-transformers' Pooling: padding never counts
        mask = (attention_mask if attention_mask is not None
                else torch.ones(hidden.shape[:2], device=hidden.device))[..., None].to(hidden.dtype)  # [rows, T, 1]
        if kind == "max":
            return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)  # [rows, d]
    index = last_non_pad_index(input_ids, pad_token_id)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


class MemberHead(nn.Module):
    """M independent linear heads applied batch-wise: `[m·B, d]` -> `[B, m, C]` for the `active` members."""

    def __init__(self, members: int, in_features: int, classes: int, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.members = members
        self.active = range(members)
        self.weight = nn.Parameter(torch.zeros(members, classes, in_features))  # [M, C, d]
        self.bias = nn.Parameter(torch.zeros(members, classes)) if bias else None  # [M, C]
        self.dropout = nn.Dropout(dropout)

    def init_normal(self, generator: torch.Generator, std: float = HEAD_INIT_STD) -> None:
        with torch.no_grad():
            self.weight.copy_(torch.randn(self.weight.shape, generator=generator) * std)
            if self.bias is not None:
                self.bias.zero_()

    def init_from(self, weight: torch.Tensor, bias: torch.Tensor | None = None, jitter: float = 0.0,
                  generator: torch.Generator | None = None) -> None:
        """Every member starts as a copy of one existing head (`weight [C, d]`, `bias [C]`), its
        weight times `1 + ε`, `ε ~ N(0, jitter²)` when `jitter` is given."""
        if weight.shape != self.weight.shape[1:]:
            raise SveError(f"cannot initialise a head of shape {list(self.weight.shape[1:])} "
                           f"from a classifier of shape {list(weight.shape)}")
        with torch.no_grad():
            self.weight.copy_(jittered_copies(weight, self.members, jitter, generator))
            if self.bias is not None:
                self.bias.copy_(bias[None].expand_as(self.bias) if bias is not None else 0)

    def forward(self, representation: torch.Tensor) -> torch.Tensor:
        chunk = slice(self.active.start, self.active.stop)
        rows = self.dropout(representation.to(self.weight.dtype))  # float32 even under bf16 autocast
        rows = rows.reshape(len(self.active), -1, representation.shape[-1])  # [m, B, d]
        logits = torch.einsum("mbd,mcd->mbc", rows, self.weight[chunk])  # [m, B, C]
        if self.bias is not None:
            logits = logits + self.bias[chunk, None, :]
        return logits.transpose(0, 1)  # [B, m, C]
