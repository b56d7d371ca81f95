"""Member-batched decoding against one model's cached decoding, on SmolLM2-135M (CPU).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/generation.py [--members 4] [--prompts 4] [--new-tokens 16]

Times one cached decoding step (after the prompt) of: the plain `transformers` causal LM on B prompts,
and sve's M-member ensemble (`sve_cli.generation`, M·B rows in one forward, a cache per member), with
targets on every block's attention and on the upper third. Target: ensemble step ≤ 1.3 × M × single step.
Ratios are measured in one run (the machine is shared)."""

from __future__ import annotations

import argparse
import statistics
import time
from copy import deepcopy

import torch


def _median_step(step, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=12)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from sve_cli.checkpoint import open_checkpoint, resolve_model
    from sve_cli.ensemble import lm_head_weight
    from sve_cli.generation import MemberDecoder, left_padded, positions
    from sve_cli.pipeline import ensemble_for
    from sve_cli.recipe import EnsembleConfig

    path = str(resolve_model("builtin:smollm2"))
    checkpoint = open_checkpoint(path)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 40000, (args.prompt_tokens,), generator=generator).tolist()
               for _ in range(args.prompts)]
    ids, mask = left_padded(prompts, pad=0)
    rows = args.members * args.prompts

    single = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        cache = single(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
        token = torch.full((args.prompts, 1), 42)
        grown = torch.cat([mask, torch.ones_like(token)], dim=1)

        def single_step():  # a fresh copy of the prompt's cache each time (its copy time is subtracted)
            single(input_ids=token, attention_mask=grown, past_key_values=deepcopy(cache), use_cache=True)

        copy_only = _median_step(lambda: deepcopy(cache), args.repeats)
        single_time = _median_step(single_step, args.repeats) - copy_only
    print(f"SmolLM2-135M, {args.prompts} prompts of {args.prompt_tokens} tokens, one cached step "
          f"(median of {args.repeats}; {torch.get_num_threads()} threads)\n")
    print("| model | rows | step (ms) | ÷ single | ÷ (M × single) |")
    print("|---|---|---|---|---|")
    print(f"| single (transformers) | {args.prompts} | {1000 * single_time:.1f} | 1.00 | — |")
    for label, targets in (("attention", "attention"), ("attention@20-", "attention@20-")):
        config = EnsembleConfig(members=args.members, targets=targets, parameterisation="relative")
        ensemble = ensemble_for(path, config, classes=2, seed=0).eval()
        decoder = MemberDecoder(ensemble, lm_head_weight(checkpoint), checkpoint.config)
        with torch.no_grad():
            member_mask = mask.repeat(args.members, 1)
            place = positions(member_mask)
            _, member_cache = decoder.logits(ids.repeat(args.members, 1), member_mask, place, None)
            following = torch.full((rows, 1), 42)
            member_grown = torch.cat([member_mask, torch.ones_like(following)], dim=1)

            def member_step():
                decoder.logits(following, member_grown, place[:, -1:] + 1, deepcopy(member_cache))

            copy_only = _median_step(lambda: deepcopy(member_cache), args.repeats)
            member_time = _median_step(member_step, args.repeats) - copy_only
        print(f"| sve M={args.members}, targets {label} | {rows} | {1000 * member_time:.1f} | "
              f"{member_time / single_time:.2f} | {member_time / (args.members * single_time):.2f} |")


if __name__ == "__main__":
    main()
