"""Per-member heads, on the representation the checkpoint was trained to produce.

By default (`representation: auto`) a head reads what the family's own HF classifier reads
(`sve_cli.architectures`): the first token through the family's frozen stem (`pooler`: BERT's pooler,
RoBERTa's and ELECTRA's `classifier.dense`, DistilBERT's `pre_classifier`, DeBERTa's context pooler),
the last non-pad token (decoders), the CLS token (ViT, DeiT) or CLS ⊕ mean of the patches (DINOv2);
for multiple choice on a causal LM, the LM-head rows of the answer letters. A sentence-transformers
checkpoint is read the way it was trained: its `modules.json` + `1_Pooling/config.json` name the
pooling (all-MiniLM-L6-v2: the attention-masked mean), and such a member exports as a
sentence-transformers folder. A recipe may also name the representation (`pooler`, `cls`, `mean`,
`max`, `last_token`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from sve_cli.architectures import Architecture, check_representation
from sve_cli.errors import SveError
from sve_cli.layer import MemberSlice, jittered_copies
from sve_cli.vocabulary import REPRESENTATIONS

HEAD_INIT_STD = 0.01  # the reference implementation's N(0, 0.01²)
# sentence-transformers pooling modes -> our representation names, and its legacy boolean keys
SENTENCE_TRANSFORMERS_POOLING = {"mean": "mean", "cls": "cls", "max": "max", "lasttoken": "last_token"}
LEGACY_POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                       "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                       "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


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


def resolve_representation(requested: str, spec: Architecture, directory: Path) -> str:
    """`auto` -> the checkpoint's own pooling (sentence-transformers) or the family's classifier's."""
    if requested == "auto":
        return sentence_transformers_pooling(directory) or spec.representation
    check_representation(spec, requested)
    return requested


class Stem(nn.Module):
    """The family's frozen dense layer and activation on the first token (`pooler` representation)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, activation: str):
        from transformers.activations import ACT2FN

        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone().float(), requires_grad=False)  # [d', d]
        self.bias = nn.Parameter(bias.detach().clone().float(), requires_grad=False)  # [d']
        self.activation_name = activation
        self.activation = ACT2FN[activation]

    def forward(self, first_token: torch.Tensor) -> torch.Tensor:
        return self.activation(nn.functional.linear(first_token, self.weight.to(first_token.dtype),
                                                    self.bias.to(first_token.dtype)))


def last_non_pad_index(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """Rightmost position that is not padding, exactly as HF's *ForSequenceClassification."""
    if pad_token_id is None:
        return torch.full(input_ids.shape[:1], input_ids.shape[-1] - 1, device=input_ids.device)
    non_pad = (input_ids != pad_token_id).int()  # [B, T]
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    return (positions * non_pad).argmax(-1)  # [B]


def features(kind: str, outputs, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
             pad_token_id: int | None) -> torch.Tensor:
    """The `[rows, d]` representation a head (or, for `pooler`, the stem) reads from the backbone's outputs."""
    if kind not in REPRESENTATIONS:
        raise ValueError(f"unknown representation '{kind}'")
    hidden = outputs.last_hidden_state  # [rows, T, d]
    if kind in ("cls", "pooler"):
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


class MemberHead(MemberSlice):
    """M independent linear heads applied batch-wise: `[m·B, d]` -> `[B, m, C]` for the `active` members."""

    def __init__(self, members: int, in_features: int, classes: int, bias: bool = True, dropout: float = 0.0):
        super().__init__(members)
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
        rows = self.member_rows(self.dropout(representation.to(self.weight.dtype)))  # [m, B, d], float32 under autocast
        logits = torch.einsum("mbd,mcd->mbc", rows, self.chunk(self.weight))  # [m, B, C]
        if self.bias is not None:
            logits = logits + self.chunk(self.bias)[:, None, :]
        return logits.transpose(0, 1).contiguous()  # [B, m, C]


def lm_logits(hidden: torch.Tensor, lm_head: torch.Tensor, scale: float | None = None,
              softcap: float | None = None) -> torch.Tensor:
    """A causal LM's next-token logits `[…, V]` from its last hidden states `[…, d]` and output embedding
    `[V, d]`, with the family's logit scale (Cohere) and final soft-capping (Gemma 2) when it has them."""
    logits = hidden @ lm_head.to(hidden.dtype).T
    if scale is not None:
        logits = logits * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


class TokenHead(MemberSlice):
    """The checkpoint's own LM head, shared by every member and frozen (a buffer: no bank holds it), for
    generation: `[m·N, d]` hidden states at target positions -> next-token logits `[N, m, V]`."""

    def __init__(self, members: int, lm_head: torch.Tensor, scale: float | None = None, softcap: float | None = None):
        super().__init__(members)
        self.register_buffer("weight", lm_head.detach().float(), persistent=False)  # [V, d]
        self.scale, self.softcap = scale, softcap

    def forward(self, representation: torch.Tensor) -> torch.Tensor:
        logits = lm_logits(self.member_rows(representation), self.weight, self.scale, self.softcap)  # [m, N, V]
        return logits.transpose(0, 1)  # [N, m, V]
