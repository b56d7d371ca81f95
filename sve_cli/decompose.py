"""`sve decompose`: thin SVD of every targeted weight into a resumable U/S/Vh cache (its layout
and reader: `sve_cli.factors`).

Shards are planned from shapes before any SVD runs, so a rerun plans the same files. Each shard is
written atomically (temporary name, then rename) and carries the decomposition's identity in its
metadata; a rerun reuses a shard only when that identity and its tensor list match, so a run killed
at any moment and restarted ends with the same cache. `decomposition.json` is written last: its
presence means the cache is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from sve_cli import __version__
from sve_cli.architectures import architecture
from sve_cli.checkpoint import Checkpoint, open_checkpoint
from sve_cli.tensors import DTYPE_NAMES, source_fingerprint
from sve_cli.factors import FORMAT_VERSION, INDEX, MANIFEST, SHARD_NAME, FactorCache, default_output
from sve_cli.writing import (Shard, ShardWriter, exclusive, fault_point, plan_shards, visible_entries, write_index,
                             write_json)
from sve_cli.errors import OutputExistsError, SveError
from sve_cli.outputs import refuse_inputs, refuse_unusual
from sve_cli.targets import Target, resolve_targets

log = logging.getLogger("sve")

PRECISIONS = ("float32", "float64")
ERROR_PROBES = 16  # Gaussian probes for the reconstruction-error estimate


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SveError(f"--device {device}: no CUDA device is available (use cpu or auto)")
    try:
        return torch.device(device)
    except RuntimeError:
        raise SveError(f"unknown --device '{device}' (use cpu, cuda or auto)") from None


TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}  # relative reconstruction error and orthogonality


def _thin_svd(matrix: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`U [out,k]`, `S [k]` (descending), `Vh [k,in]` of `matrix`, by one of three methods:

    - svd:    `torch.linalg.svd` in the matrix's dtype (LAPACK gesdd on CPU; cuSOLVER gesvd on
              CUDA, not the default gesvdj, whose error reaches 1e-3);
    - svd64:  the same in float64 (the accurate fallback);
    - gram64: eigendecomposition of the float64 Gram matrix of the smaller side, the other
              factor as `W V / S` — a few times faster on a GPU; small singular values lose
              accuracy through the Gram matrix, which the orthogonality check catches.
    """
    driver = {"driver": "gesvd"} if matrix.is_cuda else {}
    if method == "svd":
        return torch.linalg.svd(matrix, full_matrices=False, **driver)
    wide = matrix.double()
    if method == "svd64":
        return torch.linalg.svd(wide, full_matrices=False, **driver)
    tall = wide.shape[0] >= wide.shape[1]
    gram = wide.T @ wide if tall else wide @ wide.T  # [k, k]
    eigenvalues, vectors = torch.linalg.eigh(gram)  # ascending
    S = eigenvalues.flip(0).clamp_min(0).sqrt()  # [k]
    vectors = vectors.flip(1)
    if tall:
        return (wide @ vectors) / S, S, vectors.T  # U [out,k] = W V / S
    return vectors, S, (vectors.T @ wide) / S[:, None]  # Vh [k,in] = U^T W / S


