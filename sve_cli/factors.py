"""The decomposition cache: where it lives, and reading it one target at a time.

Layout (written by `sve_cli.decompose`):

    factors-00001-of-0000N.safetensors   {param}.U [out,k], {param}.S [k], {param}.Vh [k,in]
    factors.safetensors.index.json       HF-style weight_map + metadata.total_size
    decomposition.json                   source, fingerprints, targets, errors, tool version

`decomposition.json` is written last: its presence means the cache is complete.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from sve_cli.checkpoint import read_json
from sve_cli.writing import sve_home
from sve_cli.tensors import tensor_fingerprint
from sve_cli.errors import SveError

MANIFEST = "decomposition.json"
FORMAT_VERSION = 2  # what `sve decompose` writes now (checksums of every factor)
INDEX = "factors.safetensors.index.json"
SHARD_NAME = re.compile(r"factors-\d{5}-of-\d{5}\.safetensors")


def default_output(spec: str, targets: str | None = None) -> Path:
    """`$SVE_HOME/decompositions/<name>[-<path hash>][-<targets>]`: where `train` looks too.

    Local checkpoints get a hash of their absolute path, so two folders that share a name do not
    share a cache; built-in models and hub ids are named as given.
    """
    name = Path(spec.removeprefix("builtin:").rstrip("/")).name or spec
    if not spec.startswith("builtin:") and Path(spec).exists():
        name = f"{name}-{hashlib.sha256(str(Path(spec).resolve()).encode()).hexdigest()[:8]}"
    if targets and targets != "all":
        suffix = targets if re.fullmatch(r"[\w-]+", targets) else hashlib.sha256(targets.encode()).hexdigest()[:8]
        name = f"{name}-{suffix}"
    return sve_home() / "decompositions" / re.sub(r"[^\w.-]", "_", name)


def load_manifest(cache: Path) -> dict:
    """The manifest of a complete decomposition cache, or one clear error."""
    path = Path(cache) / MANIFEST
    if not path.exists():
        raise SveError(f"{cache} is not a complete decomposition cache (no {MANIFEST})")
    manifest = read_json(path, "decompose again with --overwrite")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("targets"), list):
        raise SveError(f"{path} is not an sve decomposition manifest; decompose again with --overwrite")
    return manifest


class FactorCache:
    """Read access to a complete decomposition cache, one target at a time."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.manifest = load_manifest(self.directory)
        if self.manifest.get("format_version", 1) < FORMAT_VERSION:
            raise SveError(f"{self.directory} was written by an older sve (no checksums of its factors); "
                           "decompose again with --overwrite")
        self._targets = {t["name"]: t for t in self.manifest["targets"]}

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(U [out,k], S [k], Vh [k,in])` of the target parameter `name`, checked against the
        checksums `sve decompose` recorded (a changed value is one clear error, never a silent
        change of predictions)."""
        target = self._targets.get(name)
        if target is None:
            raise SveError(f"decomposition {self.directory} has no factors of '{name}'")
        try:
            with safe_open(str(self.directory / target["shard"]), framework="pt") as handle:  # mapped for this read only
                factors = tuple(handle.get_tensor(f"{name}.{factor}") for factor in ("U", "S", "Vh"))
        except (SafetensorError, OSError) as error:
            raise SveError(f"decomposition {self.directory}: cannot read the factors of '{name}' ({error})") from None
        for factor, tensor in zip(("U", "S", "Vh"), factors):
            if tensor_fingerprint(tensor) != target["checksums"][factor]:
                raise SveError(f"decomposition {self.directory}: the factor {factor} of '{name}' has changed since "
                               "`sve decompose` wrote it (damaged or edited); decompose again with --overwrite")
        return factors
