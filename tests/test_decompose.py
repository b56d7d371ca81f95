import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sve_cli.decompose import decompose, plan_decomposition, svd_factors
from sve_cli.factors import load_manifest
from sve_cli.errors import OutputExistsError, SveError


def _run(model, out, **kwargs):
    plan_options = {k: kwargs.pop(k) for k in ("targets", "precision", "max_shard_size") if k in kwargs}
    return decompose(plan_decomposition(str(model), **plan_options), out, **kwargs)


def _cache_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _assert_cache_is_exact(cache: Path, model: Path, tolerance: float):
    manifest = load_manifest(cache)
    index = json.loads((cache / "factors.safetensors.index.json").read_text())
    sources = {}
    for file in model.glob("*.safetensors"):
        sources.update(load_file(file))
    total = 0
    for target in manifest["targets"]:
        name, (out_features, in_features), k = target["name"], target["shape"], target["k"]
        factors = {}
        for factor in ("U", "S", "Vh"):
            shard = index["weight_map"][f"{name}.{factor}"]
            assert shard == target["shard"]
            factors[factor] = load_file(cache / shard)[f"{name}.{factor}"]
            total += factors[factor].numel() * factors[factor].element_size()
        U, S, Vh = factors["U"], factors["S"], factors["Vh"]
        assert U.shape == (out_features, k) and S.shape == (k,) and Vh.shape == (k, in_features)
        weight = sources[name].to(U.dtype)
        exact = float((U @ torch.diag(S) @ Vh - weight).norm() / weight.norm())
        assert exact < tolerance, name
        assert target["rel_error"] < tolerance
        eye = torch.eye(k, dtype=U.dtype)
        assert torch.allclose(U.T @ U, eye, atol=10 * tolerance) and torch.allclose(Vh @ Vh.T, eye, atol=10 * tolerance)
        assert bool((S[:-1] >= S[1:]).all()) and bool((S >= 0).all())
        columns = torch.arange(k)
        assert bool((U[U.abs().argmax(0), columns] > 0).all())  # canonical signs
    assert index["metadata"]["total_size"] == total == manifest["total_size"]


@pytest.mark.parametrize("kind", ["llama-sharded", "bert", "vit"])
def test_factors_reconstruct_the_source(tiny_checkpoints, tmp_path, kind):
    result = _run(tiny_checkpoints[kind], tmp_path / "cache", max_shard_size=30_000)
    assert len(result.computed) == len(result.manifest["targets"]) > 0
    assert len(list((tmp_path / "cache").glob("factors-*.safetensors"))) > 1
    _assert_cache_is_exact(tmp_path / "cache", tiny_checkpoints[kind], 1e-5)


def test_real_minilm_reconstructs(minilm_path, tmp_path):
    _run("builtin:minilm", tmp_path / "cache")
    _assert_cache_is_exact(tmp_path / "cache", minilm_path, 1e-5)


def test_float64_precision(tiny_checkpoints, tmp_path):
    result = _run(tiny_checkpoints["bert"], tmp_path / "cache", precision="float64")
    assert result.manifest["precision"] == "float64"
    _assert_cache_is_exact(tmp_path / "cache", tiny_checkpoints["bert"], 1e-12)


def test_error_estimate_tracks_the_exact_error():
    torch.manual_seed(0)
    weight = torch.randn(64, 48)
    U, S, Vh, _ = svd_factors(weight, torch.float32, torch.device("cpu"))
    assert torch.allclose(U @ torch.diag(S) @ Vh, weight, atol=1e-5)
    # a deliberately wrong factorisation: the estimate must be close to the true error
    truncated = U[:, :24] @ torch.diag(S[:24]) @ Vh[:24]
    exact = float((truncated - weight).norm() / weight.norm())
    probes = torch.randn(48, 4096, generator=torch.Generator().manual_seed(1))
    estimate = float(((weight - truncated) @ probes).norm() / (weight @ probes).norm())
    assert abs(estimate - exact) < 0.05 * exact


