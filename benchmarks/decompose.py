"""Benchmark: `sve decompose` against a plain in-memory `torch.linalg.svd` loop.

For each checkpoint, two kinds of worker process run the same targets, alternating, best of
`--repeats`:

- `sve`: the library's `plan_decomposition` + `decompose` (fingerprints, canonical signs, error
  estimate, atomic sharded writes), timed from the call, interpreter start-up excluded;
- `svd`: every target tensor already in memory, then `torch.linalg.svd(W, full_matrices=False)`.

Each worker's peak RSS (ru_maxrss) is reported next to the checkpoint size and its largest tensor:
the target is that sve's peak grows with the largest tensor, not with the checkpoint, and that the
time ratio sve / svd stays ≤ 1.10.

    .venv/bin/python benchmarks/decompose.py            # MiniLM + a synthetic LLaMA-shaped checkpoint
    .venv/bin/python benchmarks/decompose.py --scaling  # one matrix of 512² … 4096², 11008×4096
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch


def worker(kind: str, model: str, out: str, targets: str | None) -> None:
    from sve_cli.checkpoint import open_checkpoint
    from sve_cli.decompose import decompose, plan_decomposition
    from sve_cli.targets import resolve_targets

    if kind == "sve":
        started = time.perf_counter()
        decompose(plan_decomposition(model, targets), Path(out))
        seconds = time.perf_counter() - started
    else:
        checkpoint = open_checkpoint(model)
        weights = [checkpoint.read(t.name).float() for t in resolve_targets(checkpoint, targets)]
        started = time.perf_counter()
        for weight in weights:
            torch.linalg.svd(weight, full_matrices=False)
        seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "peak_rss": peak_rss()}))


def peak_rss() -> int:
    """This process's peak resident set (VmHWM; unlike ru_maxrss it is not inherited over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_worker(kind: str, model: str, out: Path, targets: str | None) -> dict:
    command = [sys.executable, __file__, "--worker", kind, model, str(out)]
    if targets:
        command += ["--targets", targets]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def synthetic_llama(directory: Path, blocks: int) -> Path:
    """LLaMA-shaped random weights: per block q,k (2048²) and gate, up (5504×2048), plus a
    large embedding that is not a target (so the checkpoint is much larger than any target)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(32000, 2048, generator=generator)}
    for block in range(blocks):
        prefix = f"model.layers.{block}"
        tensors[f"{prefix}.self_attn.q_proj.weight"] = torch.randn(2048, 2048, generator=generator)
        tensors[f"{prefix}.self_attn.k_proj.weight"] = torch.randn(2048, 2048, generator=generator)
        tensors[f"{prefix}.mlp.gate_proj.weight"] = torch.randn(5504, 2048, generator=generator)
        tensors[f"{prefix}.mlp.up_proj.weight"] = torch.randn(5504, 2048, generator=generator)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text('{"model_type": "llama"}')
    return directory


def sizes(model: str) -> tuple[int, int]:
    from sve_cli.checkpoint import open_checkpoint

    checkpoint = open_checkpoint(model)
    files = set(checkpoint.files.values())
    largest = max(
        torch.Size(checkpoint.shape(n)).numel() * (8 if checkpoint.dtype(n) == "F64" else 4)
        for n in checkpoint.names
    )
    return sum(f.stat().st_size for f in files), largest


def scaling(scratch: Path, sizes: list[tuple[int, int]]) -> None:
    """Time and cache size of one square/rectangular target against raw SVD, then LLaMA-2-7B."""
    from safetensors.torch import save_file

    print("| matrix | raw svd s | sve s | ratio | cache MB |")
    print("|---|---|---|---|---|")
    seconds = {}
    for out_features, in_features in sizes:
        model = scratch / f"m{out_features}x{in_features}"
        model.mkdir()
        weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0))
        save_file({"layer.weight": weight}, str(model / "model.safetensors"), metadata={"format": "pt"})
        (model / "config.json").write_text('{"model_type": "custom"}')
        raw = run_worker("svd", str(model), scratch / f"raw{out_features}x{in_features}", "*.weight")
        sve = run_worker("sve", str(model), scratch / f"sve{out_features}x{in_features}", "*.weight")
        cache = sum(p.stat().st_size for p in (scratch / f"sve{out_features}x{in_features}").iterdir())
        seconds[(out_features, in_features)] = sve["seconds"]
        print(f"| {out_features}×{in_features} | {raw['seconds']:.2f} | {sve['seconds']:.2f} "
              f"| {sve['seconds'] / raw['seconds']:.2f} | {cache / 1e6:.0f} |", flush=True)
    if (4096, 4096) in seconds and (11008, 4096) in seconds:
        # 32 blocks × (q, k, v, o at 4096² + gate, up at 11008×4096 + down at 4096×11008, same SVD cost)
        estimate = 32 * (4 * seconds[(4096, 4096)] + 3 * seconds[(11008, 4096)])
        cache = 32 * 4 * (4 * 4096 * (4096 + 1 + 4096) + 3 * 4096 * (11008 + 1 + 4096))
        print(f"\nLLaMA-2-7B estimate on this CPU: {estimate / 3600:.1f} h of decomposition, "
              f"{cache / 1e9:.1f} GB float32 cache (224 targets)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "MODEL", "OUT"))
    parser.add_argument("--targets")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=2, help="blocks of the synthetic checkpoint")
    parser.add_argument("--scaling", action="store_true", help="time 512² … 4096² and 11008×4096 instead")
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, args.targets)
        return
    if args.scaling:
        with tempfile.TemporaryDirectory() as scratch:
            scaling(Path(scratch), [(512, 512), (1024, 1024), (2048, 2048), (4096, 4096), (11008, 4096)])
        return

    with tempfile.TemporaryDirectory() as scratch:
        scratch_path = Path(scratch)
        cases = [("MiniLM (builtin:minilm)", "builtin:minilm", None),
                 (f"synthetic LLaMA, {args.blocks} blocks",
                  str(synthetic_llama(scratch_path / "llama", args.blocks)), "*.q_proj.weight,*.k_proj.weight,"
                  "*.gate_proj.weight,*.up_proj.weight")]
        rows = []
        for label, model, targets in cases:
            best = {"sve": None, "svd": None}
            for repeat in range(args.repeats):
                for kind in ("svd", "sve"):
                    measured = run_worker(kind, model, scratch_path / f"out-{kind}-{repeat}-{len(rows)}", targets)
                    if best[kind] is None or measured["seconds"] < best[kind]["seconds"]:
                        best[kind] = measured
            checkpoint_bytes, largest = sizes(model)
            rows.append((label, best["svd"], best["sve"], checkpoint_bytes, largest))

    print(f"decompose benchmark — {date.today()}, {platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")
    header = ("checkpoint", "raw svd s", "sve s", "ratio", "ckpt MB", "largest MB", "svd RSS MB", "sve RSS MB")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for label, svd, sve, checkpoint_bytes, largest in rows:
        print(f"| {label} | {svd['seconds']:.2f} | {sve['seconds']:.2f} | {sve['seconds'] / svd['seconds']:.2f} "
              f"| {checkpoint_bytes / 1e6:.0f} | {largest / 1e6:.0f} | {svd['peak_rss'] / 1e6:.0f} "
              f"| {sve['peak_rss'] / 1e6:.0f} |")


if __name__ == "__main__":
    main()
