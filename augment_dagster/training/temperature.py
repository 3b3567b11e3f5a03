"""Temperature scaling (Guo et al. 2017): T minimising NLL(softmax(z/T), y) on validation logits."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def nll(logits, labels, T: float = 1.0) -> float:
    return float(F.cross_entropy(torch.as_tensor(logits).float() / T, torch.as_tensor(labels).long()))


def fit_temperature(logits, labels, max_iter: int = 500, lr: float = 0.01) -> float:
    """LBFGS (lr 0.01, max_iter 500) on log T from T = 1; argmax (accuracy) is unchanged by construction."""
    z = torch.as_tensor(logits).detach().float()
    y = torch.as_tensor(labels).long()
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=lr, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    T = float(log_t.exp())
    # never worse than T = 1 (LBFGS can stall on degenerate inputs)
    return T if nll(z, y, T) <= nll(z, y, 1.0) + 1e-9 else 1.0
