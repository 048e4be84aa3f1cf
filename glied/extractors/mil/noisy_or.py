"""Noisy-OR pooling of per-cell word probabilities, computed in log space (Fang et al., CVPR 2015, sec. 3.1).

With a per-cell logit x_j for a word, the cell probability is sigmoid(x_j) and the image probability is

    p = 1 - prod_j (1 - sigmoid(x_j)).

Multiplying hundreds of probabilities underflows and ``log(p)`` of a tiny ``p`` is ``-inf``, so everything is
done with log-probabilities:

    log(1 - sigmoid(x)) = -softplus(x)                   (exact, no cancellation)
    log(1 - p) = S = -sum_j softplus(x_j)                  (<= 0)
    p = -expm1(S)
    log(p) = log(-expm1(S))                                (for -S not small)
           = log(-S) + S/2 + S^2/24 + O(S^3)                (for -S small; log(-S) by logsumexp of
                                                            log softplus(x_j), so it stays finite and
                                                            exact even when every softplus underflows)

so the loss and its gradient stay finite for any number of cells and any logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Below this, log(softplus(x)) is x to float32 precision (softplus(x) = e^x (1 - e^x / 2 + ...)).
_LOG_SOFTPLUS_LINEAR_BELOW = -20.0
# Below this value of -S = -log(1 - p), log(p) uses the series instead of log(-expm1(S)).
_SMALL_A = 1e-3


def log_softplus(x: torch.Tensor) -> torch.Tensor:
    """log(softplus(x)), finite (and with a finite gradient) for every finite x."""
    linear = x < _LOG_SOFTPLUS_LINEAR_BELOW
    safe = torch.where(linear, torch.full_like(x, _LOG_SOFTPLUS_LINEAR_BELOW), x)
    return torch.where(linear, x, torch.log(F.softplus(safe)))


def noisy_or_log(cell_logits: torch.Tensor, dim: int | tuple[int, ...] = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-level noisy-OR in log space.

    Args:
        cell_logits: per-cell word logits, any shape; the cells are the axes in ``dim``
            (e.g. (B, V, h, w) with ``dim=(2, 3)``).
        dim: the cell axes, reduced away.

    Returns:
        (log_p, log_q): log p(w|I) and log(1 - p(w|I)), both <= 0 and finite, shape of ``cell_logits`` without
        ``dim``. ``p = exp(log_p)``.
    """
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    log_q = -F.softplus(cell_logits).sum(dim=dims)  # log(1 - p) = sum_j log(1 - sigmoid(x_j))
    a = -log_q  # >= 0
    # Small a (p tiny): log p = log(a) + log((1 - e^-a) / a) ~ log(a) - a/2 + a^2/24, with log(a) computed directly
    # from the logits so that it survives softplus underflow.
    log_a = torch.logsumexp(log_softplus(cell_logits), dim=dims)
    small = a < _SMALL_A
    a_small = a.clamp(max=_SMALL_A)
    series = log_a - 0.5 * a_small + a_small * a_small / 24.0
    a_big = torch.where(small, torch.full_like(a, _SMALL_A), a)
    direct = torch.log(-torch.expm1(-a_big))
    log_p = torch.where(small, series, direct)
    return log_p, log_q


def noisy_or_prob(cell_logits: torch.Tensor, dim: int | tuple[int, ...] = -1) -> torch.Tensor:
    """p(w|I) = 1 - prod_j (1 - sigmoid(x_j)), computed as -expm1(-sum softplus(x_j))."""
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    return -torch.expm1(-F.softplus(cell_logits).sum(dim=dims))


def noisy_or_bce(log_p: torch.Tensor, log_q: torch.Tensor, labels: torch.Tensor,
                 pos_weight: float = 1.0) -> torch.Tensor:
    """Mean binary cross-entropy from the log-space terms: -(y log p + (1 - y) log(1 - p)).

    Args:
        log_p, log_q: from :func:`noisy_or_log`, shape (B, V).
        labels: (B, V) in {0, 1} (float or bool).
        pos_weight: weight of the positive term (1 = plain BCE).
    """
    y = labels.to(log_p.dtype)
    return -(pos_weight * y * log_p + (1.0 - y) * log_q).mean()
