"""Teacher-forced target scoring: the one place that turns a batch's logits into per-request
(or per-prompt) mean negative log-likelihoods of the target tokens.

Used by the value fit (``values``), the LoRA baseline (``lora_ft``) and the verification
metrics (``verify.metrics``): each scores K target tokens spread over the rows of a padded
batch and averages them per group (a request, whose rows are its prompt after each context
prefix, or one prompt).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ScoredTargets:
    row: torch.Tensor  # (K,) batch row of each target token
    pos: torch.Tensor  # (K,) position whose next-token prediction is scored
    token: torch.Tensor  # (K,) the target token id
    group: torch.Tensor  # (K,) request (or prompt) the token belongs to
    n_groups: int

    @classmethod
    def build(cls, targets: Iterable[tuple[int, int, int, int]], n_groups: int, device) -> ScoredTargets:
        """From (row, position, token, group) tuples."""
        cols = list(zip(*targets)) or [(), (), (), ()]
        row, pos, token, group = (torch.tensor(c, dtype=torch.long, device=device) for c in cols)
        return cls(row, pos, token, group, n_groups)

    def logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """(K,) log p(token) at each scored position, from (B, T, V) logits (in float32)."""
        return logits[self.row, self.pos].float().log_softmax(-1).gather(-1, self.token[:, None])[:, 0]

    def per_group(self, values: torch.Tensor) -> torch.Tensor:
        """(n_groups,) mean of (K,) per-token values over each group's tokens."""
        zeros = torch.zeros(self.n_groups, device=values.device, dtype=values.dtype)
        total = zeros.index_add(0, self.group, values)
        count = zeros.index_add(0, self.group, torch.ones_like(values))
        return total / count.clamp_min(1)

    def mean_nll(self, logits: torch.Tensor) -> torch.Tensor:
        """(n_groups,) mean target NLL per group (differentiable)."""
        return -self.per_group(self.logprobs(logits))
