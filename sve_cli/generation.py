"""Generated text from all M members at once: one batched forward per new token, a KV cache per member.

SVE members differ only in their singular values, so the backbone runs on `M·B` rows, member-major, as
`SVEModel` lays them out; the transformers cache of those rows is each member's own cache. The next
token comes from the members' mean distribution (`mixture`) — or, with `own=True`, each member follows
its own greedy choice (its own answer). Per generated token the scores of Malinin & Gales (2021):

- `log_likelihood`: log p̄(token), p̄ the members' mean distribution;
- `total_entropy`: H[p̄]; `expected_entropy`: the mean of the members' entropies (aleatoric);
- `mutual_information`: their difference (epistemic: how much the members disagree).

The LM head is the checkpoint's own, shared and frozen. Prompts are left-padded, with positions counted
from each prompt's first real token, as `transformers`' `generate` does.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import torch

from sve_cli.architectures import check_generation
from sve_cli.ensemble import SVEModel
from sve_cli.errors import SveError
from sve_cli.heads import lm_logits


@dataclass
class Decoded:
    """One sequence: its new tokens and, per token, the scores (see the module docstring)."""

    tokens: list[int] = field(default_factory=list)
    log_likelihood: list[float] = field(default_factory=list)
    total_entropy: list[float] = field(default_factory=list)
    expected_entropy: list[float] = field(default_factory=list)
    mutual_information: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        """Sequence scores: total and per-token log-likelihood, mean and max token entropy, mean MI."""
        count = len(self.tokens)
        if count == 0:
            return {"log_likelihood": 0.0, "log_likelihood_per_token": 0.0, "total_entropy_mean": 0.0,
                    "total_entropy_max": 0.0, "expected_entropy_mean": 0.0, "mutual_information_mean": 0.0}
        return {"log_likelihood": sum(self.log_likelihood),
                "log_likelihood_per_token": sum(self.log_likelihood) / count,
                "total_entropy_mean": sum(self.total_entropy) / count, "total_entropy_max": max(self.total_entropy),
                "expected_entropy_mean": sum(self.expected_entropy) / count,
                "mutual_information_mean": sum(self.mutual_information) / count}


def token_scores(member_log_probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """From the members' log-probabilities `[M, B, V]`: the mixture's log-probabilities `[B, V]` and the
    entropies `[B]` (total, expected) and their difference, the mutual information `[B]`."""
    members = member_log_probs.shape[0]
    mixture = member_log_probs.logsumexp(0) - math.log(members)  # [B, V]
    total = -(mixture.exp() * mixture).sum(-1)  # [B]
    expected = -(member_log_probs.exp() * member_log_probs).sum(-1).mean(0)  # [B]
    return {"mixture": mixture, "total_entropy": total, "expected_entropy": expected,
            "mutual_information": (total - expected).clamp_min(0)}


class MemberDecoder:
    """The members' next-token logits from an `SVEModel`'s backbone and the checkpoint's LM head."""

    def __init__(self, model: SVEModel, lm_head: torch.Tensor, config: dict):
        self.model = model
        self.lm_head = lm_head  # [V, d], shared and frozen
        self.softcap = config.get("final_logit_softcapping")  # Gemma 2
        self.scale = config.get("logit_scale")  # Cohere
        parameters = inspect.signature(model.backbone.forward).parameters  # transformers 5.2x renamed the cache
        self._cache_key = "cache" if "cache" in parameters else "past_key_values"

    @property
    def members(self) -> int:
        return len(self.model.active)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
               cache=None) -> tuple[torch.Tensor, object]:
        """Inputs `[M·B, t]` member-major (the mask `[M·B, past + t]`) -> last-position logits `[M, B, V]`
        and the updated cache."""
        if self.model.prefix is not None:
            self.model.prefix.set(None, self.members)  # member-major rows: every block runs on them
        device = self.lm_head.device  # the model's (the cache stays there); the logits come back to the CPU
        outputs = self.model.backbone(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                      position_ids=position_ids.to(device), use_cache=True, **{self._cache_key: cache})
        hidden = outputs.last_hidden_state[:, -1]  # [M·B, d]
        logits = lm_logits(hidden, self.lm_head, self.scale, self.softcap).cpu()  # [M·B, V]
        return logits.view(self.members, -1, logits.shape[-1]), getattr(outputs, self._cache_key)  # [M, B, V]


