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

from ..models import RecycleModel, Transformer

RecycleTarget = Literal["data", "distill", "both"]


def _select(x: torch.Tensor, sel: torch.Tensor | None) -> torch.Tensor:
    """(B, T, ...) -> (N, ...): the entries where sel (B, T) is true, row-major; all of them when sel is None."""
    return x.flatten(0, 1) if sel is None else x[sel]


def _token_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, V), (N,) -> (N,) cross-entropy per token, computed in float32."""
    return F.cross_entropy(logits.float(), targets, reduction="none")


def _mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of a 1-D tensor; 0, not NaN, when it is empty."""
    return values.sum() / max(values.numel(), 1)


def lm_losses(base: Transformer, idx: torch.Tensor, *,
              loss_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The base alone (the no-module baseline): {"loss", "lm", "lm_acc", "lm_tokens"} for idx (B, T)."""
    sel = None if loss_mask is None else loss_mask[:, 1:]
    logits = base.head(_select(base(idx, num_logits=0).hidden[:, :-1], sel))
    return _lm_terms(logits, _select(idx[:, 1:], sel), with_grad=True)


def _lm_terms(logits: torch.Tensor, targets: torch.Tensor, with_grad: bool) -> dict[str, torch.Tensor]:
    """logits (N, V) of the target positions and their next tokens (N,)."""
    lm = _mean(_token_ce(logits, targets))
    acc = _mean((logits.argmax(-1) == targets).float())
    out = {"lm": lm.detach(), "lm_acc": acc, "lm_tokens": torch.tensor(targets.numel(), device=targets.device)}
    out["loss"] = lm if with_grad else lm.detach()
    return out


def recycle_losses(model: RecycleModel, idx: torch.Tensor, *, lam: float, loss_mask: torch.Tensor | None = None,
                   target: RecycleTarget = "data", train_base: bool = True,
                   detach_hidden: bool = False, feature_weight: float = 0.0, rollout: int = 1,
                   rollout_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Losses of a RecycleModel on idx (B, T), T >= 3.

    Returns {"loss": the tensor to backpropagate, "lm", "rec": detached means, "lm_acc", "rec_acc": top-1
    accuracy against the data, "rec_agree": how often the module's argmax equals the base's argmax one step
    ahead (the greedy acceptance rate of a one-token draft), "lm_tokens", "rec_tokens": how many targets each
    mean is over}.

    train_base=True (joint): loss = L_lm + lam * L_rec. Gradients of L_rec reach the base through h_t (the base
        learns hidden states that also serve the module, as in the paper's joint training) unless detach_hidden;
        either way they reach the shared embedding, final norm and LM head.
    feature_weight > 0 adds feature_weight * L_feat to L_rec (EAGLE-style feature regression): the smooth-L1
        distance between the module's output and the base's own hidden state h_{t+1} (the state the base predicts
        x_{t+2} from), both through the base's final norm, averaged over d. An output equal to h_{t+1} would make
        the module's prediction the base's; it is also what a multi-step drafter feeds back in place of h.
        Reported as "feat"; "rec" stays the token loss.
    rollout > 1 trains the module as a multi-step drafter (speculative.speculative): at depth k = 2..rollout the
        module reads, in place of h_t, its own depth-(k-1) output at position t-1 (which plays h_t's role: both
        predict x_{t+1} through the head), with the true tokens x_{t+1}, and predicts x_{t+2} against the same
        target. Every position of a depth-k pass reads rolled-out states (at decoding time the earlier slots hold
        true states: an approximation, as in EAGLE's training). The rolled-out inputs are detached. L_rec becomes
        L_1 + rollout_weight * mean_k L_k; "roll" and "roll_agree" report the deeper depths' loss and agreement.
    train_base=False (retrofit): the base runs under no_grad and loss = L_rec (lam is not used: the only
        parameters that train are the module's, and AdamW is nearly invariant to a constant loss scale). The caller
        freezes the base's parameters (requires_grad=False) so that the shared head collects no gradients.
    """
    if idx.shape[1] < 3:
        raise ValueError(f"recycle_losses needs sequences of at least 3 tokens, got T={idx.shape[1]}")
    if target not in ("data", "distill", "both"):
        raise ValueError(f"target must be 'data', 'distill' or 'both', got {target!r}")
    B, T = idx.shape
    with torch.set_grad_enabled(train_base and torch.is_grad_enabled()):
        full = model.base(idx, num_logits=0, taps=model.taps)
        hidden = full.hidden  # (B, T, d) pre-norm
        # The head (d -> V, the largest matrix of a small model) runs only where there is a target: position p
        # predicts x_{p+1}, so the selection is loss_mask shifted by one.
        lm_sel = None if loss_mask is None else loss_mask[:, 1:]  # (B, T-1)
        logits = model.base.head(_select(hidden[:, :-1], lm_sel))  # (N_lm, V)
    out = _lm_terms(logits, _select(idx[:, 1:], lm_sel), with_grad=train_base)

    # module at t = 0..T-3 reads h_t and x_{t+1} and predicts x_{t+2}; its targets are where loss_mask[:, 2:] holds
    if detach_hidden or not train_base:
        full = full._replace(hidden=hidden.detach(), taps=None if full.taps is None else full.taps.detach())
    state = model.state(full)[:, :-2]  # s_t; the taps' fusion (a module parameter) trains here
    rec_sel = None if loss_mask is None else loss_mask[:, 2:]  # (B, T-2)
    rec_hidden = model.recycle(state, idx[:, 1:-1], num_logits=0).hidden  # (B, T-2, d)
    rec_logits = model.base.head(_select(rec_hidden, rec_sel)).float()  # (N, V)
    rec_targets = _select(idx[:, 2:], rec_sel)
    # The base's distribution for x_{t+2} is its output at position t+1: the lm rows with p >= 1, in the same
    # row-major order. A fixed teacher, so no gradient.
    from_pos1 = (torch.arange(T - 1, device=idx.device) >= 1).expand(B, T - 1)
    teacher_logits = logits[_select(from_pos1, lm_sel)].detach().float()

    def token_loss(logits: torch.Tensor, targets: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        terms = []
        if target in ("data", "both"):
            terms.append(_token_ce(logits, targets))
        if target in ("distill", "both"):
            # KL(p_base || q_module) per position, summed over the vocabulary
            log_q = F.log_softmax(logits, dim=-1)
            log_p = F.log_softmax(teacher, dim=-1)
            terms.append((log_p.exp() * (log_p - log_q)).sum(-1))
        return _mean(sum(terms) / len(terms))

    rec = token_loss(rec_logits, rec_targets, teacher_logits)
    rec_pred = rec_logits.argmax(-1)
    out["rec"] = rec.detach()  # the one-step loss; the deeper depths are reported as "roll"
    if rollout > 1:
        t_idx = torch.arange(T - 2, device=idx.device).expand(B, T - 2)
        state, losses, agree, n = rec_hidden.detach(), [], 0.0, 0
        for k in range(2, min(rollout, T - 2) + 1):
            # positions t = k-1..T-3 read (depth-(k-1) output at t-1, x_{t+1})
            out_k = model.recycle(state[:, :-1], idx[:, k:-1], num_logits=0).hidden
            deep = t_idx >= k - 1
            sub = _select(deep, rec_sel)  # which of depth 1's selected targets depth k also has
            logits_k = model.base.head(_select(F.pad(out_k, (0, 0, k - 1, 0)), deep if rec_sel is None
                                               else rec_sel & deep)).float()
            losses.append(token_loss(logits_k, rec_targets[sub], teacher_logits[sub]))
            agree = agree + (logits_k.argmax(-1) == teacher_logits[sub].argmax(-1)).float().sum()
            n = n + sub.sum()
            state = out_k.detach()
        if losses:
            roll = sum(losses) / len(losses)
            out["roll"] = roll.detach()
            out["roll_agree"] = agree / n.clamp(min=1)
            out["roll_tokens"] = n
            rec = rec + rollout_weight * roll

    if feature_weight > 0:
        norm = model.base.norm
        target_h = norm(_select(hidden[:, 1:-1], rec_sel)).detach().float()
        feat = _mean(F.smooth_l1_loss(norm(_select(rec_hidden, rec_sel)).float(), target_h, reduction="none").mean(-1))
        out["feat"] = feat.detach()
        rec = rec + feature_weight * feat
    out["rec_acc"] = _mean((rec_pred == rec_targets).float())
    out["rec_agree"] = _mean((rec_pred == teacher_logits.argmax(-1)).float())
    out["rec_tokens"] = torch.tensor(rec_targets.numel(), device=idx.device)
    out["loss"] = out["loss"] + lam * rec if train_base else rec
    return out
