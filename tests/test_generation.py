"""Member-batched decoding (`sve_cli.generation`) on tiny random decoders of every decoder family, in float64:

- members at their base values give exactly a plain `transformers` causal LM's next-token logits;
- the cached, member-batched logits at every step equal a no-cache forward of each member alone over
  the prompt and the tokens generated so far;
- every score equals an independent computation (scipy's entropy of the mixture and of each member)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import entropy

from sve_cli.checkpoint import open_checkpoint
from sve_cli.ensemble import lm_head_weight
from sve_cli.architectures import ARCHITECTURES, check_generation
from sve_cli.errors import SveError
from sve_cli.generation import MemberDecoder, decode, left_padded, positions, token_scores
from sve_cli.pipeline import ensemble_for
from sve_cli.recipe import EnsembleConfig

from test_architectures import DECODERS
from test_prefix import _perturbed, _save, _upper_targets

REGISTERED = [family for family in DECODERS if family in ARCHITECTURES]
PROMPTS = [[11, 12, 13, 14, 15], [21, 22], [31, 32, 33]]  # uneven: left padding and positions are exercised


def _decoder(family: str, tmp_path, sigma_init: float = 0.01, members: int = 3) -> tuple[MemberDecoder, str]:
    path = _save(family, tmp_path / family)
    config = EnsembleConfig(members=members, targets=_upper_targets(path), bias=False, dropout=False,
                            sigma_init=sigma_init)
    ensemble = ensemble_for(path, config, classes=2, seed=1).double().eval()
    checkpoint = open_checkpoint(path)
    return MemberDecoder(ensemble, lm_head_weight(checkpoint).double(), checkpoint.config), path


def _no_cache_member_logits(decoder: MemberDecoder, sequences: list[list[int]], member: int) -> torch.Tensor:
    """Member `member` alone, no cache: its next-token logits `[B, V]` after each full sequence."""
    ids, mask = left_padded(sequences, pad=0)
    with decoder.model.active_members(member, member + 1), torch.no_grad():
        logits, _ = decoder.logits(ids, mask, positions(mask), None)
    return logits[0]


@pytest.mark.parametrize("family", REGISTERED)
def test_members_at_their_base_values_are_the_plain_causal_lm(family, tmp_path):
    from transformers import AutoModelForCausalLM

    decoder, path = _decoder(family, tmp_path, sigma_init=0.0)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    ids, mask = left_padded(PROMPTS, pad=0)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits[:, -1]  # [B, V]
        members = len(decoder.model.active)
        ours, _ = decoder.logits(ids.repeat(members, 1), mask.repeat(members, 1), positions(mask).repeat(members, 1))
    for member in range(members):  # the SVD reconstructs each weight to float32 precision
        torch.testing.assert_close(ours[member], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", REGISTERED)
def test_cached_member_batched_decoding_equals_each_member_without_a_cache(family, tmp_path):
    decoder, _ = _decoder(family, tmp_path)
    _perturbed(decoder.model)
    for own in (False, True):
        results = decode(decoder, PROMPTS, max_new_tokens=4, eos=set(), pad=0, own=own)
        for step in range(4):
            for path in range(decoder.members if own else 1):
                sequences = [prompt + results[row][path].tokens[:step] for row, prompt in enumerate(PROMPTS)]
                scorers = [path] if own else range(decoder.members)  # a member alone, or all for the mixture
                log_probs = torch.stack([_no_cache_member_logits(decoder, sequences, m).log_softmax(-1)
                                         for m in scorers])  # [m, B, V]
                for row in range(len(PROMPTS)):
                    token = results[row][path].tokens[step]
                    mixture = log_probs[:, row].logsumexp(0) - math.log(len(scorers))  # one member: its own
                    assert token == int(mixture.argmax())
                    assert results[row][path].log_likelihood[step] == pytest.approx(float(mixture[token]), abs=1e-8)
    assert any(len({tuple(r.tokens) for r in row}) > 1 for row in results)  # the members did disagree somewhere


@pytest.mark.parametrize("family", sorted(set(DECODERS) - set(REGISTERED)) + ["bert"])
def test_families_sve_only_infers_are_refused_in_one_line(family, tmp_path):
    with pytest.raises(SveError, match="generation supports the decoder families"):
        check_generation(open_checkpoint(_save(family, tmp_path / family)))


def test_scores_equal_an_independent_computation():
    generator = torch.Generator().manual_seed(0)
    log_probs = (torch.randn(4, 3, 50, generator=generator, dtype=torch.float64) * 2).log_softmax(-1)  # [M, B, V]
    scores = token_scores(log_probs)
    members = log_probs.numpy()
    mixture = np.exp(logsumexp(members, axis=0) - np.log(4))  # [B, V]
    for row in range(3):
        total = entropy(mixture[row])
        expected = np.mean([entropy(np.exp(members[m, row])) for m in range(4)])
        assert float(scores["total_entropy"][row]) == pytest.approx(total, rel=1e-10)
        assert float(scores["expected_entropy"][row]) == pytest.approx(expected, rel=1e-10)
        assert float(scores["mutual_information"][row]) == pytest.approx(total - expected, rel=1e-8)
        np.testing.assert_allclose(scores["mixture"][row].exp().numpy(), mixture[row], rtol=1e-10)


def test_decoding_stops_at_the_end_of_sequence_and_keeps_it_scored(tmp_path):
    decoder, _ = _decoder("llama", tmp_path)
    free = decode(decoder, PROMPTS, max_new_tokens=3, eos=set(), pad=0)
    stop = free[1][0].tokens[1]  # make the second token of prompt 1's answer its end
    results = decode(decoder, PROMPTS, max_new_tokens=3, eos={stop}, pad=0)
    assert results[1][0].tokens == free[1][0].tokens[:2] and len(results[1][0].log_likelihood) == 2
    summary = results[1][0].summary()
    assert summary["log_likelihood"] == pytest.approx(sum(free[1][0].log_likelihood[:2]))
    assert summary["total_entropy_max"] == max(free[1][0].total_entropy[:2])


def test_sve_generate_end_to_end_on_a_trained_decoder_run(sve, text_models, tmp_path):
    import json

    from conftest import assert_one_error_line, sentiment_file, train_run

    run = train_run(tmp_path, "run", text_models["llama"], sentiment_file(tmp_path),
                    ensemble={"members": 3, "targets": "*.layers.1.self_attn.*_proj.weight"})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in ["The news today", "I love", "Why"]))
    out = tmp_path / "generations.jsonl"
    result = sve("generate", run, "--data", prompts, "--out", out, "--max-new-tokens", "5", "--member-answers", "--tokens")
    assert result.code == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["prompt"] for row in rows] == ["The news today", "I love", "Why"] and [r["id"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert 1 <= len(row["tokens"]) <= 5 and len(row["member_answers"]) == 3
        assert row["log_likelihood"] == pytest.approx(sum(t["log_likelihood"] for t in row["tokens"]))
        assert row["mutual_information_mean"] == pytest.approx(
            sum(t["mutual_information"] for t in row["tokens"]) / len(row["tokens"]))
        assert row["agreement"] in (0, 1 / 3, 2 / 3, 1) and row["total_entropy_max"] >= row["total_entropy_mean"]
    sampled = tmp_path / "sampled.jsonl"
    assert sve("generate", run, "--data", prompts, "--out", sampled, "--decoding", "sample", "--seed", "3").code == 0
    again = tmp_path / "again.jsonl"
    assert sve("generate", run, "--data", prompts, "--out", again, "--decoding", "sample", "--seed", "3").code == 0
    assert again.read_text() == sampled.read_text()  # a seed gives the same samples
    before = out.read_bytes()
    assert_one_error_line(sve("generate", run, "--data", prompts, "--out", out), "already exists; pass --overwrite")
    assert_one_error_line(sve("generate", run, "--data", prompts, "--out", tmp_path / "x.jsonl", "--prompt-field", "q"),
                          "has no 'q' column")
    assert_one_error_line(sve("generate", run, "--data", prompts, "--out", tmp_path / "y.jsonl", "--seed", "2"),
                          "greedy decoding has none")
    assert out.read_bytes() == before and not (tmp_path / "x.jsonl").exists()
