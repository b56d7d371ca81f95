"""The paper's LLM setting on one GPU: decomposition speed and accuracy, training memory and speed.

Random LLaMA-2-7B-shaped checkpoints of a few blocks are built on the spot (no weights travel),
then this prints four tables:

1. SVD methods on the 7B shapes: time, relative reconstruction error, orthogonality;
2. `decompose` of N blocks into a cache, extrapolated to all 224 targets of 32 blocks;
3. a few training steps of recipes/arc_easy.yaml's configuration (M=16, batch 8 × accumulation 2,
   length 256, bf16) with and without the memory options, and a deep ensemble of the same M:
   peak memory, tokens/s, and the dry-run's estimate of each;
4. the dry-run of the full 32-block recipe, on a checkpoint whose weights are never written
   (a sparse file: only the header is real), against the GPU's memory.

    python benchmarks/llm_memory.py --out results.json            # a GPU: the paper's shapes
    python benchmarks/llm_memory.py --small                       # CPU: scaled-down shapes, to try it

Random Gaussian weights are better conditioned than trained ones; the decomposition checks every
target's error against its tolerance either way.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
            "vocab_size": 32000, "blocks": 32}
SMALL = {"hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 8, "num_key_value_heads": 8,
         "vocab_size": 2000, "blocks": 32}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def llama_config(dims: dict, blocks: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=dims["hidden_size"], intermediate_size=dims["intermediate_size"],
                       num_attention_heads=dims["num_attention_heads"], num_key_value_heads=dims["num_key_value_heads"],
                       vocab_size=dims["vocab_size"], num_hidden_layers=blocks, max_position_embeddings=4096,
                       tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tokenizer_for(vocab_size: int):
    """A word-level tokenizer whose vocabulary fills the model's: words w3…, letters A–E, specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "A", "B", "C", "D", "E", ")", "Answer", ":", "Question"]
    vocab = {word: i for i, word in enumerate(words)}
    vocab.update({f"w{i}": i for i in range(len(words), vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def build_checkpoint(directory: Path, dims: dict, blocks: int, sparse: bool = False) -> Path:
    """A LLaMA checkpoint (bf16, as LLaMA-2 ships fp16) of random N(0, 0.02²) weights, made on the GPU
    when there is one; `sparse` writes only the header (for dry-runs of the full model)."""
    from transformers import LlamaForCausalLM

    from sve_cli.writing import ShardWriter, _header, plan_shards

    config = llama_config(dims, blocks)
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in LlamaForCausalLM(config).state_dict().items()}
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    tokenizer_for(dims["vocab_size"]).save_pretrained(directory)
    if sparse:
        layout = [(name, torch.bfloat16, shape) for name, shape in sorted(shapes.items())]
        header = _header(layout, {"format": "pt"})
        with open(directory / "model.safetensors", "wb") as handle:
            handle.write(header)
            handle.truncate(len(header) + sum(2 * math.prod(shape) for shape in shapes.values()))
        return directory
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device=device).manual_seed(0)
    names = sorted(shapes)
    sizes = [(name, 2 * math.prod(shapes[name])) for name in names]
    with ShardWriter(directory) as writer:
        for shard in plan_shards(sizes, 5_000_000_000, "model", single_name="model.safetensors"):
            writer.begin(shard.filename, [(n, torch.bfloat16, shapes[n]) for n in shard.names], {})
            for name in shard.names:
                if name.endswith("norm.weight"):
                    tensor = torch.ones(shapes[name], dtype=torch.bfloat16)
                else:
                    tensor = (0.02 * torch.randn(shapes[name], generator=generator, device=device)).to(torch.bfloat16)
                writer.add(name, tensor.cpu())
            writer.commit()
    return directory


def svd_table(dims: dict) -> list[dict]:
    from sve_cli.decompose import ErrorProbes, _thin_svd, svd_factors

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    h, i = dims["hidden_size"], dims["intermediate_size"]
    rows = []
    for shape in ((h, h), (i, h), (h, i)):
        weight = 0.02 * torch.randn(shape, generator=torch.Generator().manual_seed(1))
        matrix = weight.to(device)
        methods = {"torch default (fp32)": lambda: torch.linalg.svd(matrix, full_matrices=False),
                   "svd (fp32)": lambda: _thin_svd(matrix, "svd"),
                   "svd64": lambda: _thin_svd(matrix, "svd64"),
                   "gram64": lambda: _thin_svd(matrix, "gram64"),
                   "sve chain": lambda: svd_factors(weight, torch.float32, device)[:3]}
        for name, method in methods.items():
            method()  # warm-up (cuSOLVER handles, workspace)
            sync()
            started = time.perf_counter()
            U, S, Vh = method()
            sync()
            seconds = time.perf_counter() - started
            U, S, Vh = (f.to(device=device, dtype=torch.float32) for f in (U, S, Vh))
            exact = float(((U * S) @ Vh - matrix).norm() / matrix.norm())
            orthogonality = ErrorProbes(matrix, U.dtype).errors(U, S, Vh)[1]
            rows.append({"shape": f"{shape[0]}×{shape[1]}", "method": name, "seconds": seconds, "error": exact,
                         "orthogonality": orthogonality})
            print(f"svd {rows[-1]}", flush=True)
    return rows


def decompose_table(root: Path, dims: dict, blocks: int) -> dict:
    from sve_cli.decompose import decompose, plan_decomposition

    checkpoint = build_checkpoint(root / f"decompose-{blocks}", dims, blocks)
    plan = plan_decomposition(str(checkpoint))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync()
    started = time.perf_counter()
    result = decompose(plan, root / f"cache-decompose-{blocks}", device=device)
    seconds = time.perf_counter() - started
    targets = len(plan.targets)
    per_block = seconds / blocks
    row = {"blocks": blocks, "targets": targets, "seconds": seconds, "cache_bytes": plan.total_size,
           "max_error": max(t["rel_error"] for t in result.manifest["targets"]),
           "extrapolated_224_targets_s": per_block * dims["blocks"],
           "extrapolated_cache_bytes": plan.total_size / blocks * dims["blocks"]}
    print(f"decompose {row}", flush=True)
    return row


def arc_items(path: Path, count: int, length: int, seed: int = 0) -> Path:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for index in range(count):
        words = " ".join(f"w{int(w)}" for w in torch.randint(20, 1900, (length,), generator=generator))
        rows.append({"question": words, "choices": {"text": ["w20", "w21", "w22", "w23"], "label": list("ABCD")},
                     "answerKey": "ABCD"[index % 4]})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def train_row(root: Path, name: str, dims: dict, blocks: int, overrides: list[str], steps: int,
              checkpoints: dict) -> dict:
    from sve_cli.decompose import decompose, plan_decomposition
    from sve_cli.memory import estimate_memory
    from sve_cli.recipe import load_recipe
    from sve_cli.train import train

    if blocks not in checkpoints:
        path = build_checkpoint(root / f"train-{blocks}", dims, blocks)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        decompose(plan_decomposition(str(path)), root / f"cache-train-{blocks}", device=device)
        checkpoints[blocks] = path
    recipe = load_recipe(REPO / "recipes" / "arc_easy.yaml", [
        f"model.path={checkpoints[blocks]}", f"model.decomposition={root / f'cache-train-{blocks}'}",
        f"task.dataset={root / 'arc.jsonl'}", "task.config=null", f"train.max_steps={steps}",
        f"train.eval_every_steps={steps}", "task.max_eval_examples=16", "eval.batch_size=8", *overrides])
    rows_per_step = recipe.train.batch_size * recipe.train.gradient_accumulation
    times = []
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        train(recipe, root / f"run-{name}-{blocks}", overwrite=True, on_step=lambda info: times.append(time.perf_counter()))
        error = None
    except torch.OutOfMemoryError as oom:
        error = f"out of memory: {str(oom).splitlines()[0][:120]}"
    peak = torch.cuda.max_memory_allocated() if cuda else None
    capacity = torch.cuda.get_device_properties(0).total_memory if cuda else None
    estimate = estimate_memory(recipe, 4, "cuda" if cuda else "cpu", capacity, suggest=False)
    steps_timed = len(times) - 1
    tokens_per_second = (steps_timed * rows_per_step * recipe.task.max_length / (times[-1] - times[0])
                         if steps_timed > 0 else None)
    estimated_peak = estimate.training_bytes - estimate.runtime_bytes  # the allocator does not see the context
    row = {"variant": name, "blocks": blocks, "overrides": overrides, "peak_bytes": peak, "tokens_per_second": tokens_per_second,
           "estimated_bytes": estimated_peak, "error": error}
    print(f"train {row}", flush=True)
    return row


def step_row(root: Path, name: str, dims: dict, overrides: list[str], steps: int, checkpoints: dict) -> dict:
    """Time the optimizer steps of one method on the 1-block checkpoint, outside `sve train` (a deep
    ensemble's checkpoint would be 3 × its 13 GB of weights: writing it is not what is compared)."""
    from sve_cli.pipeline import Pipeline
    from sve_cli.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes" / "arc_easy.yaml", [
        f"model.path={checkpoints[1]}", f"model.decomposition={root / 'cache-train-1'}",
        f"task.dataset={root / 'arc.jsonl'}", "task.config=null", *overrides])
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    row = {"variant": name, "blocks": 1, "overrides": overrides}
    try:
        model = Pipeline(recipe).build_model(list("ABCD"))
        if cuda:
            model.use_low_precision(torch.bfloat16)
        model.to(device).train()
        optimizer = torch.optim.AdamW(model.trainable_parameters().values(), lr=1e-5)
        length, rows = recipe.task.max_length, recipe.train.batch_size
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(20, dims["vocab_size"], (rows, length), generator=generator).to(device)
        labels = torch.randint(0, 4, (rows,), generator=generator).to(device)
        marks = []
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            for _ in range(recipe.train.gradient_accumulation):
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids))  # [b, M, C]
                loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, 4),
                                                         labels.repeat_interleave(logits.shape[1]))
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.trainable_parameters().values(), 1.0)
            optimizer.step()
            sync()
            marks.append(time.perf_counter())
        tokens = rows * recipe.train.gradient_accumulation * length * (steps - 1)
        row.update(tokens_per_second=tokens / (marks[-1] - marks[0]), error=None,
                   trainable=sum(p.numel() for p in model.trainable_parameters().values()))
        del model, optimizer
    except torch.OutOfMemoryError as oom:
        row.update(tokens_per_second=None, error=f"out of memory: {str(oom).splitlines()[0][:120]}")
    row["peak_bytes"] = torch.cuda.max_memory_allocated() if cuda else None
    print(f"step {row}", flush=True)
    return row


