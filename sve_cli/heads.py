"""Per-member heads, on the representation each architecture's own HF classifier uses.

| architecture       | representation (as in HF)                       | exports as                         |
| ------------------ | ----------------------------------------------- | ---------------------------------- |
| bert               | pooler output (dropout in training)             | BertForSequenceClassification      |
| llama-like decoder | hidden state of the last non-pad token          | *ForSequenceClassification (score) |
| vit                | CLS token of the final layer norm               | ViTForImageClassification          |
| dinov2             | CLS token ⊕ mean of the patch tokens            | Dinov2ForImageClassification       |
| decoder, letters   | last non-pad token · LM-head rows of A, B, …    | *ForCausalLM                       |
"""

from __future__ import annotations

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


def representation_of(model_type: str) -> str:
    if model_type not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise SveError(f"model_type '{model_type}' is not supported for ensembles yet (supported: {known})")
    return ARCHITECTURES[model_type]


def last_non_pad_index(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """Rightmost position that is not padding, exactly as HF's *ForSequenceClassification."""
    if pad_token_id is None:
        return torch.full(input_ids.shape[:1], input_ids.shape[-1] - 1, device=input_ids.device)
    non_pad = (input_ids != pad_token_id).int()  # [B, T]
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    return (positions * non_pad).argmax(-1)  # [B]


def features(kind: str, outputs, input_ids: torch.Tensor | None, pad_token_id: int | None) -> torch.Tensor:
    """The `[rows, d]` representation a head reads from the backbone's outputs."""
    if kind == "pooler":
        return outputs.pooler_output
    hidden = outputs.last_hidden_state  # [rows, T, d]
    if kind == "cls":
        return hidden[:, 0]
    if kind == "cls_mean":
        return torch.cat([hidden[:, 0], hidden[:, 1:].mean(dim=1)], dim=1)  # [rows, 2d]
    index = last_non_pad_index(input_ids, pad_token_id)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


class MemberHead(nn.Module):
    """M independent linear heads applied batch-wise: `[M·B, d]` -> `[B, M, C]`."""

    def __init__(self, members: int, in_features: int, classes: int, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.members = members
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
        rows = self.dropout(representation).reshape(self.members, -1, representation.shape[-1])  # [M, B, d]
        logits = torch.einsum("mbd,mcd->mbc", rows, self.weight)  # [M, B, C]
        if self.bias is not None:
            logits = logits + self.bias[:, None, :]
        return logits.transpose(0, 1)  # [B, M, C]
