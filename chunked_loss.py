"""The language-model loss from the final hidden states, in chunks of tokens: α·T²·KL + (1 − α)·CE against a
teacher (AST's distillation loss, arXiv 2407.20584), or plain CE, without ever holding the (tokens, vocab) logits.

Whole logits cost B·T·V floats each, and a loss on them keeps several: at 2 × 4096 tokens and a 128k vocabulary
one fp32 copy is 4.2 GB. Here the LM head runs on `chunk` tokens at a time, and the same pass computes the
loss's gradient w.r.t. the hidden states and the head weight (softmax − one-hot, p_s − p_t, ...); backward only
scales them. Peak extra memory: a few (chunk, V) fp32 buffers plus the head's gradient (bench/bench_ast_loss.py).

    hidden = model(x, return_hidden=True)                                       # (B, T, dim)
    loss, ce, _ = head_loss(hidden, model.output.weight, y)                     # CE, targets -100 ignored
    loss, ce, kl = head_loss(hidden, model.output.weight, y, teacher_hidden, teacher.output.weight,
                             alpha=0.67, temperature=2.0, kl="forward", dtype=torch.bfloat16)

`reference_loss` is the same loss on whole logits: the definition the chunked one is tested against.
"""
import torch
import torch.nn.functional as F

CHUNK = 512  # tokens per chunk: about five (chunk, vocab) fp32 buffers live at once, 0.26 GB each at a 128k vocabulary
IGNORE = -100  # a target without a loss (prompt tokens), as F.cross_entropy's ignore_index


def reference_loss(logits, targets, teacher_logits=None, alpha=0.0, temperature=1.0, kl="forward"):
    """α·T²·KL + (1 − α)·CE on whole logits (B, T, V): KL summed over the vocabulary and averaged over tokens, CE
    averaged over tokens whose target is not -100; plain CE without a teacher. Returns (loss, ce, kl or None)."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)
    if teacher_logits is None:
        return ce, ce, None
    log_s = F.log_softmax(logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kl == "forward":  # KL(p_teacher ‖ p_student)
        div = (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    elif kl == "reverse":  # KL(p_student ‖ p_teacher)
        div = (log_s.exp() * (log_s - log_t)).sum(-1).mean()
    else:
        raise ValueError(f"kl={kl!r}: use forward or reverse")
    return alpha * temperature ** 2 * div + (1 - alpha) * ce, ce, div


def head_loss(hidden, weight, targets, teacher_hidden=None, teacher_weight=None, alpha=0.0, temperature=1.0,
              kl="forward", dtype=None, chunk=CHUNK):
    """reference_loss(hidden @ weightᵀ, targets, teacher_hidden @ teacher_weightᵀ, ...) computed `chunk` tokens at
    a time, each head matmul in `dtype` (the compute dtype; default the weight's) and the loss math in fp32.
    Gradients reach hidden and weight; the teacher gets none. Returns (loss, ce, kl or None)."""
    if kl not in ("forward", "reverse"):
        raise ValueError(f"kl={kl!r}: use forward or reverse")
    grads = torch.is_grad_enabled() and hidden.requires_grad, torch.is_grad_enabled() and weight.requires_grad
    loss, ce, div = _HeadLoss.apply(hidden, weight, targets, teacher_hidden, teacher_weight, alpha, temperature, kl,
                                    dtype or weight.dtype, chunk, grads)
    return loss, ce, (div if teacher_hidden is not None else None)


class _HeadLoss(torch.autograd.Function):
    """Forward: the loss and, chunk by chunk, its gradient w.r.t. hidden and weight (a chunk's logits are freed
    before the next chunk's exist); backward: those gradients times the incoming one (the loss is a scalar)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, teacher_hidden, teacher_weight, alpha, T, kl, dtype, chunk, grads):
        h, y, n = hidden.flatten(0, -2), targets.flatten(), targets.numel()
        teacher = teacher_hidden is not None
        w = weight.to(dtype)  # one cast for all chunks (none when the weight is already in the compute dtype)
        th, t_w = (teacher_hidden.flatten(0, -2), teacher_weight.to(dtype)) if teacher else (None, None)
        n_ce = (y != IGNORE).sum()  # a tensor: no host sync
        ce_weight = (1 - alpha) if teacher else 1.0
        ce_sum, kl_sum = h.new_zeros((), dtype=torch.float32), h.new_zeros((), dtype=torch.float32)
        grad_h = torch.zeros_like(h) if grads[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grads[1] else None
        with torch.autocast(h.device.type, enabled=False):  # dtypes are explicit here
            for i in range(0, h.shape[0], chunk):
                h_c, y_c = h[i:i + chunk].to(dtype), y[i:i + chunk]
                keep = (y_c != IGNORE)[:, None].float()
                y_safe = y_c.clamp(min=0)[:, None]  # -100 -> 0, then weighted by keep = 0
                s = F.linear(h_c, w).float()  # (chunk, V) student logits
                lse = s.logsumexp(-1, keepdim=True)
                ce_sum += ((lse - s.gather(1, y_safe)) * keep).sum()
                g = (s - lse).exp_()  # softmax(s); d CE / d s = softmax − one-hot(target)
                g.scatter_add_(1, y_safe, -keep).mul_(keep * (ce_weight / n_ce))
                if teacher:
                    log_s = F.log_softmax(s.div_(T), -1)
                    del s
                    log_t = F.log_softmax(F.linear(th[i:i + chunk].to(dtype), t_w).float().div_(T), -1)
                    if kl == "forward":  # Σ p_t (log p_t − log p_s); d/d(s/T) = p_s − p_t
                        p = log_t.exp()  # p_t
                        kl_sum += (log_t - log_s).mul_(p).sum()
                        d = log_s.exp_().sub_(p)
                    else:  # Σ p_s (log p_s − log p_t); d/d(s/T) = p_s ⊙ (log p_s − log p_t − KL_row)
                        p = log_s.exp()  # p_s
                        diff = log_s.sub_(log_t)
                        row = (p * diff).sum(-1, keepdim=True)
                        kl_sum += row.sum()
                        d = p.mul_(diff.sub_(row))
                    g.add_(d, alpha=alpha * T / n)  # α·T² · (1/T) · d, averaged over tokens
                    del log_s, log_t, d, p  # at most five (chunk, V) buffers were alive
                g = g.to(dtype)  # the head's backward for this chunk, in the compute dtype as autocast runs it
                if grad_h is not None:
                    grad_h[i:i + chunk] = g @ w
                if grad_w is not None and dtype == torch.float32:
                    grad_w.addmm_(g.mT, h_c)
                elif grad_w is not None:
                    grad_w += g.mT @ h_c  # summed over chunks in fp32
        ce = ce_sum / n_ce
        div = kl_sum / n
        loss = alpha * T ** 2 * div + ce_weight * ce if teacher else ce.clone()  # its own tensor: ce gets no grad
        ctx.mark_non_differentiable(ce, div)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.hidden_meta = hidden.shape, hidden.dtype
        ctx.weight_dtype = weight.dtype
        return loss, ce, div

    @staticmethod
    def backward(ctx, grad_loss, _ce, _kl):
        grad_h, grad_w = ctx.saved_tensors
        shape, h_dtype = ctx.hidden_meta
        return (grad_h.mul_(grad_loss).view(shape).to(h_dtype) if grad_h is not None else None,
                grad_w.mul_(grad_loss).to(ctx.weight_dtype) if grad_w is not None else None,
                None, None, None, None, None, None, None, None, None)
