"""`sve decompose`: thin SVD of every targeted weight into a resumable U/S/Vh cache.

Layout of the cache directory (DESIGN.md):

    factors-00001-of-0000N.safetensors   {param}.U [out,k], {param}.S [k], {param}.Vh [k,in]
    factors.safetensors.index.json       HF-style weight_map + metadata.total_size
    decomposition.json                   source, fingerprints, targets, errors, tool version

Shards are planned from shapes before any SVD runs, so a rerun plans the same files. Each shard is
written atomically (temporary name, then rename) and carries the decomposition's identity in its
metadata; a rerun reuses a shard only when that identity and its tensor list match, so a run killed
at any moment and restarted ends with the same cache. `decomposition.json` is written last: its
presence means the cache is complete.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from sve_cli import __version__
from sve_cli.checkpoint import Checkpoint, open_checkpoint, sve_home, tensor_fingerprint
from sve_cli.writing import Shard, ShardWriter, plan_shards, write_index, write_json
from sve_cli.errors import OutputExistsError, SveError
from sve_cli.targets import Target, resolve_targets

MANIFEST = "decomposition.json"
INDEX = "factors.safetensors.index.json"
SHARD_NAME = re.compile(r"factors-\d{5}-of-\d{5}\.safetensors")
PRECISIONS = {"float32": torch.float32, "float64": torch.float64}
ERROR_PROBES = 16  # Gaussian probes for the reconstruction-error estimate


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


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SveError(f"--device {device}: no CUDA device is available (use cpu or auto)")
    try:
        return torch.device(device)
    except RuntimeError:
        raise SveError(f"unknown --device '{device}' (use cpu, cuda or auto)") from None


def svd_factors(weight: torch.Tensor, dtype: torch.dtype, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Thin SVD `W = U diag(S) Vh` with canonical signs, and its relative reconstruction error.

    Signs are fixed so that the largest-magnitude entry of each column of U is positive: the
    factors then do not depend on the LAPACK build or device. The error
    `||W - U diag(S) Vh||_F / ||W||_F` is estimated on `ERROR_PROBES` seeded Gaussian probes
    (`||A G||_F² / p` is an unbiased estimate of `||A||_F²`), which costs O(out·in) instead of
    the O(out·in·k) of rebuilding W.
    """
    matrix = weight.to(device=device, dtype=dtype)  # [out, in]
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)  # [out,k], [k], [k,in]
    columns = torch.arange(U.shape[1], device=device)
    signs = torch.sign(U[U.abs().argmax(dim=0), columns])  # [k]
    signs[signs == 0] = 1
    U.mul_(signs)  # in place: no new [out, k] / [k, in] buffers
    Vh.mul_(signs[:, None])
    generator = torch.Generator(device=device).manual_seed(0)
    probes = torch.randn(matrix.shape[1], ERROR_PROBES, generator=generator, device=device, dtype=dtype)
    projected = matrix @ probes  # [out, p]
    rebuilt = U @ (S[:, None] * (Vh @ probes))  # [out, p]
    norm = projected.norm()
    error = float((projected - rebuilt).norm() / norm) if norm > 0 else 0.0
    return U.cpu(), S.cpu(), Vh.cpu(), error


@dataclass
class DecomposePlan:
    """What a decomposition will write: targets, shards and their size (no SVD run yet)."""

    checkpoint: Checkpoint
    targets: list[Target]
    precision: str
    shards: list[Shard]

    @property
    def total_size(self) -> int:
        return sum(shard.nbytes for shard in self.shards)

    @property
    def work(self) -> dict[str, int]:
        """Relative SVD cost per target (out·in·k), for progress and ETA."""
        return {t.name: t.out_features * t.in_features * t.k for t in self.targets}


