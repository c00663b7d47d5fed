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


HEAD_CHUNK = 2048  # rows of V-wide logits a chunked head loss holds at once


class _HeadKL(torch.autograd.Function):
    """Mean over rows of KL(softmax(t W^T) || softmax(s W^T)) for normed states s (student, with gradient) and t
    (teacher) and a frozen head W, `chunk` rows at a time: the (N, V) logits of either side never exist whole.
    The forward keeps the gradient (q - p) W / N of each chunk (N x d, not N x V), so the backward is a scale.
    Also returns both sides' argmax per row (for agreement), which carry no gradient."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, t: torch.Tensor, weight: torch.Tensor, chunk: int):
        n = s.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=s.device)
        want_grad = ctx.needs_input_grad[0]  # not in evaluation
        grad = torch.empty(s.shape if want_grad else (0,), dtype=torch.float32, device=s.device)
        s_arg = torch.empty(n, dtype=torch.long, device=s.device)
        t_arg = torch.empty(n, dtype=torch.long, device=s.device)
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            z = (s[a:b].to(weight.dtype) @ weight.t()).float()
            log_q = torch.log_softmax(z, dim=-1)
            log_p = torch.log_softmax((t[a:b].to(weight.dtype) @ weight.t()).float(), dim=-1)
            p = log_p.exp()
            total += (p * (log_p - log_q)).sum()
            if want_grad:
                grad[a:b] = ((log_q.exp() - p).to(weight.dtype) @ weight).float()
            s_arg[a:b], t_arg[a:b] = z.argmax(-1), log_p.argmax(-1)
        scale = 1.0 / max(n, 1)
        ctx.save_for_backward(grad)
        ctx.scale, ctx.dtype = scale, s.dtype
        ctx.mark_non_differentiable(s_arg, t_arg)
        return total * scale, s_arg, t_arg

    @staticmethod
    def backward(ctx, g: torch.Tensor, *_):
        (grad,) = ctx.saved_tensors
        return (grad * (g * ctx.scale)).to(ctx.dtype), None, None, None


def head_kl(base: Transformer, student: torch.Tensor, teacher: torch.Tensor, chunk: int = HEAD_CHUNK
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KL(p_teacher || q_student) averaged over rows, where each side's distribution is the base's final norm and
    frozen LM head over its pre-norm hidden states (N, d), chunked (_HeadKL); with each side's argmax per row.
    The products run in the head's dtype (bf16 for a bf16 base, as under autocast), the softmaxes in float32."""
    with torch.no_grad():
        t = base.norm(teacher)
    return _HeadKL.apply(base.norm(student), t, base.lm_head.weight, chunk)


