"""Prediction throughput: SVE (M=4) on MiniLM against the plain model it was built from.

The plain model is what a single fine-tuned MiniLM classifier costs at inference: transformers'
BertModel, mean pooling and a linear head (what a sentence-transformers export runs). SVE runs its
M members batched in one pass, with its eval weight cache (`auto`: each member's W_m is built once
and reused until sigma changes), without it (rebuilt every call), and on the factored path. Same
inputs (real tweets, tokenised once), same batch size, best of `--repeats`, one process.

    .venv/bin/python benchmarks/predict_speed.py --examples 512 --batch-size 64

Target (issue 15): SVE's cost per example at most 1.1 × M × the plain model's.
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date

import torch


def best_time(function, repeats: int) -> float:
    function()  # warm-up (and the weight cache's first build)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from transformers import AutoModel, AutoTokenizer

    from sve_cli.checkpoint import resolve_model
    from sve_cli.data import load_source
    from sve_cli.pipeline import ensemble_for
    from sve_cli.layer import SVELinear
    from sve_cli.recipe import EnsembleConfig

    path = resolve_model("builtin:minilm")
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = load_source("builtin:tweets").frame["text"].tolist()[: args.examples]
    batches = [dict(tokenizer(texts[i:i + args.batch_size], padding=True, truncation=True,
                              max_length=args.max_length, return_tensors="pt"))
               for i in range(0, len(texts), args.batch_size)]
    plain = AutoModel.from_pretrained(path).eval()
    head = torch.nn.Linear(plain.config.hidden_size, 3)

    @torch.no_grad()
    def run_plain() -> None:
        for batch in batches:
            hidden = plain(**batch).last_hidden_state  # [B, T, d]
            mask = batch["attention_mask"][..., None].float()
            head((hidden * mask).sum(1) / mask.sum(1))

    rows = [("plain MiniLM (1 model)", best_time(run_plain, args.repeats), None)]
    for name, strategy, cache in (("SVE auto, weight cache on", "auto", True),
                                  ("SVE auto, weight cache off", "auto", False),
                                  ("SVE factored", "factored", True)):
        ensemble = ensemble_for("builtin:minilm", EnsembleConfig(members=args.members, strategy=strategy),
                                  classes=3).eval()
        for layer in ensemble.layers.values():
            if isinstance(layer, SVELinear):
                layer.cache_weights = cache

        @torch.no_grad()
        def run_sve() -> None:
            for batch in batches:
                ensemble(**batch)

        rows.append((name, best_time(run_sve, args.repeats), args.members))
    single = rows[0][1]
    print(f"{date.today()}, {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{len(texts)} tweets, batch {args.batch_size}, max length {args.max_length}, best of {args.repeats}\n")
    print("| model | examples/s | cost / plain | cost / (M × plain) |")
    print("|---|---|---|---|")
    for name, seconds, members in rows:
        ratio = seconds / single
        print(f"| {name} | {len(texts) / seconds:.0f} | {ratio:.2f} | "
              f"{ratio / members:.2f} |" if members else f"| {name} | {len(texts) / seconds:.0f} | 1.00 | — |")


if __name__ == "__main__":
    main()
