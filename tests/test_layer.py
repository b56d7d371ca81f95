import pytest
import torch
import torch.nn.functional as F

from sve_cli.layer import SVELinear, strategy_costs


def _layer(members=3, out=12, inp=8, strategy="factored", parameterisation="clamp", bias=True, seed=0, sigma_init=0.01):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, inp, generator=generator)
    U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
    base_bias = torch.randn(out, generator=generator) if bias else None
    return SVELinear(U, S, Vh, members, base_bias=base_bias, bias=bias, sigma_init=sigma_init,
                     parameterisation=parameterisation, strategy=strategy,
                     generator=torch.Generator().manual_seed(seed)), weight, base_bias


def _randomise(layer):
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        layer.sigma.copy_(torch.randn(layer.sigma.shape, generator=generator) * 2)  # some < 0: clamp acts
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator))


def _longhand_values(layer, member):
    """The member's singular values written out from the docstring's definitions."""
    sigma = layer.sigma[member]
    if layer.parameterisation == "relative":
        return layer.S * torch.clamp(1 + sigma, min=0)
    return torch.clamp(sigma, min=0) if layer.parameterisation == "clamp" else torch.log1p(torch.exp(sigma))


@pytest.mark.parametrize("parameterisation", ["relative", "clamp", "softplus"])
@pytest.mark.parametrize("strategy", ["factored", "materialised", "auto"])
def test_member_outputs_equal_a_dense_linear(strategy, parameterisation):
    layer, _, _ = _layer(strategy=strategy, parameterisation=parameterisation)
    _randomise(layer)
    x = torch.randn(3 * 2, 5, 8)  # [M·B, T, in], member-major
    y = layer(x)
    for member in range(3):
        weight = layer.U @ torch.diag(_longhand_values(layer, member)) @ layer.Vh
        expected = F.linear(x[member * 2:(member + 1) * 2], weight, layer.bias[member])
        torch.testing.assert_close(y[member * 2:(member + 1) * 2], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.member_weight(member), weight)


def test_strategies_agree_on_gradients():
    grads = {}
    for strategy in ("factored", "materialised"):
        layer, _, _ = _layer(strategy=strategy, bias=True)
        _randomise(layer)
        x = torch.randn(6, 4, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
        (layer(x) ** 2).sum().backward()
        grads[strategy] = (layer.sigma.grad, layer.bias.grad, x.grad)
    for a, b in zip(grads["factored"], grads["materialised"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_init_follows_the_paper_and_is_seeded():
    exact, weight, base_bias = _layer(sigma_init=0.0, parameterisation="clamp")
    S = torch.linalg.svd(weight, full_matrices=False).S
    assert torch.equal(exact.sigma, S[None].expand(3, -1)) and torch.equal(exact.bias, base_bias[None].expand(3, -1))
    assert torch.allclose(exact.member_weight(0), weight, atol=1e-5)
    one, _, _ = _layer(seed=1)
    same, _, _ = _layer(seed=1)
    other, _, _ = _layer(seed=2)
    assert torch.equal(one.sigma, same.sigma) and not torch.equal(one.sigma, other.sigma)
    big, _, _ = _layer(members=64, out=256, inp=256, sigma_init=0.01)
    S = torch.linalg.svd(torch.randn(256, 256, generator=torch.Generator().manual_seed(0)), full_matrices=False).S
    epsilon = big.singular_values().detach() / S - 1  # [M, k]
    assert abs(float(epsilon.mean())) < 1e-3 and abs(float(epsilon.std()) - 0.01) < 5e-4
    assert not torch.equal(big.sigma[0], big.sigma[1])  # members differ


def test_bias_free_layers_stay_bias_free():
    layer, _, _ = _layer(bias=False)
    assert layer.bias is None and [n for n, p in layer.named_parameters() if p.requires_grad] == ["sigma"]
    assert layer(torch.randn(3, 8)).shape == (3, 12)


@pytest.mark.parametrize("parameterisation", ["relative", "softplus"])
def test_every_parameterisation_starts_at_the_same_singular_values(parameterisation):
    clamp, _, _ = _layer(parameterisation="clamp")
    other, _, _ = _layer(parameterisation=parameterisation)
    torch.testing.assert_close(other.singular_values(), clamp.singular_values(), rtol=1e-5, atol=1e-6)


def test_relative_steps_are_scale_free_and_decay_pulls_towards_the_pretrained_spectrum():
    """One Adam step moves every singular value by the same factor (lr), whatever its size; weight
    decay alone brings the members back to S, not to 0."""
    layer, _, _ = _layer(parameterisation="relative", sigma_init=0.0, out=16, inp=16)
    S = layer.S.clone()
    assert float(S.max() / S.min()) > 10  # a spread of sizes, as in real weights
    optimizer = torch.optim.AdamW([layer.sigma], lr=1e-2, weight_decay=0.0)
    layer.singular_values().sum().backward()  # every gradient positive: each value steps down
    optimizer.step()
    torch.testing.assert_close(layer.singular_values() / S, torch.full_like(layer.sigma, 1 - 1e-2), rtol=0, atol=1e-6)
    decay = torch.optim.AdamW([layer.sigma], lr=0.5, weight_decay=1.0)
    for _ in range(40):
        decay.zero_grad()
        layer.sigma.grad = torch.zeros_like(layer.sigma)
        decay.step()
    torch.testing.assert_close(layer.singular_values(), S[None].expand(3, -1), rtol=1e-6, atol=1e-6)


def test_eval_cache_is_reused_and_invalidated_when_sigma_changes():
    layer, _, _ = _layer(strategy="materialised")
    layer.eval()
    x = torch.randn(6, 8)
    with torch.no_grad():
        first = layer(x)
        cached = layer._cache[1]
        layer(x)
        assert layer._cache[1] is cached
        layer.sigma.mul_(0.5)  # what an optimizer step does: in place
        second = layer(x)
    assert layer._cache[1] is not cached
    expected = torch.cat([F.linear(x[2 * m:2 * m + 2], layer.member_weight(m), layer.bias[m]) for m in range(3)])
    torch.testing.assert_close(second, expected)
    assert not torch.allclose(first, second)
    layer.train()
    assert layer._cache is None


def test_batch_must_be_a_multiple_of_members():
    layer, _, _ = _layer(members=3)
    with pytest.raises(ValueError, match="multiple of 3 members"):
        layer(torch.randn(4, 8))


@pytest.mark.parametrize("shape,tokens,expected", [((384, 384), 2048, "materialised"),
                                                   ((2048, 2048), 256, "factored")])
def test_cost_model_matches_the_measured_winner(shape, tokens, expected):
    costs = strategy_costs(4, tokens, *shape, rank=min(shape), training=True)
    assert min(costs, key=costs.get) == expected
    assert strategy_costs(4, tokens, *shape, rank=min(shape), training=False, weights_cached=True)["materialised"] \
        < costs["materialised"]
