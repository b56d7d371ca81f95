"""From `sve train --dry-run` to the first step on a LLaMA-2-7B-shaped checkpoint: time and bytes hashed.

A random checkpoint with LLaMA-2-7B's shapes (hidden 4096, MLP 11008, vocab 32000) but `--blocks` blocks
is saved in fp16 (as the real one is); then, in this process, with the decomposition cache already made:
the dry run, building the ensemble (targets matched to modules by fingerprint, factors read and their
checksums verified), and one training step (M = 4, one sequence of 64 tokens). Every call of
`tensor_fingerprint` is counted with the bytes it hashed, so the passes over the weights are plain to
see; blocks scale linearly, so the 32-block figures are extrapolated.

    .venv/bin/python benchmarks/startup.py --blocks 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import date
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=2)
    args = parser.parse_args()
    import sve_cli.checkpoint
    import sve_cli.decompose
    import sve_cli.ensemble
    import sve_cli.factors
    from transformers import LlamaConfig, LlamaForCausalLM

    hashed = {"calls": 0, "bytes": 0}
    original = sve_cli.checkpoint.tensor_fingerprint

    def counted(tensor: torch.Tensor) -> str:
        hashed["calls"] += 1
        hashed["bytes"] += tensor.numel() * tensor.element_size()
        return original(tensor)

    for module in (sve_cli.checkpoint, sve_cli.decompose, sve_cli.ensemble, sve_cli.factors):
        module.tensor_fingerprint = counted
    root = Path(tempfile.mkdtemp())
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.blocks,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.float16)
    model.save_pretrained(root / "llama")
    (root / "llama" / "tokenizer.json").write_text("{}")  # not read: the first step feeds token ids
    del model
    recipe_path = root / "recipe.yaml"
    recipe_path.write_text(json.dumps({
        "model": {"path": str(root / "llama"), "decomposition": str(root / "cache")},
        "task": {"type": "multiple_choice", "dataset": "x", "letters": ["A", "B", "C", "D"], "max_length": 64},
        "ensemble": {"method": "sve", "members": 4}, "train": {"batch_size": 1}}))
    from sve_cli.decompose import decompose, plan_decomposition
    from sve_cli.pipeline import ensemble_for
    from sve_cli.memory import estimate_memory
    from sve_cli.recipe import EnsembleConfig, load_recipe

    weights = sum(p.stat().st_size for p in (root / "llama").glob("*.safetensors"))
    decompose(plan_decomposition(str(root / "llama")), root / "cache")
    rows = []
    for phase in ("dry run", "build (cache made)", "first step"):
        hashed.update(calls=0, bytes=0)
        started = time.perf_counter()
        if phase == "dry run":
            estimate_memory(load_recipe(recipe_path), 4, "cpu")
        elif phase.startswith("build"):
            ensemble = ensemble_for(str(root / "llama"), EnsembleConfig(members=4), letter_token_ids=[1, 2, 3, 4],
                                      decomposition=root / "cache")
        else:
            logits = ensemble(input_ids=torch.randint(0, 32000, (1, 64)), attention_mask=torch.ones(1, 64, dtype=torch.long))
            logits.logsumexp(-1).mean().backward()
        rows.append((phase, time.perf_counter() - started, hashed["calls"], hashed["bytes"]))
    scale = 32 / args.blocks
    print(f"{date.today()}, {args.blocks} LLaMA-2-7B-shaped blocks ({weights / 1e9:.2f} GB fp16 checkpoint), "
          f"{torch.get_num_threads()} threads; 32-block figures extrapolated ×{scale:g}\n")
    print("| phase | seconds | tensors hashed | GB hashed | GB hashed at 32 blocks |")
    print("|---|---|---|---|---|")
    for phase, seconds, calls, nbytes in rows:
        print(f"| {phase} | {seconds:.1f} | {calls} | {nbytes / 1e9:.2f} | {nbytes * scale / 1e9:.1f} |")


if __name__ == "__main__":
    main()
