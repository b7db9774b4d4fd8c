"""MSVAR's DPO regulariser: prefer the HR token sequence over the tokens of the upsampled LR.

    L_DPO = -log sigmoid(beta * (log p(z_HR) - log p(z_LR)))

with log p(z) the sum of per-token log-probabilities under the model (no reference model).
z_LR tokenises the LR image upsampled to the HR size with the same tokenizer.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from arsr.interfaces import ARContext, Regularizer


def dpo_loss(logp_preferred: Tensor, logp_rejected: Tensor, beta: float) -> Tensor:
    """Per-sample -log sigmoid(beta (log p_w - log p_l)), averaged over the batch."""
    return F.softplus(-beta * (logp_preferred - logp_rejected)).mean()


class DPO(Regularizer):
    """Args:
        beta: inverse temperature of the preference (the paper leaves it open).
        weight: weight of the term in the total loss (MSVAR: 1).
        reduction: ``sum`` over tokens (the paper's sequence log-likelihood) or ``mean`` per token.
        second_pass: score z_LR with its own teacher-forced pass (exact likelihood) instead of
            reading its tokens' probabilities off the HR pass (half the compute).
    """

    def __init__(self, beta: float = 0.01, weight: float = 1.0, reduction: Literal["sum", "mean"] = "sum", second_pass: bool = False):
        super().__init__()
        self.beta, self.weight, self.reduction, self.second_pass = beta, weight, reduction, second_pass

    def _sequence_logp(self, head, logits: Tensor, tokens: list[Tensor], mask: Tensor) -> Tensor:
        per_token = head.log_prob(logits, torch.cat(tokens, dim=1)) * mask  # (B, L), untrained positions zero (no host sync)
        return per_token.sum(1) if self.reduction == "sum" else per_token.sum(1) / mask.sum()

    def forward(self, ctx: ARContext) -> dict[str, Tensor]:
        with torch.no_grad():
            z_lr = ctx.tokenizer.img_to_indices(ctx.batch.lr_up * 2 - 1)
        head = ctx.model.head
        logp_hr = self._sequence_logp(head, ctx.logits, ctx.tokens, ctx.loss_mask)
        logits_lr = ctx.logits
        if self.second_pass:
            inputs = ctx.tokenizer.quantize.indices_to_teacher_input(z_lr)
            logits_lr = ctx.model(ctx.labels, inputs, ctx.prefix_input, captions=ctx.captions)
        logp_lr = self._sequence_logp(head, logits_lr, z_lr, ctx.loss_mask)
        loss = dpo_loss(logp_hr, logp_lr, self.beta)
        self.logs = {"dpo_margin": (logp_hr - logp_lr).mean().detach()}
        return {"dpo": self.weight * loss}
