"""PAT: exact start, mask schedule and count, Identity Loss over every HSM, exact merge, resume."""
import json

import pytest
import torch
import torch.nn.functional as F

import train_pat
from model import ModelArgs, Transformer
from train_pat import PAT, HSM, mask_schedule, merge, target_width


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


def test_train_resumes_exactly_and_writes_the_merged_model(tmp_path, data_dir, monkeypatch):
    """train_pat.main end to end on a tiny checkpoint: a run interrupted after a checkpoint and resumed
    ends bit-identical to an uninterrupted one; the milestone falls inside the resumed part."""
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
    save = training.save_state
    def save_then_crash(path, state):
        save(path, state)
        if state["step"] == 3:
            raise KeyboardInterrupt
    monkeypatch.setattr(training, "save_state", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train_pat.main(common + ["--out", "resumed"])
    monkeypatch.setattr(training, "save_state", save)
    train_pat.main(common + ["--out", "resumed", "--resume"])
    assert open("full/log.jsonl").read() == open("resumed/log.jsonl").read()  # record for record
    full, resumed = training.load_state("full/state.pt"), training.load_state("resumed/state.pt")
    assert full["step"] == resumed["step"] == 6 and bool(full["pat"]["hard"])
    for key, value in full["pat"].items():
        assert torch.equal(value, resumed["pat"][key]), key
    model, _ = load("resumed/final")
    assert model.args.dim == 48 and model.output.weight is model.tok_embeddings.weight
    log = [json.loads(line) for line in open("resumed/log.jsonl")]
    assert [r["open"] for r in log if "open" in r][-1] == 48 and "ppl_merged" in log[-1]


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
