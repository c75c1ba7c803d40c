"""chunked_loss.py: the loss on whole logits is the paper's formula; the same loss a chunk of tokens at a time, from
hidden states and head weights, equals it in value and in its gradients, and never holds (tokens, vocab) logits;
AST's training step computes exactly it."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import train_ast
from chunked_loss import head_loss, reference_loss
from cli import autocast
from model import ModelArgs, Transformer
from train_ast import ASTArgs


def test_reference_loss_is_the_papers_formula():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    y = torch.randint(0, 11, (2, 5))
    T, alpha = 2.0, 0.67
    p_s = torch.softmax(s.double() / T, -1)
    p_t = torch.softmax(t.double() / T, -1)
    forward_kl = (p_t * (p_t / p_s).log()).sum(-1).mean()  # KL(teacher ‖ student), summed over vocab, mean over tokens
    reverse_kl = (p_s * (p_s / p_t).log()).sum(-1).mean()
    ce = F.cross_entropy(s.reshape(-1, 11), y.reshape(-1))
    loss, ce_out, kl = reference_loss(s, y, t, alpha, T, "forward")
    torch.testing.assert_close(kl.double(), forward_kl, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss.double(), alpha * T * T * forward_kl + (1 - alpha) * ce.double(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(reference_loss(s, y, t, alpha, T, "reverse")[2].double(), reverse_kl, rtol=1e-5, atol=1e-7)
    assert reference_loss(s, y, None, alpha, T)[0] == ce_out  # no teacher: plain CE
    assert reference_loss(s, y, s, alpha, T)[2].abs() < 1e-6  # same distributions: KL 0


def problem(seed=0, B=2, T=11, d=16, V=37, ignore=False):
    """Hidden states and heads of a student and a teacher, targets (some -100 when ignore)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, d, generator=g).requires_grad_()
    w = (torch.randn(V, d, generator=g) * 0.5).requires_grad_()
    th, tw = torch.randn(B, T, d, generator=g), torch.randn(V, d, generator=g) * 0.5
    y = torch.randint(0, V, (B, T), generator=g)
    if ignore:
        y[0, :4] = -100  # a prompt without loss (PAT's instruction data)
    return h, w, th, tw, y


def reference(h, w, th, tw, y, alpha, T, kl, teacher=True):
    """(loss, ce, kl, grad_h, grad_w) of the loss on whole logits, by autograd."""
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss, ce, div = reference_loss(h @ w.T, y, th @ tw.T if teacher else None, alpha, T, kl)
    loss.backward()
    return loss, ce, div, h.grad, w.grad


@pytest.mark.parametrize("kl", ["forward", "reverse"])
@pytest.mark.parametrize("alpha, teacher, ignore", [(0.67, True, False), (0.0, True, False), (0.5, False, True)])
@pytest.mark.parametrize("chunk", [1, 4, 7, 22, 1000])  # T = 11, 2 rows: 4 and 7 divide neither, 1000 > all
def test_chunked_loss_and_gradients_equal_the_whole_logits_loss(kl, alpha, teacher, ignore, chunk):
    """Forward and reverse KL, α = 0 (CE only, teacher present), no teacher with -100 targets (PAT's CE)."""
    h, w, th, tw, y = problem(ignore=ignore)
    ref_loss, ref_ce, ref_kl, ref_gh, ref_gw = reference(h, w, th, tw, y, alpha, 2.0, kl, teacher)
    loss, ce, div = head_loss(h, w, y, th if teacher else None, tw if teacher else None, alpha, 2.0, kl, chunk=chunk)
    (3.0 * loss).backward()  # an incoming gradient other than 1 reaches both gradients
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce, ref_ce, rtol=1e-5, atol=1e-6)
    assert (div is None) == (ref_kl is None)
    if div is not None:
        torch.testing.assert_close(div, ref_kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, 3.0 * ref_gh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.grad, 3.0 * ref_gw, rtol=1e-5, atol=1e-7)


def test_bf16_compute_matches_autocast_on_whole_logits():
    """dtype=bfloat16: the head matmuls in bf16 as autocast runs them, the loss math in fp32."""
    h, w, th, tw, y = problem(d=32, V=64)
    hr, wr = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    with autocast(torch.bfloat16, "cpu"):
        logits, t_logits = F.linear(hr, wr).float(), F.linear(th, tw).float()
    ref = reference_loss(logits, y, t_logits, 0.67, 2.0)
    ref[0].backward()
    loss, ce, div = head_loss(h, w, y, th, tw, 0.67, 2.0, dtype=torch.bfloat16, chunk=5)
    loss.backward()
    torch.testing.assert_close(loss, ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad, hr.grad, rtol=2e-2, atol=1e-4)  # bf16 matmuls, summed in another order
    torch.testing.assert_close(w.grad, wr.grad, rtol=2e-2, atol=1e-4)


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op returns while the mode is on."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.numel = max([self.numel, *(t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor))])
        return out


@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_no_tensor_holds_all_tokens_logits(kl):
    """Every intermediate is at most (chunk, V), (V, d) or (tokens, d): never (tokens, V)."""
    B, T, d, V, chunk = 4, 32, 8, 96, 16
    h, w, th, tw, y = problem(B=B, T=T, d=d, V=V)
    with LargestTensor() as largest:
        loss, _, _ = head_loss(h, w, y, th, tw, 0.67, 2.0, kl, chunk=chunk)
        loss.backward()
    assert largest.numel <= max(chunk * V, V * d, B * T * d) < B * T * V


def test_ast_training_loss_is_the_papers_loss_on_the_models_logits():
    """train_ast.ast_loss from the models equals reference_loss on their whole logits, gradients included."""
    def tiny(seed):
        torch.manual_seed(seed)
        return Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=50, hidden_dim=64))
    student, teacher = tiny(0), tiny(1).requires_grad_(False)
    x, y = torch.randint(0, 50, (2, 9)), torch.randint(0, 50, (2, 9))
    args = ASTArgs(alpha=0.67, temperature=2.0, kl="reverse")
    loss, ce, kl = train_ast.ast_loss(student, teacher, x, y, args, torch.float32)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    ref = reference_loss(student(x), y, teacher(x), 0.67, 2.0, "reverse")
    ref[0].backward()
    torch.testing.assert_close(torch.stack([loss, ce, kl]), torch.stack(ref), rtol=1e-5, atol=1e-6)
    for n, p in student.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