def plan_decomposition(model: str, targets: str | None = None, precision: str = "float32",
                       max_shard_size: int = 1_000_000_000) -> DecomposePlan:
    if precision not in PRECISIONS:
        raise SveError(f"unknown --precision '{precision}' (use float32 or float64)")
    checkpoint = open_checkpoint(model)
    resolved = resolve_targets(checkpoint, targets)
    element_size = PRECISIONS[precision].itemsize
    sizes = [(t.name, t.factor_bytes(element_size)) for t in resolved]
    shards = plan_shards(sizes, max_shard_size, prefix="factors")
    return DecomposePlan(checkpoint, resolved, precision, shards)


@dataclass
class DecomposeResult:
    out: Path
    manifest: dict
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _fixed_width(error: float) -> str:
    """'1.340804e-06': every error has the same width, so a shard's header length is known
    before its errors are (the writer streams tensors behind a header rewritten at commit)."""
    return f"{error:.6e}"


def _layout(targets: list[Target], dtype: torch.dtype) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """The order a shard's factors are computed and written in."""
    layout = []
    for t in targets:
        layout += [(f"{t.name}.U", dtype, (t.out_features, t.k)), (f"{t.name}.S", dtype, (t.k,)),
                   (f"{t.name}.Vh", dtype, (t.k, t.in_features))]
    return layout


def _identity(precision: str, fingerprints: dict[str, str]) -> str:
    payload = json.dumps({"precision": precision, "targets": sorted(fingerprints.items())})
    return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()


def source_fingerprint(fingerprints: dict[str, str]) -> str:
    payload = json.dumps(sorted(fingerprints.items()))
    return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()


def _shard_metadata(path: Path) -> dict[str, str] | None:
    """The metadata of a finished shard, or None when it is unreadable."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except Exception:
        return None


def _existing_identity(out: Path) -> str | None:
    manifest = out / MANIFEST
    if manifest.exists():
        try:
            return json.loads(manifest.read_text()).get("fingerprint")
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            return "unreadable"
    for shard in sorted(out.glob("factors-*.safetensors")):
        if (metadata := _shard_metadata(shard)) is not None:
            return metadata.get("sve.identity")
    return None


def _check_output(out: Path, identity: str, overwrite: bool) -> None:
    """Refuse to clobber anything that is not an unfinished run of this same decomposition."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} is a file, not a directory")
    if not out.exists() or not any(out.iterdir()):
        return
    existing = _existing_identity(out)
    if existing == identity:
        return  # resume (or find it complete)
    if existing is None:
        raise OutputExistsError(
            f"{out} exists and is not an sve decomposition cache; choose another --out"
        )
    if not overwrite:
        raise OutputExistsError(
            f"{out} holds a decomposition of another source, target set or precision; "
            "pass --overwrite to replace it"
        )
    for stale in (out / MANIFEST, out / INDEX):  # the old cache is invalid from here on
        stale.unlink(missing_ok=True)


