"""Benchmark: forward + backward time of one SVELinear under each strategy.

Strategies: `factored`, `materialised`, `auto` (the per-call choice of sve_cli.layer), and the
reference approach that rebuilds every member's full `W_m = U @ diag(s_m) @ Vh` on every call, one
member at a time, then applies `F.linear`. Targets (issue 3): auto within 10% of the better
strategy on every cell; factored ≥ 5× faster than the reference at 2048², 256 tokens/member.
Then the trainable-parameter share of SVE for LLaMA-2-7B shapes (no weights needed).

    .venv/bin/python benchmarks/layer_strategies.py            # the full grid (~20 min on 2 cores)
    .venv/bin/python benchmarks/layer_strategies.py --quick    # 384² and 2048² only
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date

import torch
import torch.nn.functional as F

from sve_cli.layer import SVELinear

SHAPES = [(384, 384), (1536, 384), (2048, 2048), (5504, 2048)]
TOKENS = [64, 256, 1024, 4096]
MEMBERS = [4, 8]


def reference_forward(layer: SVELinear, x: torch.Tensor) -> torch.Tensor:
    """Rebuild each member's dense weight on every call, one member at a time."""
    rows = x.reshape(layer.members, -1, layer.in_features)  # [M, N, in]
    outputs = []
    for member in range(layer.members):
        weight = layer.U @ torch.diag(F.relu(layer.sigma[member])) @ layer.Vh  # [out, in]
        outputs.append(F.linear(rows[member], weight, layer.bias[member]))  # [N, out]
    return torch.stack(outputs)


def time_call(layer: SVELinear, x: torch.Tensor, strategy: str, repeats: int) -> float:
    layer.strategy = "auto" if strategy == "reference" else strategy
    forward = (lambda: reference_forward(layer, x)) if strategy == "reference" else (lambda: layer(x))
    best = float("inf")
    for attempt in range(repeats + 1):  # the first call warms up
        layer.zero_grad(set_to_none=True)
        started = time.perf_counter()
        forward().square().mean().backward()
        elapsed = time.perf_counter() - started
        if attempt:
            best = min(best, elapsed)
    return best


def llama_7b_share() -> list[tuple[int, float, float]]:
    """(M, sigma-only %, sigma+bias %) of LLaMA-2-7B's 6.74B parameters."""
    layers, hidden, intermediate, total = 32, 4096, 11008, 6_738_415_616
    shapes = [(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate)]
    sigma = layers * sum(min(shape) for shape in shapes)
    bias = layers * sum(out for out, _ in shapes)
    return [(m, 100 * m * sigma / total, 100 * m * (sigma + bias) / total) for m in (4, 8, 16)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only 384² and 2048²")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    shapes = [(384, 384), (2048, 2048)] if args.quick else SHAPES

    print(f"layer strategies — {date.today()}, {platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, fp32, forward+backward, best of {args.repeats} (ms)")
    print("| out×in | M | tokens/member | factored | materialised | auto (picks) | auto / best | reference | reference / factored |")
    print("|---|---|---|---|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    for out_features, in_features in shapes:
        U, S, Vh = torch.linalg.svd(torch.randn(out_features, in_features, generator=generator), full_matrices=False)
        for members in MEMBERS:
            layer = SVELinear(U, S, Vh, members, generator=generator).train()
            for tokens in TOKENS:
                x = torch.randn(members * tokens, in_features, generator=generator)
                times = {s: 1000 * time_call(layer, x, s, args.repeats)
                         for s in ("factored", "materialised", "auto", "reference")}
                layer.strategy = "auto"
                picked = layer.choose(tokens)
                best = min(times["factored"], times["materialised"])
                print(f"| {out_features}×{in_features} | {members} | {tokens} | {times['factored']:.1f} "
                      f"| {times['materialised']:.1f} | {times['auto']:.1f} ({picked[:4]}) "
                      f"| {times['auto'] / best:.2f} | {times['reference']:.1f} "
                      f"| {times['reference'] / times['factored']:.1f}× |", flush=True)

    print("\ntrainable share of LLaMA-2-7B (6.74B parameters), all 7 projections of 32 blocks targeted")
    print("| M | sigma only (bias: false) | sigma + bias |")
    print("|---|---|---|")
    for members, sigma_only, with_bias in llama_7b_share():
        print(f"| {members} | {sigma_only:.3f}% | {with_bias:.3f}% |")


if __name__ == "__main__":
    main()
