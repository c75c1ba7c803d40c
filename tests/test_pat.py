"""PAT: exact start, mask schedule and count, Identity Loss over every HSM, exact merge, resume."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import pat as pat_method
import train_pat
from model import ModelArgs, Transformer
from pat import PAT, HSM, mask_schedule, merge, prune_channels, target_width


def tiny(tie=False, eps=1e-5, seed=0, **kw):
    torch.manual_seed(seed)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=258, hidden_dim=96,
                     norm_eps=eps, max_seq_len=64, tie_embeddings=tie, **kw)
    model = Transformer(args).eval()
    with torch.no_grad():  # non-trivial norm gains, so the sqrt(d/d') rescale is exercised on real values
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def tokens(batch=2, length=16, vocab=258, seed=1):
    return torch.randint(vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomize(pat, scale=0.3):
    """Trained-looking adapters: LoRA B, L1, v and s all away from their identity initialisation."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for lora in pat.lora.values():
            lora.B.copy_(torch.randn(lora.B.shape, generator=g) * 0.05)
        for hsm in pat.hsms.values():
            if hsm.rank:
                hsm.L1.copy_(torch.randn(hsm.L1.shape, generator=g) * scale)
                hsm.v.copy_(1 + torch.randn(hsm.v.shape, generator=g) * 0.2)
                hsm.s.copy_(1 + torch.randn(hsm.s.shape, generator=g) * 0.2)