class ErrorProbes:
    """Seeded Gaussian probes of one weight, drawn before its SVD.

    `errors(U, S, Vh)` estimates `||W - U S Vh||_F / ||W||_F` and `max(||U^T U - I||, ||Vh Vh^T - I||)_F /
    sqrt(k)` on `ERROR_PROBES` probes (`||A G||_F² / p` is an unbiased estimate of `||A||_F²`):
    O((out+in)·(k+in)·p) instead of the O(out·in·k) of rebuilding W. `W G` is computed once, for every
    method tried, and doubles as the check for NaN and infinities (they reach `W G`), so no separate
    pass over W is needed in the common case.
    """

    def __init__(self, matrix: torch.Tensor, dtype: torch.dtype):
        generator = torch.Generator(device=matrix.device).manual_seed(0)
        self.probes = torch.randn(matrix.shape[1], ERROR_PROBES, generator=generator, device=matrix.device,
                                  dtype=dtype)  # [in, p]
        self.projected = matrix.to(dtype) @ self.probes  # [out, p]
        self.basis = torch.randn(min(matrix.shape), ERROR_PROBES, generator=generator, device=matrix.device,
                                 dtype=dtype)  # [k, p]

    @property
    def finite(self) -> bool:
        return bool(torch.isfinite(self.projected).all())

    def errors(self, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> tuple[float, float]:
        rebuilt = U @ (S[:, None] * (Vh @ self.probes))  # [out, p]
        norm = self.projected.norm()
        reconstruction = float((self.projected - rebuilt).norm() / norm) if norm > 0 else 0.0
        basis = self.basis  # [k, p]
        orthogonality = max(float((U.T @ (U @ basis) - basis).norm() / basis.norm()),
                            float((Vh @ (Vh.T @ basis) - basis).norm() / basis.norm()))
        if not (reconstruction == reconstruction and orthogonality == orthogonality):  # NaN from a zero S
            return float("inf"), float("inf")
        return reconstruction, orthogonality


def svd_methods(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Fastest first, each one more accurate than the last (benchmarks/decompose.py --methods)."""
    if device.type == "cuda":
        return ["gram64", "svd64"]
    return ["svd", "svd64"] if dtype == torch.float32 else ["svd"]


def svd_factors(weight: torch.Tensor, dtype: torch.dtype, device: torch.device, methods: list[str] | None = None,
                name: str = "weight") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Thin SVD `W = U diag(S) Vh` in `dtype` with canonical signs, and its relative reconstruction error.

    Each method of `methods` (default: `svd_methods`) is tried in turn until the factors meet
    `TOLERANCE[dtype]` in reconstruction error and orthogonality of U and Vh; none meeting it, or a
    weight holding NaN or infinities, is one clear error naming `name`. Signs are fixed so that the
    largest-magnitude entry of each column of U is positive: the factors then do not depend on the
    LAPACK build, the method or the device.
    """
    matrix = weight.to(device=device)  # [out, in]
    probes = ErrorProbes(matrix, dtype)
    if not probes.finite and not bool(torch.isfinite(matrix).all()):  # W G overflows only for absurd weights
        raise SveError(f"tensor '{name}' contains NaN or infinite values: cannot decompose it")
    tolerance = TOLERANCE[dtype]
    measured = []
    for method in methods or svd_methods(device, dtype):
        U, S, Vh = (factor.to(dtype) for factor in _thin_svd(matrix.to(dtype), method))  # [out,k], [k], [k,in]
        reconstruction, orthogonality = probes.errors(U, S, Vh)
        if reconstruction <= tolerance and orthogonality <= tolerance:
            break
        measured.append(f"{method}: error {reconstruction:.1e}, orthogonality {orthogonality:.1e}")
    else:
        raise SveError(f"no SVD of the {list(weight.shape)} tensor '{name}' met the {tolerance:.0e} tolerance "
                       f"({'; '.join(measured)}); try --dtype float64")
    columns = torch.arange(U.shape[1], device=device)
    signs = torch.sign(U[U.abs().argmax(dim=0), columns])  # [k]
    signs[signs == 0] = 1
    U.mul_(signs)  # in place: no new [out, k] / [k, in] buffers
    Vh.mul_(signs[:, None])
    return U.cpu(), S.cpu(), Vh.cpu(), reconstruction


@dataclass
class DecomposePlan:
    """What a decomposition will write: targets, shards and their size (no SVD run yet)."""

    checkpoint: Checkpoint
    targets: list[Target]
    precision: str
    shards: list[Shard]
    inferred: bool = False  # the preset was inferred from the model's structure (a family sve has no spec for)

    @property
    def total_size(self) -> int:
        return sum(shard.nbytes for shard in self.shards)

    @property
    def work(self) -> dict[str, int]:
        """Relative SVD cost per target (out·in·k), for progress and ETA."""
        return {t.name: t.out_features * t.in_features * t.k for t in self.targets}


def plan_decomposition(model: str, targets: str | None = None, precision: str = "float32",
                       max_shard_size: int = 1_000_000_000, shapes_only: bool = False) -> DecomposePlan:
    """What `decompose` will do; with `shapes_only` (a dry run) one of the paper's checkpoints that
    cannot be fetched is planned from its shipped config."""
    if precision not in PRECISIONS:
        raise SveError(f"unknown --dtype '{precision}' (use float32 or float64)")
    checkpoint = open_checkpoint(model, shapes_only)
    resolved = resolve_targets(checkpoint, targets)
    element_size = DTYPE_NAMES[precision].itemsize
    sizes = [(t.name, t.factor_bytes(element_size)) for t in resolved]
    shards = plan_shards(sizes, max_shard_size, prefix="factors")
    inferred = (targets or "all").strip() in ("all", "attention", "mlp") and architecture(checkpoint).inferred
    return DecomposePlan(checkpoint, resolved, precision, shards, inferred)


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
    payload = json.dumps({"precision": precision, "format": FORMAT_VERSION, "targets": sorted(fingerprints.items())})
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


def _check_output(out: Path, identity: str, overwrite: bool) -> bool:
    """Refuse to clobber anything that is not this decomposition (finished or not); True when
    `out` holds another decomposition that `--overwrite` replaces. sve's own lock and temporaries
    (left by a killed run) do not count: a directory holding only those is empty."""
    refuse_unusual(out, directory=True)
    if not out.exists() or not visible_entries(out):
        return False
    existing = _existing_identity(out)
    if existing == identity:
        return False  # resume (or find it complete)
    if existing is None:
        raise OutputExistsError(
            f"{out} exists and is not an sve decomposition cache; choose another --out"
        )
    if not overwrite:
        raise OutputExistsError(
            f"{out} holds a decomposition of another source, target set or precision; "
            "pass --overwrite to replace it"
        )
    return True


def decompose(plan: DecomposePlan, out: Path, device: str = "cpu", overwrite: bool = False,
              on_target: Callable[[Target, bool], None] | None = None,
              on_wait: Callable[[], None] | None = None) -> DecomposeResult:
    """Run (or resume) the decomposition planned by `plan` into `out`.

    `on_target(target, reused)` is called after each target, for progress reporting. Another
    process decomposing into `out` is waited for (`on_wait()` says so); its finished shards are
    then reused.
    """
    started = time.perf_counter()
    torch_device = resolve_device(device)
    checkpoint, dtype = plan.checkpoint, DTYPE_NAMES[plan.precision]
    fingerprints = {t.name: checkpoint.fingerprint(t.name) for t in plan.targets}
    identity = _identity(plan.precision, fingerprints)
    refuse_inputs(out, [checkpoint.path])
    _check_output(out, identity, overwrite)  # before anything is created in `out`
    with exclusive(out, "decompose", wait=True, on_wait=on_wait):
        if _check_output(out, identity, overwrite):  # again: the lock's last holder may have changed it
            for stale in (out / MANIFEST, out / INDEX):  # the old cache is invalid from here on
                stale.unlink(missing_ok=True)
        result = _decompose_locked(plan, out, identity, fingerprints, torch_device, dtype, on_target)
    result.seconds = time.perf_counter() - started
    return result


def _decompose_locked(plan: DecomposePlan, out: Path, identity: str, fingerprints: dict[str, str],
                      torch_device: torch.device, dtype: torch.dtype,
                      on_target: Callable[[Target, bool], None] | None) -> DecomposeResult:
    checkpoint = plan.checkpoint
    result = DecomposeResult(out, {})
    errors: dict[str, float] = {}
    targets = {t.name: t for t in plan.targets}
    checksums: dict[str, str] = {}  # factor tensor name -> its fingerprint (verified when the cache is used)
    with ShardWriter(out, fingerprint=True) as writer:
        for shard in plan.shards:
            metadata = _shard_metadata(out / shard.filename) if (out / shard.filename).exists() else None
            if metadata and metadata.get("sve.identity") == identity \
                    and json.loads(metadata.get("sve.targets", "[]")) == shard.names:
                errors.update({n: float(e) for n, e in json.loads(metadata["sve.errors"]).items()})
                checksums.update(json.loads(metadata["sve.checksums"]))
                for name in shard.names:
                    result.reused.append(name)
                    on_target and on_target(targets[name], True)
                continue
            shard_metadata = {"sve.identity": identity, "sve.targets": json.dumps(shard.names)}
            layout = _layout([targets[n] for n in shard.names], dtype)
            placeholder = {name: _fixed_width(0.0) for name in shard.names}
            unknown = {name: "sha256:" + "0" * 64 for name, _, _ in layout}  # fingerprints have a fixed width
            writer.begin(shard.filename, layout, {**shard_metadata, "sve.errors": json.dumps(placeholder),
                                                  "sve.checksums": json.dumps(unknown)})
            shard_errors: dict[str, str] = {}
            for name in shard.names:
                U, S, Vh, error = svd_factors(checkpoint.read(name), dtype, torch_device, name=name)
                for factor, tensor in (("U", U), ("S", S), ("Vh", Vh)):
                    writer.add(f"{name}.{factor}", tensor)
                shard_errors[name] = _fixed_width(error)
                errors[name] = float(shard_errors[name])
                result.computed.append(name)
                on_target and on_target(targets[name], False)
            writer.wait()  # the last tensor's fingerprint
            shard_checksums = {name: writer.fingerprints[name] for name, _, _ in layout}
            checksums.update(shard_checksums)
            writer.commit({**shard_metadata, "sve.errors": json.dumps(shard_errors),
                           "sve.checksums": json.dumps(shard_checksums)})

    weight_map = {f"{name}.{factor}": shard.filename
                  for shard in plan.shards for name in shard.names for factor in ("U", "S", "Vh")}
    write_index(out / INDEX, weight_map, plan.total_size, format="sve-decomposition")
    manifest = _manifest(plan, fingerprints, identity, errors, checksums)
    fault_point("before-manifest")
    write_json(out / MANIFEST, manifest)
    planned = {shard.filename for shard in plan.shards}
    for stale in out.iterdir():  # shards of an earlier plan (e.g. another --max-shard-size)
        if SHARD_NAME.fullmatch(stale.name) and stale.name not in planned:
            stale.unlink()
    result.manifest = manifest
    return result


def _manifest(plan: DecomposePlan, fingerprints: dict[str, str], identity: str,
              errors: dict[str, float], checksums: dict[str, str]) -> dict:
    checkpoint = plan.checkpoint
    shard_of = {name: shard.filename for shard in plan.shards for name in shard.names}
    return {
        "format": "sve-decomposition",
        "format_version": FORMAT_VERSION,
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
            f"relative Frobenius error ||W - U diag(S) Vh|| / ||W||, estimated on {ERROR_PROBES} seeded "
            f"Gaussian probes; every target met {TOLERANCE[DTYPE_NAMES[plan.precision]]:.0e} in it and in "
            "the orthogonality of U and Vh"
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
                "checksums": {factor: checksums[f"{t.name}.{factor}"] for factor in ("U", "S", "Vh")},
            }
            for t in plan.targets
        ],
    }




def decomposition_for(model: str, decomposition: Path | None, targets: str | None,
                      refresh: bool = False) -> FactorCache:
    """The given cache, or the model's default cache under `$SVE_HOME`.

    The default cache is sve's own: it is made when absent or unfinished, and a complete one is used as
    it is — matching it to the model's weights when the ensemble is built proves it current without hashing
    the checkpoint a second time; `refresh` brings a stale one up to date (reused shard by shard).
    """
    if decomposition is not None:
        return FactorCache(decomposition)
    out = default_output(model, targets)
    if (out / MANIFEST).exists() and not refresh:
        try:
            return FactorCache(out)
        except SveError:  # written by an older sve: made again below
            pass
    if not (out / MANIFEST).exists():
        log.info("decomposing %s into %s (no model.decomposition given: done once, then reused)", model, out)
    result = decompose(plan_decomposition(model, targets), out, overwrite=True)
    if result.computed:
        log.info("decomposed %d targets of %s in %.1f s", len(result.computed), model, result.seconds)
    return FactorCache(out)
