"""Safetensors dtype codes and tensor fingerprints: the leaf that reading (`checkpoint`) and writing
(`writing`) share, so neither imports the other."""

from __future__ import annotations

import hashlib
import json

import torch

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
TORCH_DTYPES = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}  # "F32" -> torch.float32
DTYPE_NAMES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
               "bfloat16": torch.bfloat16}  # what --dtype options take


def tensor_fingerprint(tensor: torch.Tensor) -> str:
    """sha256 of dtype, shape and raw bytes: detects any change to a source tensor."""
    digest = hashlib.sha256(f"{tensor.dtype}:{list(tensor.shape)}:".encode())
    digest.update(tensor.contiguous().view(torch.uint8).numpy())
    return "sha256:" + digest.hexdigest()


def source_fingerprint(fingerprints: dict[str, str]) -> str:
    """One fingerprint of named tensor fingerprints (a model's targeted weights)."""
    payload = json.dumps(sorted(fingerprints.items()))
    return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()
