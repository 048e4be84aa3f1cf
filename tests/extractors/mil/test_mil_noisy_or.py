"""Noisy-OR numerics: equal to the naive product for a few cells, finite for many cells and extreme logits."""
import numpy as np
import pytest
import torch

from glied.extractors.mil.noisy_or import log_softplus, noisy_or_bce, noisy_or_log, noisy_or_prob


def naive(logits: torch.Tensor) -> torch.Tensor:
    return 1 - torch.prod(1 - torch.sigmoid(logits.double()), dim=-1)


def test_matches_naive_product_for_few_cells():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 9, 12, generator=g, dtype=torch.float64) * 3  # (B, V, cells)
    log_p, log_q = noisy_or_log(x, dim=-1)
    ref = naive(x)
    torch.testing.assert_close(log_p.exp(), ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(log_q.exp(), 1 - ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(noisy_or_prob(x, dim=-1), ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("scale", [-30.0, -12.0, -8.0, -5.0, 0.0, 3.0])
def test_small_p_branch_is_accurate(scale):
    # p around the series/direct switch and far below it, in float64 against the naive product
    x = torch.full((4, 30), scale, dtype=torch.float64) + torch.linspace(-1, 1, 30, dtype=torch.float64)
    log_p, _ = noisy_or_log(x, dim=-1)
    ref = naive(x).log()
    torch.testing.assert_close(log_p, ref, rtol=1e-6, atol=1e-9)


def test_float32_matches_float64():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 50, 64, generator=g, dtype=torch.float64) * 4 - 6
    lp64, lq64 = noisy_or_log(x, dim=-1)
    lp32, lq32 = noisy_or_log(x.float(), dim=-1)
    torch.testing.assert_close(lp32.double(), lp64, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lq32.double(), lq64, rtol=1e-4, atol=1e-5)


def test_stable_for_many_cells_and_extreme_logits():
    cells = 10_000
    x = torch.cat([
        torch.full((1, cells), -200.0),  # every softplus underflows: p ~ cells * e^-200
        torch.full((1, cells), -1e4),  # beyond any exp
        torch.full((1, cells), 80.0),  # p = 1 - tiny
        torch.full((1, cells), 1e4),
        torch.linspace(-1e3, 1e3, cells).view(1, cells),
        torch.full((1, cells), -9.0),  # p ~ 1 - (1 - 1.2e-4)^1e4 ~ 0.7
    ]).requires_grad_(True)  # (6, cells) float32
    log_p, log_q = noisy_or_log(x, dim=-1)
    assert torch.isfinite(log_p).all() and torch.isfinite(log_q).all()
    assert (log_p <= 0).all() and (log_q <= 0).all()
    # p ~ cells * e^-200 exactly in log space even though every float32 softplus is 0
    assert log_p[0].item() == pytest.approx(-200 + np.log(cells), abs=1e-3)
    assert log_p[1].item() == pytest.approx(-1e4 + np.log(cells), rel=1e-6)
    assert log_p[2].item() == pytest.approx(0.0, abs=1e-6)
    expected = np.log(-np.expm1(cells * np.log1p(-1 / (1 + np.exp(9.0)))))
    assert log_p[5].item() == pytest.approx(expected, rel=1e-4)
    for y in (torch.zeros(6), torch.ones(6)):
        loss = noisy_or_bce(log_p.view(6, 1), log_q.view(6, 1), y.view(6, 1))
        (g,) = torch.autograd.grad(loss, x, retain_graph=True)
        assert torch.isfinite(loss) and torch.isfinite(g).all()


def test_bce_equals_reference_where_reference_is_finite():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 7, 16, generator=g, dtype=torch.float64)
    y = (torch.rand(5, 7, generator=g) < 0.4).double()
    log_p, log_q = noisy_or_log(x, dim=-1)
    p = naive(x)
    ref = torch.nn.functional.binary_cross_entropy(p, y)
    torch.testing.assert_close(noisy_or_bce(log_p, log_q, y), ref)


def test_log_softplus_gradient_finite():
    x = torch.tensor([-1e5, -200.0, -20.0, -19.0, 0.0, 50.0], requires_grad=True)
    y = log_softplus(x)
    torch.testing.assert_close(y[-2], torch.log(torch.log(torch.tensor(2.0))))
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(y).all() and torch.isfinite(g).all()
