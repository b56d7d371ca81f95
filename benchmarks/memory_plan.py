"""Per-rank memory plans of the paper's LLM setting at 7B, 13B and 70B on 1, 2, 4 and 8 GPUs (docs/performance.md table).

The estimate `sve train --dry-run --nproc N` prints (sve_cli/memory.py), from the shipped config.json of
each model (no network, nothing built): recipes/arc_easy.yaml's settings (M = 16, batch 8, 256 tokens,
bf16, gradient checkpointing) with 4 members per pass, one rank per GPU, FSDP for N > 1.

    .venv/bin/python benchmarks/memory_plan.py [--memory 80GB]
"""

from __future__ import annotations

import argparse
from datetime import date

from sve_cli.memory import estimate_memory
from sve_cli.recipe import load_recipe
from sve_cli.writing import parse_size

MODELS = ("llama-2-7b", "llama-2-13b", "llama-2-70b")
RANKS = (1, 2, 4, 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", default="80GB")
    args = parser.parse_args()
    capacity = parse_size(args.memory)
    print(f"{date.today()}: estimated peak per GPU ({args.memory} each; ✓ fits with 10% headroom)\n")
    print("| model | trainable | " + " | ".join(f"{n} GPU{'s' if n > 1 else ''}" for n in RANKS) + " |")
    print("|---|---|" + "---|" * len(RANKS))
    for model in MODELS:
        recipe = load_recipe("recipes/arc_easy.yaml", [f"model.path={model}", "train.members_per_pass=4",
                                                      "train.parallelism=fsdp"])
        cells = []
        for ranks in RANKS:
            estimate = estimate_memory(recipe, 5, "cuda", capacity, ranks, suggest=False)
            cells.append(f"{estimate.peak_bytes / 1e9:.1f} GB {'✓' if estimate.fits else '✗'}")
        share = 100 * estimate.trainable_parameters / estimate.base_parameters
        print(f"| {model} | {share:.3f}% | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
