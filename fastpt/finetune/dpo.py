"""Direct Preference Optimization (Rafailov et al. 2023).

z = [log pi(y_w|x) - log pi(y_l|x)] - [log pi_ref(y_w|x) - log pi_ref(y_l|x)],
loss = -log sigmoid(beta z), beta = 0.1. Log-probabilities are summed over response tokens
only (labels -100 on the prompt and padding). The reference is a frozen model or
precomputed log-probs. Rewards beta * (log pi - log pi_ref) and their margin are logged:
``Trainer(DPO(policy, reference), config, pairs)`` trains on examples {"chosen": {...},
"rejected": {...}} and writes each step's reward_margin, accuracy, chosen_reward and
rejected_reward (means over the step's pairs) to metrics.jsonl beside the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastpt.finetune.heads import IGNORE_INDEX, _reads_values
from fastpt.models.common import check_labels


def sequence_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                      labels: Tensor) -> Tensor:
    """(B,) sum of log p(label_t | tokens < t) over labelled (response) tokens.

    ``labels`` are token ids (B, T) like ``input_ids``, each in [0, vocab) or -100, and every
    row scores at least one token after the first (the first is never predicted): a row
    with none would sum to 0 on both sides of the DPO margin, a loss of log 2 saying nothing."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a tensor of token ids, got {type(labels).__name__}")
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be a tensor of token ids, got {type(input_ids).__name__}")
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    # Against the logits' vocabulary: gather would clamp -5 to token 0 and fail on ids >= V
    # with an error that names neither; a (B, T') of another T would score misaligned tokens.
    check_labels(labels, input_ids.shape, logits.shape[-1], like=" like input_ids")
    target = labels[:, 1:]
    if _reads_values(target):
        empty = (target == IGNORE_INDEX).all(1).nonzero()
        if len(empty):
            raise ValueError(f"labels row {int(empty[0, 0])} scores no token: every label after the "
                             f"first is {IGNORE_INDEX}, so there is no response to sum log-probs over")
    keep = target != IGNORE_INDEX
    logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * keep).sum(-1)


@dataclass
class DPOOutput:
    loss: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    reward_margin: Tensor
    accuracy: Tensor      # fraction of pairs with chosen reward > rejected reward

    @property
    def chosen_reward(self) -> Tensor:  # the mean, as the Trainer logs it
        return self.chosen_rewards.mean()

    @property
    def rejected_reward(self) -> Tensor:
        return self.rejected_rewards.mean()


def _check_beta(beta) -> None:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) \
            or not beta > 0:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
             ref_rejected: Tensor, beta: float = 0.1) -> DPOOutput:
    """The DPO loss from summed response log-probs (each (B,))."""
    _check_beta(beta)
    inputs = {"policy_chosen": policy_chosen, "policy_rejected": policy_rejected, "ref_chosen": ref_chosen,
              "ref_rejected": ref_rejected}
    for name, t in inputs.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor of (B,) summed log-probs, got {type(t).__name__}")
    shapes = [tuple(t.shape) for t in inputs.values()]
    if len(set(shapes)) != 1 or len(shapes[0]) != 1:
        raise ValueError("policy_chosen, policy_rejected, ref_chosen and ref_rejected must each be "
                         f"(B,) log-probs of the same B pairs, got shapes {shapes}")
    if shapes[0][0] == 0:
        raise ValueError("dpo_loss got an empty batch (B = 0): there is no pair to average over")
    # A NaN or +-inf log-prob makes the loss NaN (or its gradient), far from the input that
    # caused it. Small positives are left alone: summed float rounding can give them.
    for name, t in inputs.items():
        bad = (~torch.isfinite(t)).nonzero() if _reads_values(t) else ()
        if len(bad):
            i = int(bad[0, 0])
            raise ValueError(f"{name}[{i}] = {float(t[i])}: log-probs must be finite")
    chosen = beta * (policy_chosen - ref_chosen.detach())
    rejected = beta * (policy_rejected - ref_rejected.detach())
    loss = -nn.functional.logsigmoid(chosen - rejected).mean()
    return DPOOutput(loss=loss, chosen_rewards=chosen.detach(), rejected_rewards=rejected.detach(),
                     reward_margin=(chosen - rejected).detach().mean(),
                     accuracy=(chosen > rejected).float().mean().detach())


class DPO(nn.Module):
    """``DPO(policy, reference=None, beta=0.1)``; ``forward(chosen=batch, rejected=batch,
    ref_chosen_logps=None, ref_rejected_logps=None)`` where each batch has input_ids,
    attention_mask and response-only labels. Without a reference model, precomputed
    reference log-probs must be passed."""

    def __init__(self, policy: nn.Module, reference: nn.Module | None = None, beta: float = 0.1):
        super().__init__()
        _check_beta(beta)
        self.policy, self.beta = policy, beta
        self._reference = [reference]  # frozen, not a trainable submodule
        if reference is not None:
            reference.requires_grad_(False).eval()

    @staticmethod
    def loss_terms(batch: dict) -> dict:
        """For the Trainer: the loss is a mean over the batch's pairs (not its label tokens),
        and the rewards are logged beside it (weight 0: they train nothing)."""
        chosen = batch.get("chosen") if isinstance(batch, dict) else None
        ids = chosen.get("input_ids") if isinstance(chosen, dict) else None
        if not isinstance(ids, Tensor) or ids.dim() != 2:
            raise ValueError("a DPO batch must be {'chosen': {'input_ids': (B, T), ...}, 'rejected': {...}}, got "
                             f"{sorted(batch) if isinstance(batch, dict) else type(batch).__name__}")
        pairs = ids.shape[0]
        return {"loss": (1.0, pairs), **{name: (0.0, pairs) for name in
                                         ("reward_margin", "accuracy", "chosen_reward", "rejected_reward")}}

    def forward(self, chosen: dict, rejected: dict, ref_chosen_logps: Tensor | None = None,
                ref_rejected_logps: Tensor | None = None) -> DPOOutput:
        ref = self._reference[0]
        if ref_chosen_logps is None or ref_rejected_logps is None:
            if ref is None:
                raise ValueError("DPO needs a reference model or precomputed reference log-probs")
            with torch.no_grad():
                ref_chosen_logps = sequence_logprobs(ref, **chosen)
                ref_rejected_logps = sequence_logprobs(ref, **rejected)
        return dpo_loss(sequence_logprobs(self.policy, **chosen),
                        sequence_logprobs(self.policy, **rejected),
                        ref_chosen_logps, ref_rejected_logps, self.beta)