def left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`[B, T]` token ids and attention mask, each prompt at the right end."""
    width = max(len(prompt) for prompt in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Each token's position counted from its row's first real token (padding at 0)."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


@torch.no_grad()
def decode(decoder: MemberDecoder, prompts: list[list[int]], max_new_tokens: int, eos: set[int], pad: int,
           sample: bool = False, generator: torch.Generator | None = None, own: bool = False) -> list[list[Decoded]]:
    """Decode every prompt with all members at once. Returns `[B][1]` sequences from the mixture, or with
    `own=True` `[B][M]`: each member's own greedy answer, scored by that member alone. A sequence ends
    with its end-of-sequence token (kept, and scored: ending is part of the answer) or at `max_new_tokens`."""
    members, rows = decoder.members, len(prompts)
    ids, mask = left_padded(prompts, pad)
    mask_rows = mask.repeat(members, 1)  # [M·B, T]
    place = positions(mask_rows)
    logits, cache = decoder.logits(ids.repeat(members, 1), mask_rows, place, None)
    place = place[:, -1:]  # [M·B, 1]
    paths = members if own else 1
    results = [[Decoded() for _ in range(paths)] for _ in range(rows)]
    finished = torch.zeros(paths, rows, dtype=torch.bool)
    eos_ids = torch.tensor(sorted(eos), dtype=torch.long)
    for _ in range(max_new_tokens):
        log_probs = logits.double().log_softmax(-1)  # [M, B, V]
        if own:
            tokens = log_probs.argmax(-1)  # [M, B]: each member's own choice
            scored = [token_scores(log_probs[m:m + 1]) for m in range(members)]
        else:
            scored = [token_scores(log_probs)]
            mixture = scored[0]["mixture"]
            chosen = (torch.multinomial(mixture.exp(), 1, generator=generator)[:, 0] if sample
                      else mixture.argmax(-1))  # [B]
            tokens = chosen[None]  # [1, B]
        for path in range(paths):
            for row in range(rows):
                if finished[path, row]:
                    continue
                token, scores, record = int(tokens[path, row]), scored[path], results[row][path]
                record.tokens.append(token)
                record.log_likelihood.append(float(scores["mixture"][row, token]))
                for key in ("total_entropy", "expected_entropy", "mutual_information"):
                    getattr(record, key).append(float(scores[key][row]))
        finished |= torch.isin(tokens, eos_ids)
        if bool(finished.all()):
            break
        following = tokens.expand(members, rows).reshape(-1, 1)  # [M·B, 1]
        mask_rows = torch.cat([mask_rows, torch.ones_like(following)], dim=1)
        place = place + 1
        logits, cache = decoder.logits(following, mask_rows, place, cache)
    return results


def _normalised(text: str) -> str:
    return " ".join(text.lower().split())


def decoder_for(model: SVEModel, pipeline, max_new_tokens: int) -> tuple[MemberDecoder, set[int], int, int]:
    """A run's decoder (members' weights cached when they fit the recipe's budget), its end-of-sequence
    ids, its pad id, and how many prompt tokens to keep: the recipe's max_length, less the new tokens when
    the model's positions would not hold both."""
    from sve_cli.ensemble import lm_head_weight
    from sve_cli.inference import cache_budget

    check_generation(pipeline.checkpoint)
    tokenizer, config = pipeline.tokenizer, pipeline.checkpoint.config
    # a generation run's TokenHead already holds the LM head: no second copy
    lm_head = model.head.weight if model.head_kind == "tokens" else lm_head_weight(pipeline.checkpoint)
    decoder = MemberDecoder(model, lm_head, config)
    model.fit_eval_cache(cache_budget(pipeline.recipe.eval.cache_budget, torch.device("cpu")))
    eos = {tokenizer.eos_token_id} | set(config.get("eos_token_id") if isinstance(config.get("eos_token_id"), list)
                                         else [config.get("eos_token_id")])
    eos.discard(None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos), 0)
    positions_limit = config.get("max_position_embeddings") or config.get("n_positions")
    keep = pipeline.max_length if not positions_limit else min(pipeline.max_length, positions_limit - max_new_tokens)
    if keep < 1:
        raise SveError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
                       f"{positions_limit} positions")
    return decoder, eos, pad, keep


def generation_rows(predictor, data: str, prompt_field: str, max_new_tokens: int, batch_size: int,
                    sample: bool = False, seed: int = 0, member_answers: bool = False, tokens: bool = False,
                    on_rows=None):
    """One list of output rows per chunk of `data`: the ensemble's answer to each prompt, its sequence
    scores and (`member_answers`) each member's own greedy answer and their agreement; `tokens` adds the
    per-token scores. `predictor` is `sve_cli.predict.Predictor`."""
    from sve_cli.data import iter_chunks
    from sve_cli.predict import CHUNK_ROWS

    pipeline = predictor.pipeline
    tokenizer = pipeline.tokenizer
    decoder, eos, pad, keep = decoder_for(predictor.model, pipeline, max_new_tokens)
    generator = torch.Generator().manual_seed(seed)
    first = 0
    for table in iter_chunks(data, None, CHUNK_ROWS):
        frame = table.frame
        if prompt_field not in frame.columns:
            raise SveError(f"{data} has no '{prompt_field}' column (it has: {', '.join(map(str, frame.columns))}); "
                           "name the prompts' column with --prompt-field")
        prompts = [str(value) for value in frame[prompt_field].tolist()]
        ids = frame["id"].tolist() if "id" in frame.columns else range(first, first + len(prompts))
        rows = []
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            encoded = [tokenizer(text)["input_ids"][-keep:] for text in batch]
            mixed = decode(decoder, encoded, max_new_tokens, eos, pad, sample, generator)
            own = decode(decoder, encoded, max_new_tokens, eos, pad, own=True) if member_answers else None
            for index, prompt in enumerate(batch):
                answer = mixed[index][0]
                text = tokenizer.decode(answer.tokens, skip_special_tokens=True)
                row_id = ids[start + index]
                row = {"id": row_id.item() if hasattr(row_id, "item") else row_id, "prompt": prompt, "text": text, **answer.summary()}
                if own is not None:
                    answers = [tokenizer.decode(member.tokens, skip_special_tokens=True) for member in own[index]]
                    row["member_answers"] = answers
                    row["agreement"] = sum(_normalised(a) == _normalised(text) for a in answers) / len(answers)
                if tokens:
                    row["tokens"] = [{"token": tokenizer.decode([token]), "log_likelihood": ll, "total_entropy": te,
                                      "mutual_information": mi}
                                     for token, ll, te, mi in zip(answer.tokens, answer.log_likelihood,
                                                                  answer.total_entropy, answer.mutual_information)]
                rows.append(row)
            on_rows and on_rows(len(batch))
        first += len(prompts)
        yield rows
