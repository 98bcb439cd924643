"""Losses of fine-tuning beyond torch's own: the Cox partial likelihood for survival."""

from __future__ import annotations

import torch


def cox_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood (Breslow ties), averaged over events.

    For each event i: ``-(risk_i - log Σ_{j: time_j ≥ time_i} exp(risk_j))``. A batch without events gives 0 (with a
    gradient graph), so training goes on.
    """
    risk, time, event = risk.float().reshape(-1), time.float().reshape(-1), event.float().reshape(-1)
    at_risk = time[None, :] >= time[:, None]  # row i: who is still at risk at time_i
    log_denominator = torch.logsumexp(risk[None, :].masked_fill(~at_risk, float("-inf")), dim=1)
    events = event > 0
    if not bool(events.any()):
        return risk.sum() * 0.0
    return -(risk[events] - log_denominator[events]).mean()