def lm_losses(base: Transformer, idx: torch.Tensor, *,
              loss_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The base alone (the no-module baseline): {"loss", "lm", "lm_acc", "lm_tokens"} for idx (B, T)."""
    sel = None if loss_mask is None else loss_mask[:, 1:]
    logits = base.head(_select(base(idx, num_logits=0).hidden[:, :-1], sel))
    return _lm_terms(logits, _select(idx[:, 1:], sel), with_grad=True)


def _lm_terms_chunked(base: Transformer, rows: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """_lm_terms of a frozen base, without gradient, from its pre-norm rows (N, d), HEAD_CHUNK rows at a time."""
    ce = torch.zeros((), dtype=torch.float32, device=rows.device)
    hits = torch.zeros((), dtype=torch.float32, device=rows.device)
    with torch.no_grad():
        for a in range(0, rows.shape[0], HEAD_CHUNK):
            logits = base.head(rows[a:a + HEAD_CHUNK]).float()
            ce += _token_ce(logits, targets[a:a + HEAD_CHUNK]).sum()
            hits += (logits.argmax(-1) == targets[a:a + HEAD_CHUNK]).float().sum()
    n = max(targets.numel(), 1)
    lm = ce / n
    return {"lm": lm, "lm_acc": hits / n, "lm_tokens": torch.tensor(targets.numel(), device=targets.device),
            "loss": lm}


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
    base = model.base
    # a frozen head distilling: the V-wide logits are made chunk by chunk and never kept (head_kl)
    chunked = target == "distill" and not train_base
    with torch.set_grad_enabled(train_base and torch.is_grad_enabled()):
        full = base(idx, num_logits=0, taps=model.taps)
        hidden = full.hidden  # (B, T, d) pre-norm
        # The head (d -> V, the largest matrix of a small model) runs only where there is a target: position p
        # predicts x_{p+1}, so the selection is loss_mask shifted by one.
        lm_sel = None if loss_mask is None else loss_mask[:, 1:]  # (B, T-1)
        lm_rows = _select(hidden[:, :-1], lm_sel)
        lm_targets = _select(idx[:, 1:], lm_sel)
        if chunked:
            out = _lm_terms_chunked(base, lm_rows, lm_targets)
        else:
            logits = base.head(lm_rows)  # (N_lm, V)
            out = _lm_terms(logits, lm_targets, with_grad=train_base)

    # module at t = 0..T-3 reads h_t and x_{t+1} and predicts x_{t+2}; its targets are where loss_mask[:, 2:] holds
    if detach_hidden or not train_base:
        full = full._replace(hidden=hidden.detach(), taps=None if full.taps is None else full.taps.detach())
    state = model.state(full)[:, :-2]  # s_t; the taps' fusion (a module parameter) trains here
    rec_sel = None if loss_mask is None else loss_mask[:, 2:]  # (B, T-2)
    rec_hidden = model.recycle(state, idx[:, 1:-1], num_logits=0).hidden  # (B, T-2, d)
    rec_targets = _select(idx[:, 2:], rec_sel)
    # The base's distribution for x_{t+2} is its output at position t+1, the same rows of the lm selection with
    # p >= 1. A fixed teacher, so no gradient.
    if chunked:
        teacher_rows = _select(hidden[:, 1:-1], rec_sel).detach()
    else:
        from_pos1 = (torch.arange(T - 1, device=idx.device) >= 1).expand(B, T - 1)
        teacher_logits = logits[_select(from_pos1, lm_sel)].detach().float()

    def token_loss(rows: torch.Tensor, targets: torch.Tensor, sub: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The loss over the module's output rows (pre-norm) for `targets`, against the teacher's rows `sub` (all
        when None); with the module's and the teacher's argmax per row."""
        if chunked:
            return head_kl(base, rows, teacher_rows if sub is None else teacher_rows[sub])
        logits = base.head(rows).float()
        teacher = teacher_logits if sub is None else teacher_logits[sub]
        terms = []
        if target in ("data", "both"):
            terms.append(_token_ce(logits, targets))
        if target in ("distill", "both"):
            # KL(p_base || q_module) per position, summed over the vocabulary
            log_q = F.log_softmax(logits, dim=-1)
            log_p = F.log_softmax(teacher, dim=-1)
            terms.append((log_p.exp() * (log_p - log_q)).sum(-1))
        return _mean(sum(terms) / len(terms)), logits.argmax(-1), teacher.argmax(-1)

    rec, rec_pred, teacher_pred = token_loss(_select(rec_hidden, rec_sel), rec_targets)
    out["rec"] = rec.detach()  # the one-step loss; the deeper depths are reported as "roll"
    if rollout > 1:
        t_idx = torch.arange(T - 2, device=idx.device).expand(B, T - 2)
        state, losses, agree, n = rec_hidden.detach(), [], 0.0, 0
        for k in range(2, min(rollout, T - 2) + 1):
            # positions t = k-1..T-3 read (depth-(k-1) output at t-1, x_{t+1})
            out_k = model.recycle(state[:, :-1], idx[:, k:-1], num_logits=0).hidden
            deep = t_idx >= k - 1
            sub = _select(deep, rec_sel)  # which of depth 1's selected targets depth k also has
            rows_k = _select(F.pad(out_k, (0, 0, k - 1, 0)), deep if rec_sel is None else rec_sel & deep)
            loss_k, pred_k, teacher_k = token_loss(rows_k, rec_targets[sub], sub)
            losses.append(loss_k)
            agree = agree + (pred_k == teacher_k).float().sum()
            n = n + sub.sum()
            state = out_k.detach()
        if losses:
            roll = sum(losses) / len(losses)
            out["roll"] = roll.detach()
            out["roll_agree"] = agree / n.clamp(min=1)
            out["roll_tokens"] = n
            rec = rec + rollout_weight * roll

    if feature_weight > 0:
        norm = base.norm
        target_h = norm(_select(hidden[:, 1:-1], rec_sel)).detach().float()
        feat = _mean(F.smooth_l1_loss(norm(_select(rec_hidden, rec_sel)).float(), target_h, reduction="none").mean(-1))
        out["feat"] = feat.detach()
        rec = rec + feature_weight * feat
    out["rec_acc"] = _mean((rec_pred == rec_targets).float())
    out["rec_agree"] = _mean((rec_pred == teacher_pred).float())
    out["rec_tokens"] = torch.tensor(rec_targets.numel(), device=idx.device)
    out["loss"] = out["loss"] + lam * rec if train_base else rec
    return out