def decompose(plan: DecomposePlan, out: Path, device: str = "cpu", overwrite: bool = False,
              on_target: Callable[[Target, bool], None] | None = None) -> DecomposeResult:
    """Run (or resume) the decomposition planned by `plan` into `out`.

    `on_target(target, reused)` is called after each target, for progress reporting.
    """
    started = time.perf_counter()
    torch_device = resolve_device(device)
    checkpoint, dtype = plan.checkpoint, PRECISIONS[plan.precision]
    fingerprints = {t.name: tensor_fingerprint(checkpoint.read(t.name)) for t in plan.targets}
    identity = _identity(plan.precision, fingerprints)
    _check_output(out, identity, overwrite)
    out.mkdir(parents=True, exist_ok=True)

    result = DecomposeResult(out, {})
    errors: dict[str, float] = {}
    targets = {t.name: t for t in plan.targets}
    with ShardWriter(out) as writer:
        for shard in plan.shards:
            metadata = _shard_metadata(out / shard.filename) if (out / shard.filename).exists() else None
            if metadata and metadata.get("sve.identity") == identity \
                    and json.loads(metadata.get("sve.targets", "[]")) == shard.names:
                errors.update({n: float(e) for n, e in json.loads(metadata["sve.errors"]).items()})
                for name in shard.names:
                    result.reused.append(name)
                    on_target and on_target(targets[name], True)
                continue
            shard_metadata = {"sve.identity": identity, "sve.targets": json.dumps(shard.names)}
            placeholder = {name: _fixed_width(0.0) for name in shard.names}
            writer.begin(shard.filename, _layout([targets[n] for n in shard.names], dtype),
                         {**shard_metadata, "sve.errors": json.dumps(placeholder)})
            shard_errors: dict[str, str] = {}
            for name in shard.names:
                weight = checkpoint.read(name)
                if not bool(torch.isfinite(weight).all()):
                    raise SveError(f"tensor '{name}' contains NaN or infinite values: cannot decompose it")
                U, S, Vh, error = svd_factors(weight, dtype, torch_device)
                for factor, tensor in (("U", U), ("S", S), ("Vh", Vh)):
                    writer.add(f"{name}.{factor}", tensor)
                shard_errors[name] = _fixed_width(error)
                errors[name] = float(shard_errors[name])
                result.computed.append(name)
                on_target and on_target(targets[name], False)
            writer.commit({**shard_metadata, "sve.errors": json.dumps(shard_errors)})

    weight_map = {f"{name}.{factor}": shard.filename
                  for shard in plan.shards for name in shard.names for factor in ("U", "S", "Vh")}
    write_index(out / INDEX, weight_map, plan.total_size, format="sve-decomposition")
    manifest = _manifest(plan, fingerprints, identity, errors)
    write_json(out / MANIFEST, manifest)
    planned = {shard.filename for shard in plan.shards}
    for stale in out.iterdir():  # shards of an earlier plan (e.g. another --max-shard-size)
        if SHARD_NAME.fullmatch(stale.name) and stale.name not in planned:
            stale.unlink()
    result.manifest = manifest
    result.seconds = time.perf_counter() - started
    return result


def _manifest(plan: DecomposePlan, fingerprints: dict[str, str], identity: str,
              errors: dict[str, float]) -> dict:
    checkpoint = plan.checkpoint
    shard_of = {name: shard.filename for shard in plan.shards for name in shard.names}
    return {
        "format": "sve-decomposition",
        "format_version": 1,
        "tool": f"sve {__version__}",
        "source": {
            "model": checkpoint.source,
            "path": str(checkpoint.path.resolve()),
            "model_type": checkpoint.model_type,
            "fingerprint": source_fingerprint(fingerprints),
        },
        "fingerprint": identity,
        "precision": plan.precision,
        "dtype": plan.precision,
        "total_size": plan.total_size,
        "reconstruction_error": (
            f"relative Frobenius error ||W - U diag(S) Vh|| / ||W||, estimated on "
            f"{ERROR_PROBES} seeded Gaussian probes"
        ),
        "targets": [
            {
                "name": t.name,
                "shape": [t.out_features, t.in_features],
                "k": t.k,
                "source_dtype": t.dtype,
                "fingerprint": fingerprints[t.name],
                "rel_error": errors[t.name],
                "shard": shard_of[t.name],
            }
            for t in plan.targets
        ],
    }


def load_manifest(cache: Path) -> dict:
    """The manifest of a complete decomposition cache, or one clear error."""
    path = Path(cache) / MANIFEST
    if not path.exists():
        raise SveError(f"{cache} is not a complete decomposition cache (no {MANIFEST})")
    return json.loads(path.read_text(encoding="utf-8"))


class FactorCache:
    """Read access to a complete decomposition cache, one target at a time."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.manifest = load_manifest(self.directory)

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(U [out,k], S [k], Vh [k,in])` of the target parameter `name`."""
        shard = next(t["shard"] for t in self.manifest["targets"] if t["name"] == name)
        with safe_open(str(self.directory / shard), framework="pt") as handle:  # mapped for this read only
            return tuple(handle.get_tensor(f"{name}.{factor}") for factor in ("U", "S", "Vh"))
