"""One interface per method: what each of sve's methods trains, how its member layers are built and what
they cost. Recipe validation, ensemble building, the memory plan and the export read this table; adding a
method (MC dropout, say) is one `Method` here, its member layer (sve_cli/baselines.py), and its tests.
Torch-free at import: the recipe reads it at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    one_model: bool = False  # M = 1 by definition
    decomposed: bool = False  # trains singular values of the decomposition (SVELinear, sve_cli/layer.py)
    dense: bool = False  # members own full copies of the targeted weights (with single_mode: full)
    adapter: bool = False  # members own rank-r LoRA adapters on the frozen weights
    jittered: bool = False  # members' copies of pretrained tensors start at W ⊙ (1 + ε), ε ~ N(0, σ_init²)

    def trains_targets(self, config) -> bool:
        """False for a dense method that trains its heads only (`single_mode: head`)."""
        return self.decomposed or self.adapter or (self.dense and config.single_mode == "full")

    def values_per_target(self, target, outputs: int, has_bias: bool, config) -> int:
        """Trainable values one member owns for one target `W [out, in]` (`outputs`: the length of its bias)."""
        if self.decomposed:
            return target.k + (outputs if config.bias or has_bias else 0)
        if self.adapter:
            return config.lora_rank * (target.in_features + target.out_features)
        return target.out_features * target.in_features + (outputs if has_bias else 0)

    def member_layer(self, weight, bias, config, generator):
        """The member-batched layer that replaces a target `weight [out, in]` (undecomposed methods)."""
        from sve_cli.baselines import DenseMembersLinear, LoRAMembersLinear

        if self.adapter:
            return LoRAMembersLinear(weight, bias, config.members, config.lora_rank, config.lora_alpha, generator)
        return DenseMembersLinear(weight, bias, config.members, config.copy_jitter, generator)


METHODS: dict[str, Method] = {method.name: method for method in (
    Method("sve", "M members, each with its own singular values, biases and head on shared frozen singular vectors",
           decomposed=True),
    Method("svf", "one model that fine-tunes the singular values (SVE with M = 1)", one_model=True, decomposed=True),
    Method("single", "one model that fine-tunes the targeted weights (single_mode: head, its head only)",
           one_model=True, dense=True),
    Method("deep_ensemble", "M full copies of the targeted weights, trained together as independent models",
           dense=True, jittered=True),
    Method("lora_ensemble", "M rank-r LoRA adapters on the frozen targeted weights", adapter=True),
)}
