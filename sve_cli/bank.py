"""The Σ bank: everything an ensemble trained, in one small safetensors file.

Tensors: per targeted module `{module}.sigma [M,k]` and `{module}.bias [M,out]` (module = the
checkpoint's parameter name without `.weight`), `head.weight [M,C,d]`, `head.bias [M,C]`, and for
heads on the family's pooler-like stem its frozen `stem.weight [d',d]`, `stem.bias [d']`.
Header metadata (JSON strings): base model, decomposition and source fingerprints, M, targets,
parameterisation, head kind, plus whatever the caller adds (label names, task).
Sigma is stored raw (before clamp/softplus), so a loaded bank continues training exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from sve_cli import __version__
from sve_cli.distributed import full
from sve_cli.writing import save_safetensors
from sve_cli.ensemble import SVEModel
from sve_cli.errors import SveError
from sve_cli.outputs import OutputKind


def bank_tensors(model: SVEModel) -> dict[str, torch.Tensor]:
    """Every trainable tensor: `{module}.sigma`/`.bias` for SVE (`.weight` for dense members,
    `.lora_A`/`.lora_B` for LoRA), the heads, and the frozen stem the heads read; whole tensors even when
    FSDP shards them (then every rank must call this)."""
    tensors = {}
    for name, layer in model.layers.items():
        module = name.removesuffix(".weight")
        for parameter_name, parameter in layer.named_parameters(recurse=False):
            if parameter.requires_grad:  # not the frozen factors or weights
                tensors[f"{module}.{parameter_name}"] = full(parameter.detach())
    for parameter_name, parameter in model.head.named_parameters(recurse=False):
        tensors[f"head.{parameter_name}"] = full(parameter.detach())
    if model.stem is not None:  # frozen, but possibly initialised here rather than read from the checkpoint
        tensors["stem.weight"], tensors["stem.bias"] = full(model.stem.weight.detach()), full(model.stem.bias.detach())
    return tensors


def bank_metadata(model: SVEModel, extra: dict[str, object] | None = None) -> dict[str, str]:
    identity = model.identity
    metadata = {
        "base_model": identity.base_model,
        "model_type": identity.model_type,
        "decomposition_fingerprint": identity.decomposition_fingerprint,
        "source_fingerprint": identity.source_fingerprint,
        "base_fingerprint": identity.base_fingerprint,
        "members": model.members,
        "targets": identity.targets,
        "method": identity.method,
        "parameterisation": getattr(next(iter(model.layers.values()), None), "parameterisation", None),
        "head": model.head_kind,
        "representation": model.representation,
        "tool": f"sve {__version__}",
        **(extra or {}),
    }
    return {f"sve.{key}": json.dumps(value) for key, value in metadata.items()}


def save_bank(model: SVEModel, path: Path, extra: dict[str, object] | None = None,
              tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Write the bank atomically (temporary name, then rename); `tensors`: `bank_tensors(model)` gathered
    already (by every rank of a sharded model)."""
    save_safetensors(Path(path), bank_tensors(model) if tensors is None else tensors, bank_metadata(model, extra))


REQUIRED_METADATA = ("base_model", "decomposition_fingerprint", "source_fingerprint", "members", "targets", "method",
                     "head")


def read_bank_metadata(path: Path) -> dict[str, object]:
    """The bank's metadata, decoded (keys without the `sve.` prefix)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise SveError(f"{path} is not a readable Σ bank: {error}") from None
    if "sve.decomposition_fingerprint" not in raw:
        raise SveError(f"{path} is a safetensors file but not an sve Σ bank (no sve metadata)")
    try:
        metadata = {key.removeprefix("sve."): json.loads(value) for key, value in raw.items() if key.startswith("sve.")}
    except ValueError:
        raise SveError(f"{path}: the bank's sve metadata is not valid JSON (a damaged or edited file)") from None
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise SveError(f"{path}: the bank's metadata lacks '{missing[0]}' (a damaged or edited file)")
    return metadata


def _is_sve_bank(path: Path) -> bool:
    try:
        read_bank_metadata(path)
    except SveError:
        return False
    return True


BANK_OUTPUT = OutputKind("an sve Σ bank", False, _is_sve_bank)  # what `sve export --format sigma-bank` may replace


def base_changed(model: str) -> str:
    return (f"the base checkpoint {model} changed since this bank was trained (weights outside the targets differ: "
            "embeddings, norms, heads or untargeted layers); use the checkpoint the run was trained on, or train again")


def load_bank(model: SVEModel, path: Path) -> dict[str, object]:
    """Copy a bank into `model`; refuse one made for another base, target set or shape."""
    metadata = read_bank_metadata(path)
    identity = model.identity
    if metadata["targets"] != identity.targets:
        raise SveError(f"{path} targets {len(metadata['targets'])} modules, this ensemble "
                       f"{len(identity.targets)}: the target sets differ")
    if metadata["decomposition_fingerprint"] != identity.decomposition_fingerprint:
        raise SveError(f"{path} was trained on another base model or decomposition ({metadata['base_model']}, "
                       f"decomposition {metadata['decomposition_fingerprint'][:19]}…) than "
                       f"{identity.base_model} ({identity.decomposition_fingerprint[:19]}…)")
    if metadata.get("base_fingerprint", identity.base_fingerprint) != identity.base_fingerprint:
        raise SveError(base_changed(identity.base_model))
    parameterisation = bank_metadata(model)["sve.parameterisation"]
    if json.dumps(metadata.get("parameterisation")) != parameterisation:
        raise SveError(f"{path} stores singular values as '{metadata.get('parameterisation')}', this ensemble "
                       f"as {json.loads(parameterisation)}: set ensemble.parameterisation to match")
    expected = bank_tensors(model)
    with safe_open(str(path), framework="pt") as handle:
        if set(handle.keys()) != set(expected):
            raise SveError(f"{path} holds other tensors than this ensemble expects "
                           f"(e.g. members, bias or head kind differ)")
        for name, tensor in expected.items():
            stored = handle.get_tensor(name)
            if stored.shape != tensor.shape:
                raise SveError(f"{path}: '{name}' has shape {list(stored.shape)}, "
                               f"this ensemble needs {list(tensor.shape)}")
            if stored.is_floating_point() and not bool(torch.isfinite(stored).all()):
                raise SveError(f"{path}: '{name}' holds NaN or infinite values; the bank cannot be used")
            with torch.no_grad():
                tensor.copy_(stored)
    return metadata