def full_dry_run(root: Path, dims: dict, overrides: list[str]) -> dict:
    from sve_cli.memory import estimate_memory
    from sve_cli.recipe import load_recipe

    checkpoint = build_checkpoint(root / "full-sparse", dims, dims["blocks"], sparse=True)
    recipe = load_recipe(REPO / "recipes" / "arc_easy.yaml", [f"model.path={checkpoint}",
                                                              f"task.dataset={root / 'arc.jsonl'}", *overrides])
    capacity = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 80 * 2**30
    estimate = estimate_memory(recipe, 4, "cuda", capacity)
    row = {"overrides": overrides, "peak_bytes": estimate.peak_bytes, "capacity": capacity, "fits": estimate.fits,
           "factor_bytes": estimate.factor_bytes, "frozen_bytes": estimate.frozen_weight_bytes,
           "activation_bytes": estimate.activation_bytes, "suggestions": estimate.suggestions}
    print(f"full {row}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="scaled-down shapes (CPU check of the script)")
    parser.add_argument("--decompose-blocks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--parts", nargs="+", default=["full", "train", "decompose", "svd", "deep"])
    parser.add_argument("--out", type=Path, default=None, help="also write every number as JSON here")
    args = parser.parse_args()
    dims = SMALL if args.small else LLAMA_7B
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = Path(tempfile.mkdtemp(prefix="sve-llm-"))
    os.environ["SVE_HOME"] = str(root / "home")
    small = ["ensemble.members=4", "train.batch_size=4", "task.max_length=64"] if args.small else []
    arc_items(root / "arc.jsonl", 48, 64 if args.small else 256)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.machine()})"
    results: dict = {"device": device, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "dims": dims}

    def save() -> None:
        if args.out:
            args.out.write_text(json.dumps(results, indent=2))

    checkpoints: dict = {}
    options = {"plain": [], "checkpointing": ["train.gradient_checkpointing=true"],
               "4 members per pass": ["train.members_per_pass=4" if not args.small else "train.members_per_pass=1"],
               "both": ["train.gradient_checkpointing=true",
                        "train.members_per_pass=4" if not args.small else "train.members_per_pass=1"]}
    if "full" in args.parts:
        results["full"] = [full_dry_run(root, dims, small + options[name]) for name in ("plain", "both")]
        save()
    if "train" in args.parts:
        results["train"] = []
        for name, blocks in (("plain", 1), ("plain", 2), ("both", 1), ("both", 2), ("checkpointing", 2),
                             ("4 members per pass", 2)):
            results["train"].append(train_row(root, name, dims, blocks, small + options[name], args.steps, checkpoints))
            save()
    if "decompose" in args.parts:
        results["decompose"] = decompose_table(root, dims, args.decompose_blocks)
        save()
    if "svd" in args.parts:
        results["svd"] = svd_table(dims)
        save()
    if "deep" in args.parts:
        if 1 not in checkpoints:
            train_row(root, "plain", dims, 1, small, 1, checkpoints)
        results["steps"] = [step_row(root, name, dims, small + extra, args.steps + 1, checkpoints)
                            for name, extra in (("sve", []), ("deep ensemble", ["ensemble.method=deep_ensemble"]))]
        save()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