def _ill_conditioned(out: int = 96, inner: int = 64) -> torch.Tensor:
    """Singular values from 1 down to 1e-9 (and three exact zeros): the Gram matrix squares them."""
    generator = torch.Generator().manual_seed(2)
    left = torch.linalg.qr(torch.randn(out, inner, generator=generator, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(inner, inner, generator=generator, dtype=torch.float64))[0]
    values = torch.logspace(0, -9, inner, dtype=torch.float64)
    values[-3:] = 0
    return (left * values) @ right.T


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_every_method_meets_the_tolerance_or_is_replaced(dtype, tolerance):
    from sve_cli.decompose import ErrorProbes, _thin_svd

    def errors(matrix, U, S, Vh):
        return ErrorProbes(matrix, U.dtype).errors(U, S, Vh)

    well = torch.randn(80, 48, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    for method in ("svd", "svd64", "gram64"):
        U, S, Vh = (f.to(dtype) for f in _thin_svd(well, method))
        assert max(errors(well, U, S, Vh)) < tolerance, method
        torch.testing.assert_close(S, torch.linalg.svdvals(well.double()).to(dtype), rtol=tolerance * 10, atol=0)
    # through the Gram matrix, singular values below sqrt(eps)·S_max lose their vectors: the check sees it
    bad = _ill_conditioned().to(dtype)
    assert max(errors(bad, *(f.to(dtype) for f in _thin_svd(bad, "gram64")))) > tolerance
    U, S, Vh, error = svd_factors(bad, dtype, torch.device("cpu"), methods=["gram64", "svd64"])
    assert error < tolerance and max(errors(bad, U, S, Vh)) < tolerance  # redone by the accurate path


def test_an_inaccurate_svd_is_never_written_silently(monkeypatch):
    """A solver returning 1e-3 errors (cuSOLVER's default gesvdj did) is replaced, or refused."""
    from sve_cli import decompose as module

    real = module._thin_svd

    def sloppy(matrix, method):
        U, S, Vh = real(matrix, method)
        noise = torch.randn(U.shape, generator=torch.Generator().manual_seed(0), dtype=U.dtype)
        return (U + 1e-3 * noise, S, Vh) if method == "svd" else (U, S, Vh)

    monkeypatch.setattr(module, "_thin_svd", sloppy)
    weight = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    U, S, Vh, error = svd_factors(weight, torch.float32, torch.device("cpu"))  # svd, then svd64
    assert error < 1e-5 and float((U * S @ Vh - weight).norm() / weight.norm()) < 1e-5
    with pytest.raises(SveError, match="no SVD of the \\[64, 48\\] tensor 'weight' met the 1e-05 tolerance"):
        svd_factors(weight, torch.float32, torch.device("cpu"), methods=["svd"])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_weight_is_named_not_decomposed(value):
    weight = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    weight[5, 7] = value
    with pytest.raises(SveError, match="tensor 'layers.1.weight' contains NaN or infinite values"):
        svd_factors(weight, torch.float32, torch.device("cpu"), name="layers.1.weight")


def test_decompose_of_a_non_finite_checkpoint_is_one_line_and_writes_nothing(tmp_path):
    """In a real process: LAPACK is never handed the infinity (MKL would print its own errors)."""
    from conftest import sve_subprocess

    weights = {f"layers.{i}.weight": torch.randn(32, 24, generator=torch.Generator().manual_seed(i)) for i in range(2)}
    weights["layers.1.weight"][3, 4] = float("inf")
    (tmp_path / "model").mkdir()
    save_file(weights, str(tmp_path / "model" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "model" / "config.json").write_text('{"model_type": "custom"}')
    result = sve_subprocess("decompose", tmp_path / "model", "--targets", "*.weight", "--out", tmp_path / "cache")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "'layers.1.weight' contains NaN or infinite values" in lines[0] and not result.stdout.strip()
    assert not list((tmp_path / "cache").glob("*.safetensors")) and not (tmp_path / "cache" / "decomposition.json").exists()


def test_rerun_reuses_finished_shards_and_redoes_a_missing_one(tiny_checkpoints, tmp_path):
    cache = tmp_path / "cache"
    first = _run(tiny_checkpoints["llama"], cache, max_shard_size=30_000)
    reference = _cache_files(cache)
    again = _run(tiny_checkpoints["llama"], cache, max_shard_size=30_000)
    assert again.computed == [] and len(again.reused) == len(first.computed)
    assert _cache_files(cache) == reference
    victim = sorted(cache.glob("factors-*.safetensors"))[1]
    victim.unlink()
    (cache / "decomposition.json").unlink()
    (cache / f".{victim.name}.tmp-12345").write_bytes(b"half-written")  # never trusted
    third = _run(tiny_checkpoints["llama"], cache, max_shard_size=30_000)
    assert 0 < len(third.computed) < len(first.computed)
    # sve did not journal it, so it is not sve's temporary: left as it was (tests/test_faults.py kills real writers)
    assert (cache / f".{victim.name}.tmp-12345").read_bytes() == b"half-written"
    (cache / f".{victim.name}.tmp-12345").unlink()
    assert _cache_files(cache) == reference


def test_changed_source_is_detected(tiny_checkpoints, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for file in tiny_checkpoints["bert"].iterdir():
        (model / file.name).write_bytes(file.read_bytes())
    cache = tmp_path / "cache"
    before = _run(model, cache).manifest
    tensors = load_file(model / "model.safetensors")
    name = before["targets"][0]["name"]
    tensors[name][0, 0] += 1.0
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    snapshot = _cache_files(cache)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        _run(model, cache)
    assert _cache_files(cache) == snapshot  # refused: nothing touched
    after = _run(model, cache, overwrite=True).manifest
    assert after["fingerprint"] != before["fingerprint"]
    changed = [t["name"] for t, u in zip(before["targets"], after["targets"]) if t["fingerprint"] != u["fingerprint"]]
    assert changed == [name]
    _assert_cache_is_exact(cache, model, 1e-5)


def test_foreign_directory_is_never_clobbered(tiny_checkpoints, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match="not an sve decomposition cache"):
            _run(tiny_checkpoints["bert"], tmp_path / "mine", overwrite=overwrite)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["thesis.txt"]


def test_unknown_precision_and_device(tiny_checkpoints, tmp_path):
    with pytest.raises(SveError, match="--dtype"):
        plan_decomposition(str(tiny_checkpoints["bert"]), precision="float8")
    if not torch.cuda.is_available():
        with pytest.raises(SveError, match="no CUDA device"):
            _run(tiny_checkpoints["bert"], tmp_path / "cache", device="cuda")