def hard_mask(pat, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        pat.mask_logits.copy_(torch.randn(pat.dim, generator=g))
    pat.set_step(pat.milestone)
    assert bool(pat.hard) and int(pat.keep.sum()) == pat.n_open


def test_target_width():
    assert target_width(576, 0.25, 8) == 432  # SmolLM2-135M
    assert target_width(4096, 0.25, 8) == 3072  # Llama-2-7B, as in the paper
    assert target_width(4096, 0.2, 8) == 3280  # round(3276.8) = 3277 -> nearest multiple of 8
    assert target_width(64, 0.25, 1) == 48 and target_width(64, 0.3, 8) == 48


def test_mask_schedule():
    s0 = 90
    taus, betas = zip(*(mask_schedule(s, s0) for s in range(s0)))
    assert taus[0] == taus[1] == 1.0 and betas[0] == 0.5
    assert all(a < b for a, b in zip(taus[1:], taus[2:]))  # temperature grows toward infinity at s0
    assert betas[s0 // 2] == 0.0 and betas[s0 - 1] == 0.0 and betas[10] == pytest.approx(0.5 - 10 / 90)
    assert taus[-1] > 100


@pytest.mark.parametrize("tie", [False, True])
def test_fresh_hsms_give_exactly_the_original_logits(tie):
    model = tiny(tie=tie)
    x = tokens()
    with torch.no_grad():
        ref = model(x)
        pat = PAT(model, ratio=0.25, milestone=10, hsm_rank=8, lora_rank=4)
        assert len(pat.hsms) == 2 * 2 + 1 and len(pat.lora) == 7 * 2
        assert torch.equal(pat.mask(), torch.ones(64))  # sigmoid(0) + 0.5
        assert torch.equal(pat(x), ref)
        # and no side effect on the frozen model: every base weight still needs no gradient
        assert not any(p.requires_grad for p in model.parameters())


def test_identity_loss_includes_every_hsm():
    """Regression for the official code, whose loop keeps only the last layer's Identity Loss."""
    pat = PAT(tiny(), ratio=0.25, milestone=10, hsm_rank=8)
    hsms = [h for h in pat.hsms.values() if h.rank]
    assert len(hsms) == 5  # embedding + 2 attention + 2 MLP outputs
    # every HSM gets a gradient from the Identity Loss
    pat.identity_loss().backward()
    for name, hsm in pat.hsms.items():
        assert hsm.L0.grad is not None and hsm.L0.grad.abs().sum() > 0, name
    # with every operator orthonormal the loss is 0; breaking any single one of them raises it
    with torch.no_grad():
        for hsm in hsms:
            q = torch.linalg.qr(torch.randn(64, 8))[0]
            hsm.L0.copy_(q.T)
            hsm.L1.copy_(q)
    assert float(pat.identity_loss().detach()) < 1e-5
    for i, hsm in enumerate(hsms):
        with torch.no_grad():
            saved = hsm.L0.clone()
            hsm.L0.mul_(2)
        assert float(pat.identity_loss().detach()) > 0.1, f"HSM {i} is not in the Identity Loss"
        with torch.no_grad():
            hsm.L0.copy_(saved)


def test_mask_schedule_freezes_tau_at_the_freeze_step():
    """The official code stops tau at 0.8 s0 (DimDownModule.py); beta follows the real step (0 by then)."""
    s0, freeze = 50, 40
    taus = [mask_schedule(s, s0, freeze)[0] for s in range(s0)]
    assert taus[:freeze + 1] == [mask_schedule(s, s0)[0] for s in range(freeze + 1)]
    assert all(t == taus[freeze] for t in taus[freeze:]) and taus[freeze] > taus[freeze - 1]
    assert mask_schedule(45, s0, freeze)[1] == 0.0 and mask_schedule(10, s0, freeze)[1] == pytest.approx(0.3)


def test_hardening_keeps_exactly_the_top_n_logits():
    pat = PAT(tiny(), ratio=0.25, milestone=10, hsm_rank=4, lora_rank=0)
    logits = torch.randn(64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        pat.mask_logits.copy_(logits)
    pat.set_step(9)
    assert not pat.is_hard
    pat.set_step(10)
    assert pat.is_hard and bool(pat.hard)
    assert set(pat.keep.nonzero().squeeze(1).tolist()) == set(logits.argsort(descending=True)[:48].tolist())
    assert torch.equal(pat.mask(), pat.keep.float())


def test_count_treats_a_zero_logit_as_open():
    """The official binarize is w >= 0: logits start at exactly 0, so the first count sees every channel open."""
    pat = PAT(tiny(), ratio=0.25, milestone=10, hsm_rank=4, lora_rank=0)
    count_loss, polar = pat.mask_losses()
    assert pat.n_open_now() == 64 and float(count_loss.detach()) == pytest.approx((64 - 48) / 48)
    count_loss.backward()  # the straight-through estimator: every logit gets d|count - N|/N / dw = +1/N
    torch.testing.assert_close(pat.mask_logits.grad, torch.full((64,), 1 / 48))


def test_identity_loss_is_the_sum_of_both_terms_over_every_hsm():
    """||L0 L0^T - I|| + ||L1^T L1 - I|| per HSM, summed over HSMs (the paper); each term on its own."""
    pat = PAT(tiny(), ratio=0.25, milestone=10, hsm_rank=8)
    hsms = [h for h in pat.hsms.values() if h.rank]
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for i, hsm in enumerate(hsms):
            q = torch.linalg.qr(torch.randn(64, 8, generator=g))[0]
            hsm.L0.copy_(q.T)  # orthonormal rows: the L0 term is 0
            hsm.L1.copy_(q * (i + 2))  # L1^T L1 = (i + 2)^2 I: only the L1 term is left
    expected = sum(((i + 2) ** 2 - 1) * 8 ** 0.5 for i in range(len(hsms)))
    assert float(pat.identity_loss().detach()) == pytest.approx(expected, rel=1e-4)
    with torch.no_grad():
        for hsm in hsms:
            hsm.L1.copy_(hsm.L0.T)
            hsm.L0.mul_(3)
    assert float(pat.identity_loss().detach()) == pytest.approx(len(hsms) * 8 * 8 ** 0.5, rel=1e-4)


def test_after_the_freeze_the_task_loss_no_longer_moves_the_mask():
    """From freeze_at * s0 only the count and polarisation terms reach the logits (official: mask.detach())."""
    pat = PAT(tiny(), ratio=0.25, milestone=10, hsm_rank=4, lora_rank=4, freeze_at=0.8)
    with torch.no_grad():
        pat.mask_logits.copy_(torch.randn(64, generator=torch.Generator().manual_seed(8)) * 0.3)
    x = tokens()
    for step, moves in ((7, True), (8, False), (9, False)):
        pat.set_step(step)
        pat.mask_logits.grad = None
        pat(x).logsumexp(-1).mean().backward()
        grad = pat.mask_logits.grad
        assert (grad is not None and grad.abs().sum() > 0) == moves, step
    tau = float(pat.tau)
    pat.set_step(9)
    assert float(pat.tau) == tau == pytest.approx(mask_schedule(8, 10)[0])


def test_soft_mask_is_near_binary_before_the_milestone_so_hardening_costs_little():
    """Trained with the official weights, the soft mask at s0 - 1 is nearly binary with about N channels open,
    and switching to the hard top-N mask at s0 changes the masked model's loss by little (no cliff)."""
    model = tiny(seed=2)
    s0 = 100  # with zero logits the count loss moves all of them together; they need ~100 steps at 0.05 to spread
    pat = PAT(model, ratio=0.25, milestone=s0, hsm_rank=4, lora_rank=4)
    opt = torch.optim.AdamW([{"params": [pat.mask_logits], "lr": 0.05},
                             {"params": [p for n, p in pat.named_parameters() if n != "mask_logits" and p.requires_grad],
                              "lr": 3e-3}], weight_decay=0.0)
    x = tokens(4, 17, seed=9)
    for step in range(s0):
        pat.set_step(step)
        task = F.cross_entropy(pat(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        count_loss, polar = pat.mask_losses()
        (task + 10 * count_loss + polar + pat.identity_loss()).backward()
        opt.step()
        opt.zero_grad()
    pat.set_step(s0 - 1)  # the last soft step, with the weights as they enter s0
    with torch.no_grad():
        soft = pat.mask()
        loss_soft = float(F.cross_entropy(pat(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()))
        pat.set_step(s0)
        loss_hard = float(F.cross_entropy(pat(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()))
    assert int(((soft > 0.02) & (soft < 0.98)).sum()) <= 2, soft
    assert abs(int((soft > 0.5).sum()) - pat.n_open) <= 2
    assert abs(loss_hard - loss_soft) < 0.01 * loss_soft, (loss_soft, loss_hard)


def test_forward_and_losses_read_nothing_back_from_the_device(monkeypatch):
    """Soft, frozen and hard phases: no .item() / bool / int / float of a tensor (each is a GPU host sync), and
    tau, beta are tensors updated in place (a compiled model sees the same graph at every soft step)."""
    pat = PAT(tiny(), ratio=0.25, milestone=10, hsm_rank=4, lora_rank=4)
    tau = pat.tau
    x = tokens()

    def sync(*args):
        raise AssertionError("host sync")
    for step in (3, 8, 10):  # soft, frozen, hard
        pat.set_step(step)
        with monkeypatch.context() as m:
            for name in ("item", "__bool__", "__int__", "__float__", "tolist"):
                m.setattr(torch.Tensor, name, sync)
            count_loss, polar = pat.mask_losses()
            (pat(x).float().logsumexp(-1).mean() + count_loss + polar + pat.identity_loss()).backward()
    assert pat.tau is tau and float(tau) == pytest.approx(mask_schedule(8, 10)[0])


def test_soft_steps_do_not_recompile_a_compiled_model():
    """tau and beta are tensors updated in place and the phase flags flip once, so torch.compile traces the soft
    phase once (a Python-float tau recompiled at every step). backend="eager": dynamo's tracing only, no codegen."""
    torch._dynamo.reset()
    counters.clear()
    pat = PAT(tiny(), ratio=0.25, milestone=10, hsm_rank=4, lora_rank=4)
    pat.compile(backend="eager")
    graphs = []
    with torch.no_grad():
        for step in range(2, 6):  # soft steps, tau changing at each
            pat.set_step(step)
            pat(tokens())
            graphs.append(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    assert graphs[1:] == [graphs[1]] * 3, graphs  # the second call may add one graph (the mask attribute is set)


def test_mask_init_rms_opens_exactly_the_n_largest_channels():
    """--mask-init rms (ours): N logits >= 0, on the channels of largest residual norm; |w| <= 1/2; all else equal,
    a channel's logit grows with its norm. The norms are sqrt(sum x^2) over every RMSNorm input."""
    model = tiny()
    x = tokens(3, 16)
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach())) for n, m in model.named_modules()
             if n.endswith("norm")]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    assert len(seen) == 2 * 2 + 1  # attention and ffn norms per layer, then the final norm
    norms = pat_method.residual_channel_norms(model, [x[:2], x[2:]])
    torch.testing.assert_close(norms, sum(s.pow(2).sum((0, 1)) for s in seen).sqrt())
    pat = PAT(model, ratio=0.25, milestone=10, hsm_rank=4, lora_rank=0)
    pat_method.init_mask_from_norms(pat, norms)
    w = pat.mask_logits.detach()
    assert pat.n_open_now() == 48 and w.abs().max() <= 0.5
    assert set((w >= 0).nonzero().squeeze(1).tolist()) == set(norms.argsort(descending=True)[:48].tolist())
    order = norms.argsort()
    assert (w[order].diff() >= 0).all()


def test_one_shot_prune_is_the_untrained_pat_under_that_mask_and_leaves_the_model_alone():
    """The baseline beside PAT: prune_channels equals an untrained PAT under the same hard mask (LoRA B = 0, HSMs
    the identity), removes the channels not kept, and takes its hooks away again."""
    model = tiny(tie=True, eps=1e-2)
    x = tokens()
    with torch.no_grad():
        dense = model(x)
    keep = pat_method.top_n(torch.randn(64, generator=torch.Generator().manual_seed(2)), 48)
    pruned = prune_channels(model, keep)
    assert pruned.args.dim == 48 and pruned.args.tie_embeddings
    torch.testing.assert_close(pruned.tok_embeddings.weight, model.tok_embeddings.weight[:, keep])
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense, atol=0, rtol=0)  # no hook left behind
    pat = PAT(model, ratio=0.25, milestone=10, hsm_rank=4, lora_rank=4)
    pat.set_hard_mask(keep)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), atol=1e-4, rtol=1e-4)
        assert (pruned(x) - dense).abs().max() > 1e-2  # and the prune did change the function


def test_mask_count_converges_to_target():
    """Count loss with the straight-through estimator brings the open channels to N before s0; then exactly N."""
    model = tiny(seed=2)
    s0, steps = 48, 56
    pat = PAT(model, ratio=0.25, milestone=s0, hsm_rank=4, lora_rank=4)
    opt = torch.optim.AdamW([{"params": [pat.mask_logits], "lr": 0.02},
                             {"params": [p for n, p in pat.named_parameters() if n != "mask_logits" and p.requires_grad],
                              "lr": 1e-3}], weight_decay=0.0)
    x = tokens(4, 16, seed=7)
    opens = []
    for step in range(steps):
        pat.set_step(step)
        logits = pat(x[:, :-1])
        task = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        count_loss, polar = pat.mask_losses()
        (task + 10 * count_loss + polar + pat.identity_loss()).backward()  # the official weights
        opt.step()
        opt.zero_grad()
        opens.append(pat.n_open_now())
    n = pat.n_open
    assert n == 48
    assert opens[0] in (0, 64)  # all logits move together at first
    assert all(abs(o - n) <= 2 for o in opens[s0 - 10:s0]), opens  # tracks N in the late soft phase
    assert all(o == n for o in opens[s0:])  # the hard mask keeps exactly N
    assert torch.equal(pat.mask(), pat.keep.float())


@pytest.mark.parametrize("tie,keep_tied", [(False, True), (True, True), (True, False)])
def test_merged_equals_masked_model(tie, keep_tied):
    """LoRA, HSM operators with scales != 1, the hard mask and eps > 0 all fold in to fp32 rounding."""
    model = tiny(tie=tie, eps=1e-2)  # a large eps: the eps * d/d' rescale must be right, not negligible
    pat = PAT(model, ratio=0.25, milestone=10, hsm_rank=8, lora_rank=4, keep_tied=keep_tied)
    randomize(pat)
    hard_mask(pat)
    x = tokens()
    with torch.no_grad():
        ref = pat(x)
        merged = merge(pat)
        out = merged(x)
    assert merged.args.dim == 48 and merged.args.head_dim == 16 and merged.args.n_heads * merged.args.head_dim == 64
    assert merged.args.norm_eps == pytest.approx(1e-2 * 64 / 48)
    assert merged.tok_embeddings.weight.shape == (258, 48)
    assert merged.layers[0].attention.wq.weight.shape == (64, 48)
    assert merged.layers[0].attention.wo.weight.shape == (48, 64)
    assert merged.layers[0].feed_forward.w2.weight.shape == (48, 96)
    assert (merged.output.weight is merged.tok_embeddings.weight) == (tie and keep_tied)
    assert (ref - out).abs().max() < 1e-4 * ref.abs().max(), (ref - out).abs().max()
    # the merge does not touch the unmerged model
    with torch.no_grad():
        assert torch.equal(pat(x), ref)


def test_merge_without_the_eps_rescale_would_differ():
    """The eps * d/d' rescale is needed: keeping eps changes the logits far beyond rounding."""
    model = tiny(eps=1e-2)
    pat = PAT(model, ratio=0.25, milestone=10, hsm_rank=8, lora_rank=4)
    randomize(pat)
    hard_mask(pat)
    x = tokens()
    with torch.no_grad():
        ref = pat(x)
        merged = merge(pat)
        exact = (merged(x) - ref).abs().max()
        for m in merged.modules():
            if hasattr(m, "eps"):
                m.eps = 1e-2
        wrong = (merged(x) - ref).abs().max()
    assert wrong > 100 * exact


def test_lora_only_merge_is_exact():
    """--ratio 0: plain LoRA fine-tuning, merged at the same width."""
    model = tiny(tie=True)
    pat = PAT(model, ratio=0.0, lora_rank=4)
    assert not pat.prunes and len(pat.hsms) == 0
    randomize(pat)
    x = tokens()
    with torch.no_grad():
        ref = pat(x)
        merged = merge(pat)
        assert merged.args.dim == 64 and merged.output.weight is merged.tok_embeddings.weight
        assert (merged(x) - ref).abs().max() < 1e-4 * ref.abs().max()


def test_hsm_operator_matches_forward():
    hsm = HSM(16, 4)
    with torch.no_grad():
        hsm.L1.normal_()
        hsm.s.uniform_(0.5, 2)
        hsm.v.uniform_(0.5, 2)
    y = torch.randn(3, 16)
    torch.testing.assert_close(hsm(y), y @ hsm.operator().T)


def byte_tokenizer():
    from tokenizer import GPT2_PATTERN, TiktokenTokenizer
    return TiktokenTokenizer({bytes([i]): i for i in range(256)}, {"<s>": 256, "</s>": 257}, GPT2_PATTERN,
                             bos_id=256, eos_id=257, add_bos=True, specials_in_text=False, name="bytes")


def test_merged_checkpoint_loads_and_runs_at_the_smaller_width(tmp_path):
    import checkpoint
    from checkpoint import load
    pat = PAT(tiny(tie=True, eps=1e-2), ratio=0.25, milestone=10, hsm_rank=8, lora_rank=4)
    randomize(pat)
    hard_mask(pat)
    x = tokens()
    with torch.no_grad():
        ref = pat(x)
        checkpoint.save(merge(pat), byte_tokenizer(), tmp_path / "final")
    model, tok = load(str(tmp_path / "final"))
    assert model.args.dim == 48 and model.args.head_dim == 16 and model.args.norm_eps == pytest.approx(1e-2 * 64 / 48)
    assert tok.vocab_size == 258
    with torch.no_grad():
        out = model(x)
    assert (ref - out).abs().max() < 1e-4 * ref.abs().max()
    assert len(model.generate([256, 72, 105], 5)) == 5


def test_train_resumes_exactly_and_writes_the_merged_model(tmp_path, data_dir, monkeypatch, capsys):
    """train_pat.main end to end on a tiny checkpoint, PAT then the prune-then-LoRA baseline: runs interrupted
    after a checkpoint (once in PAT, once in the baseline) and resumed end bit-identical to an uninterrupted one;
    the milestone falls inside the resumed part; the closing table shows every run."""
    import checkpoint
    import training
    from checkpoint import load
    checkpoint.save(tiny(tie=True), byte_tokenizer(), tmp_path / "tiny")
    text = tmp_path / "train.txt"
    text.write_text(" ".join(f"word{i % 37} is number {i}." for i in range(3000)))
    monkeypatch.chdir(tmp_path)  # the token cache goes to ./cache
    common = ["--ckpt", str(tmp_path / "tiny"), "--data", str(text), "--data-dir", str(data_dir),
              "--max-steps", "6", "--milestone", "4", "--batch-size", "2", "--seq-len", "32",
              "--ppl-windows", "1", "--ppl-seq-len", "64", "--hsm-rank", "4", "--lora-rank", "4",
              "--warmup-steps", "1", "--ckpt-interval", "3", "--log-interval", "1"]
    train_pat.main(common + ["--out", "full"])
    table = capsys.readouterr().out.split("first 1 of")[-1]
    save, crashed = training.save_state, set()
    def save_then_crash(path, state):
        save(path, state)
        if state["step"] == 3 and str(path) not in crashed:
            crashed.add(str(path))
            raise KeyboardInterrupt
    monkeypatch.setattr(training, "save_state", save_then_crash)
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            train_pat.main(common + ["--out", "resumed"] + ["--resume"] * bool(crashed))
    assert crashed == {"resumed/state.pt", "resumed/prune_lora/state.pt"}
    train_pat.main(common + ["--out", "resumed", "--resume"])
    said = capsys.readouterr().out
    assert "resuming from resumed/prune_lora/state.pt at step 3" in said and said.split("first 1 of")[-1] == table
    for run in ("", "prune_lora/"):
        assert open(f"full/{run}log.jsonl").read() == open(f"resumed/{run}log.jsonl").read()  # record for record
        full, resumed = training.load_state(f"full/{run}state.pt"), training.load_state(f"resumed/{run}state.pt")
        assert full["step"] == resumed["step"] == 6
        for key, value in full["pat"].items():
            assert torch.equal(value, resumed["pat"][key]), key
    assert "mask_logits" not in full["pat"] and bool(training.load_state("full/state.pt")["pat"]["hard"])  # LoRA; PAT
    model, _ = load("resumed/final")
    assert model.args.dim == 48 and model.output.weight is model.tok_embeddings.weight
    log = [json.loads(line) for line in open("resumed/log.jsonl")]
    assert [r["open"] for r in log if "open" in r][-1] == 48 and "ppl_merged" in log[-1]
    meta = json.load(open("resumed/final/meta.json"))
    baseline, _ = load("resumed/prune_lora/final")
    assert baseline.args.dim == 48 and load("resumed/pruned")[0].args.dim == 48
    lora_log = [json.loads(line) for line in open("resumed/prune_lora/log.jsonl")]
    assert lora_log[0]["ppl"] == pytest.approx(meta["refs"]["one-shot"], rel=1e-5)  # it starts from the one-shot prune
    lora_meta = json.load(open("resumed/prune_lora/final/meta.json"))
    for row, value in [("dense", meta["refs"]["dense"]), ("one-shot prune of the", meta["refs"]["one-shot"]),
                       ("one-shot prune, then LoRA 6 steps", lora_meta["ppl_wikitext2"]),
                       ("PAT, mask init rms (ours), merged", meta["ppl_wikitext2"])]:
        assert f"{value:10.2f}" in next(line for line in table.splitlines() if line.strip().startswith(row)), row


def test_torchrun_two_processes_run_pat_and_its_baseline_like_one(tmp_path, data_dir):
    """train_pat under torchrun (2 gloo processes, half the batch each): PAT and the prune-then-LoRA baseline
    run to the end, rank 0 alone prints the table, and the merged models match one process with the same
    global batch (the channel norms are all-reduced, gradients averaged)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    import checkpoint
    root = Path(__file__).resolve().parents[1]
    checkpoint.save(tiny(tie=True), byte_tokenizer(), tmp_path / "tiny")
    text = tmp_path / "train.txt"
    text.write_text(" ".join(f"word{i % 37} is number {i}." for i in range(3000)))
    flags = ["--ckpt", str(tmp_path / "tiny"), "--data", str(text), "--data-dir", str(data_dir), "--max-steps", "4",
             "--milestone", "2", "--seq-len", "32", "--ppl-windows", "1", "--ppl-seq-len", "64", "--hsm-rank", "4",
             "--lora-rank", "4", "--warmup-steps", "1", "--log-interval", "1", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    runs = {}
    for name, launcher, batch in (("one", [], "4"),
                                  ("two", ["-m", "torch.distributed.run", "--nproc_per_node", "2",
                                           "--master_port", "29561"], "2")):
        runs[name] = subprocess.run([sys.executable, *launcher, str(root / "train_pat.py"), *flags, "--batch-size",
                                     batch, "--out", str(tmp_path / name)], cwd=tmp_path, env=env,
                                    capture_output=True, text=True, timeout=180)
        assert runs[name].returncode == 0, runs[name].stderr[-2000:]
    assert runs["two"].stdout.count("one-shot prune, then LoRA 4 steps") == 1  # rank 0's table only
    for run in ("final", "prune_lora/final"):
        a = checkpoint.load(tmp_path / "one" / run)[0].state_dict()
        b = checkpoint.load(tmp_path / "two" / run)[0].state_dict()
        assert a["norm.weight"].shape == (48,)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("keep_tied", [True, False])
def test_merged_model_exports_to_hugging_face(tmp_path, keep_tied):
    """The narrower model (head_dim != dim / n_heads, rescaled eps, tied or untied) in transformers' Llama."""
    transformers = pytest.importorskip("transformers")
    import checkpoint
    pat = PAT(tiny(tie=True, eps=1e-2), ratio=0.25, milestone=10, hsm_rank=8, lora_rank=4, keep_tied=keep_tied)
    randomize(pat)
    hard_mask(pat)
    x = tokens()
    with torch.no_grad():
        ref = pat(x)
        checkpoint.export_hf(merge(pat), byte_tokenizer(), tmp_path)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
        out = hf(x).logits
    assert (ref - out).abs().max() < 1e-4 * ref.abs().max()


# ----------------------------------------------------------------------------- what a user types

@pytest.fixture
def pat_run(tmp_path, data_dir, monkeypatch):
    """pat_run(out, *flags): train_pat.main on a tiny tied checkpoint for 4 steps, in tmp_path."""
    import checkpoint
    checkpoint.save(tiny(tie=True), byte_tokenizer(), tmp_path / "tiny")
    text = tmp_path / "train.txt"
    text.write_text(" ".join(f"word{i % 37} is number {i}." for i in range(3000)))
    monkeypatch.chdir(tmp_path)

    def run(out, *flags):
        return train_pat.main(["--ckpt", str(tmp_path / "tiny"), "--data", str(text), "--data-dir", str(data_dir),
                               "--max-steps", "4", "--milestone", "2", "--batch-size", "2", "--seq-len", "32",
                               "--ppl-windows", "1", "--ppl-seq-len", "64", "--hsm-rank", "4", "--lora-rank", "4",
                               "--warmup-steps", "1", "--log-interval", "1", "--out", str(out), *flags])
    return run


@pytest.mark.parametrize("flags", [["--no-eval"], ["--lora-rank", "0", "--hsm-rank", "0", "--baseline", "none"],
                                   ["--ratio", "0.999", "--baseline", "none"]],
                         ids=["no-eval", "no-adapters", "ratio-0.999"])
def test_runs_with_empty_plot_series_end_with_a_plot(pat_run, tmp_path, flags, capsys):
    """--no-eval logs no perplexity (the log axis had no positive value and matplotlib raised after the save); the
    others log series that may be empty or zero: every such run ends with its model and a plot."""
    pat_run(tmp_path / "run", *flags)
    assert (tmp_path / "run" / "final" / "model.safetensors").exists() and (tmp_path / "run" / "log.png").exists()


def test_the_channel_norms_show_their_progress(pat_run, tmp_path, capsys):
    """--calib-batches 10**6 printed nothing for hours (and held every batch in a list first)."""
    pat_run(tmp_path / "run", "--calib-batches", "3", "--baseline", "none", "--no-eval")
    assert "channel norms 3/3" in capsys.readouterr().err


def test_a_width_multiple_that_keeps_every_channel_is_one_line(pat_run, tmp_path):
    from cli import UserError
    with pytest.raises(UserError, match="^--ratio 0.25 with --width-multiple 1000 keeps all 64 channels of .*tiny: "
                                        "choose a --width-multiple well below 64"):
        pat_run(tmp_path / "wide", "--width-multiple", "1000")
    assert [p.name for p in (tmp_path / "wide").iterdir() if p.name != ".lock"] == []


def test_an_interrupted_merge_export_is_redone_on_resume(pat_run, tmp_path, monkeypatch, capsys):
    """Ctrl-C while final/ is written: no final/, and --resume merges and exports again (one ppl_merged record)."""
    import checkpoint
    pat_run(tmp_path / "whole", "--baseline", "none")
    real_save = checkpoint.save

    def interrupted(model, tokenizer, out, **kwargs):
        real_save(model, tokenizer, out, **kwargs)
        raise KeyboardInterrupt  # after final's files, before the plot and the rename
    monkeypatch.setattr(checkpoint, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pat_run(tmp_path / "cut", "--baseline", "none")
    assert sorted(p.name for p in (tmp_path / "cut").iterdir() if p.name != ".lock") == ["log.jsonl", "state.pt"]
    monkeypatch.setattr(checkpoint, "save", real_save)
    capsys.readouterr()
    pat_run(tmp_path / "cut", "--baseline", "none", "--resume")
    assert "exporting again" in capsys.readouterr().out
    from safetensors.torch import load_file
    a, b = (load_file(str(tmp_path / run / "final" / "model.safetensors")) for run in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert open(tmp_path / "cut" / "log.jsonl").read() == open(tmp_path / "whole" / "log.jsonl").read()


def test_resume_with_another_ratio_is_refused_and_names_it(pat_run, tmp_path):
    """train_pat stores its kind and flags: --ratio 0.5 on a 0.25 run trained 48 channels and would record 0.5."""
    from cli import UserError
    pat_run(tmp_path / "r", "--baseline", "none", "--ckpt-interval", "2", "--max-steps", "3", "--milestone", "1")
    with pytest.raises(UserError, match="was started with --ratio 0.25, not --ratio 0.5; these flags define the run"):
        pat_run(tmp_path / "r", "--baseline", "none", "--ratio", "0.5", "--resume", "--milestone", "1")
