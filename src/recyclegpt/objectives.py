"""Training objectives as pure functions: the base's next-token loss L_lm and the recyclable module's loss L_rec.

At position t the base reads x_0..x_t and predicts x_{t+1}; the module reads the base's hidden state h_t and the
embedding of x_{t+1} and predicts x_{t+2}. Its target is either the data token x_{t+2} ("data"), the base's own
next-token distribution at position t+1 ("distill", which is what a speculative drafter has to match), or the mean
of the two ("both"). The total loss is L_lm + lam * L_rec when the base trains (joint regime) and L_rec alone when
it is frozen (retrofit regime).

Masks are over *target* positions: loss_mask[b, j] says whether token j of row b is something the model should
learn to predict (false for prompt tokens and padding in prompt -> response data).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from .model import RecycleModel, Transformer

RecycleTarget = Literal["data", "distill", "both"]


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean over the true entries of mask, their count); an all-false mask gives mean 0, not NaN."""
    if mask is None:
        return values.mean(), torch.tensor(values.numel(), device=values.device)
    mask = mask.to(values.dtype)
    n = mask.sum()
    return (values * mask).sum() / n.clamp(min=1), n


def _token_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, T, V), (B, T) -> (B, T) cross-entropy per token, computed in float32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def lm_losses(base: Transformer, idx: torch.Tensor, *,
              loss_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The base alone (the no-module baseline): {"loss", "lm", "lm_acc", "lm_tokens"} for idx (B, T)."""
    logits = base(idx).logits
    return _lm_terms(logits, idx, loss_mask, with_grad=True)


def _lm_terms(logits: torch.Tensor, idx: torch.Tensor, loss_mask: torch.Tensor | None,
              with_grad: bool) -> dict[str, torch.Tensor]:
    # position t predicts x_{t+1}: logits[:, :-1] against idx[:, 1:]
    mask = None if loss_mask is None else loss_mask[:, 1:]
    lm, n = _masked_mean(_token_ce(logits[:, :-1], idx[:, 1:]), mask)
    acc, _ = _masked_mean((logits[:, :-1].argmax(-1) == idx[:, 1:]).float(), mask)
    out = {"lm": lm.detach(), "lm_acc": acc, "lm_tokens": n}
    out["loss"] = lm if with_grad else lm.detach()
    return out


def recycle_losses(model: RecycleModel, idx: torch.Tensor, *, lam: float, loss_mask: torch.Tensor | None = None,
                   target: RecycleTarget = "data", train_base: bool = True,
                   detach_hidden: bool = False) -> dict[str, torch.Tensor]:
    """Losses of a RecycleModel on idx (B, T), T >= 3.

    Returns {"loss": the tensor to backpropagate, "lm", "rec": detached means, "lm_acc", "rec_acc": top-1
    accuracy against the data, "rec_agree": how often the module's argmax equals the base's argmax one step
    ahead (the greedy acceptance rate of a one-token draft), "lm_tokens", "rec_tokens": how many targets each
    mean is over}.

    train_base=True (joint): loss = L_lm + lam * L_rec. Gradients of L_rec reach the base through h_t (the base
        learns hidden states that also serve the module, as in the paper's joint training) unless detach_hidden;
        either way they reach the shared embedding, final norm and LM head.
    train_base=False (retrofit): the base runs under no_grad and loss = L_rec (lam is not used: the only
        parameters that train are the module's, and AdamW is nearly invariant to a constant loss scale). The caller
        freezes the base's parameters (requires_grad=False) so that the shared head collects no gradients.
    """
    if idx.shape[1] < 3:
        raise ValueError(f"recycle_losses needs sequences of at least 3 tokens, got T={idx.shape[1]}")
    if target not in ("data", "distill", "both"):
        raise ValueError(f"target must be 'data', 'distill' or 'both', got {target!r}")
    with torch.set_grad_enabled(train_base and torch.is_grad_enabled()):
        base_out = model.base(idx)
    logits, hidden = base_out.logits, base_out.hidden  # (B, T, V), (B, T, d)
    out = _lm_terms(logits, idx, loss_mask, with_grad=train_base)

    # module at t = 0..T-3 reads h_t and x_{t+1} and predicts x_{t+2}
    h = hidden[:, :-2]
    if detach_hidden or not train_base:
        h = h.detach()
    rec_logits = model.recycle(h, idx[:, 1:-1]).logits.float()  # (B, T-2, V)
    rec_targets = idx[:, 2:]
    mask = None if loss_mask is None else loss_mask[:, 2:]
    # the base's distribution for x_{t+2} is its output at position t+1; a fixed teacher, so no gradient
    teacher_logits = logits[:, 1:-1].detach().float()

    terms = []
    if target in ("data", "both"):
        terms.append(_token_ce(rec_logits, rec_targets))
    if target in ("distill", "both"):
        # KL(p_base || q_module) per position, summed over the vocabulary
        log_q = F.log_softmax(rec_logits, dim=-1)
        log_p = F.log_softmax(teacher_logits, dim=-1)
        terms.append((log_p.exp() * (log_p - log_q)).sum(-1))
    rec, n_rec = _masked_mean(sum(terms) / len(terms), mask)

    rec_pred = rec_logits.argmax(-1)
    out["rec"] = rec.detach()
    out["rec_acc"], _ = _masked_mean((rec_pred == rec_targets).float(), mask)
    out["rec_agree"], _ = _masked_mean((rec_pred == teacher_logits.argmax(-1)).float(), mask)
    out["rec_tokens"] = n_rec
    out["loss"] = out["loss"] + lam * rec if train_base else rec
    return out
