"""Benchmark: what computing the shared prefix once saves (`sve_cli.prefix`), M = 4.

For SmolLM2-135M (attention targets, 30 blocks) and MiniLM (all six linear layers, 6 blocks), with the
targets on every block, the upper half and the upper third: one training step (forward + backward,
every member on the same batch) and one evaluation forward, with the blocks below the first target run
once per batch ("shared") and with every block run on all M·B rows ("fanned out", as before). Both modes
are timed in the same process, alternating, best of `--repeats`; the speed-up is their ratio.

    .venv/bin/python benchmarks/shared_prefix.py              # both models (~6 min on 2 cores)
    .venv/bin/python benchmarks/shared_prefix.py --models minilm --repeats 5
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date

import torch

from sve_cli.pipeline import ensemble_for
from sve_cli.recipe import EnsembleConfig

# model -> (builtin, targets on every block / upper half / upper third, letter head?, batch, tokens)
MODELS = {
    "smollm2": ("builtin:smollm2", {"all blocks": "attention", "upper half (15-29)": "attention@15-",
                                    "upper third (20-29)": "attention@20-"}, True, 8, 64),
    "minilm": ("builtin:minilm", {"all blocks": "all", "upper half (3-5)": "all@3-", "upper third (4-5)": "all@4-"},
               False, 16, 40),
}


def timed(step, repeats: int) -> float:
    best = float("inf")
    for attempt in range(repeats + 1):  # the first call warms up
        started = time.perf_counter()
        step()
        if attempt:
            best = min(best, time.perf_counter() - started)
    return best


def measure(model: str, repeats: int) -> list[list[str]]:
    source, targets, letters, batch, tokens = MODELS[model]
    rows = []
    for label, spec in targets.items():
        config = EnsembleConfig(members=4, targets=spec, bias=False, dropout=False, parameterisation="relative")
        head = {"letter_token_ids": [330, 389, 340]} if letters else {"classes": 3}
        ensemble = ensemble_for(source, config, seed=0, **head)
        generator = torch.Generator().manual_seed(0)
        inputs = {"input_ids": torch.randint(100, 20000, (batch, tokens), generator=generator),
                  "attention_mask": torch.ones(batch, tokens, dtype=torch.long)}

        def train_step():
            ensemble.train().zero_grad(set_to_none=True)
            ensemble(**inputs).logsumexp(-1).mean().backward()

        def eval_step():
            with torch.no_grad():
                ensemble.eval()(**inputs)

        times = {}
        for attempt in range(2):  # alternate the modes, so that load on the machine hits both alike
            for enabled in (False, True):
                ensemble.prefix.enabled = enabled
                for name, step in (("train", train_step), ("eval", eval_step)):
                    key = (enabled, name)
                    times[key] = min(times.get(key, float("inf")), timed(step, max(1, repeats // 2)))
        first = ensemble.prefix.first
        rows.append([model, label, f"{first}/{len(first_blocks(ensemble))}",
                     f"{times[(False, 'train')]:.2f}", f"{times[(True, 'train')]:.2f}",
                     f"{times[(False, 'train')] / times[(True, 'train')]:.2f}×",
                     f"{times[(False, 'eval')]:.2f}", f"{times[(True, 'eval')]:.2f}",
                     f"{times[(False, 'eval')] / times[(True, 'eval')]:.2f}×"])
        print(" | ".join(rows[-1]), flush=True)
    return rows


def first_blocks(ensemble) -> torch.nn.ModuleList:
    from sve_cli.architectures import block_list

    return block_list(ensemble.backbone)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    header = ["model", "targets", "shared blocks", "train step fanned (s)", "train step shared (s)", "speed-up",
              "eval forward fanned (s)", "eval forward shared (s)", "speed-up"]
    rows = [row for model in args.models for row in measure(model, args.repeats)]
    print(f"\nM = 4; SmolLM2 8 × 64 tokens, MiniLM 16 × 40 tokens; best of {args.repeats}; {date.today()}, "
          f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
