"""eval.py: harness templates on real records, the boundary tokenization rule, known log-probs through the
packed scorer, acc vs acc_norm, Winogrande partial scoring, perplexity windows, and bad input."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import eval as ev
from cli import UserError, cli_main
from data import wikitext2_text
from model import ModelArgs, Transformer
from tokenizer import SentencePieceTokenizer

ROOT = Path(__file__).resolve().parents[1]


class StubTokenizer:
    """Byte-level with a few merged pieces, greedy longest match: enough to make tokens at a
    context/continuation boundary depend on how the text is split."""
    MERGES = [b" yes", b" no", b"Answer:", b" the", b"ab", b" True", b" False"]

    def __init__(self, add_bos=False):
        self.pieces = [bytes([i]) for i in range(256)] + self.MERGES
        self.ids = {p: i for i, p in enumerate(self.pieces)}
        self.bos_id, self.eos_id = len(self.pieces), len(self.pieces) + 1
        self.vocab_size, self.add_bos = len(self.pieces) + 2, add_bos

    def encode(self, text, bos=None, eos=False):
        data, ids, i = text.encode("utf-8"), [], 0
        while i < len(data):
            n = next(n for n in (7, 6, 5, 4, 3, 2, 1) if data[i:i + n] in self.ids)
            ids.append(self.ids[data[i:i + n]])
            i += n
        bos = self.add_bos if bos is None else bos
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids):
        return b"".join(self.pieces[i] for i in ids if i < len(self.pieces)).decode("utf-8", "replace")


def bigram_model(tok, seed=0, uniform=False):
    """A real Transformer with no layers and one-hot embeddings: the logits of the next token depend only
    on the current token, so log P(next | prev) = table[prev, next] is known exactly."""
    dim = (tok.vocab_size + 3) // 4 * 4
    model = Transformer(ModelArgs(dim=dim, n_layers=0, n_heads=2, vocab_size=tok.vocab_size,
                                  hidden_dim=8, max_seq_len=512)).eval()
    with torch.no_grad():
        model.tok_embeddings.weight.copy_(torch.eye(tok.vocab_size, dim))
        g = torch.Generator().manual_seed(seed)
        model.output.weight.copy_(torch.zeros(tok.vocab_size, dim) if uniform else
                                  torch.randn(tok.vocab_size, dim, generator=g))
        table = F.log_softmax(model.output(model.norm(model.tok_embeddings.weight)), dim=-1)
    return model, table.double()


def table_score(tok, table, context, continuation, bos=False):
    """Independent reference: harness tokenization, then the sum of bigram log-probs of the continuation."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = tok.encode(context, bos=bos)
    whole = tok.encode(context + continuation, bos=bos)
    seq = ctx + whole[len(ctx):]
    return sum(table[seq[i - 1], seq[i]].item() for i in range(len(ctx), len(seq)))


def tiny_transformer(seed=0, vocab=300):
    torch.manual_seed(seed)
    return Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab,
                                 hidden_dim=128, max_seq_len=256)).eval()


def harness_scores(model, tok, items, bos=False):
    """The harness's way: one forward per (context, continuation), input = (ctx + cont)[:-1]."""
    out = []
    for contexts, conts, _ in items:
        lls = []
        for c, x in zip(contexts, conts):
            ctx, cont = ev.encode_pair(tok, c, x, bos)
            inp = torch.tensor([(ctx + cont)[:-1]])
            logp = F.log_softmax(model(inp)[0, -len(cont):].double(), dim=-1)
            lls.append(logp.gather(1, torch.tensor(cont)[:, None]).sum().item())
        out.append(lls)
    return out


# ---------------------------------------------------------------- templates on real records


def test_templates_on_first_real_records(data_dir):
    first = {t: ev.read_task(data_dir, t, limit=1)[0] for t in ev.TASKS}
    ctxs, conts, gold = first["hellaswag"]
    assert ctxs == ["Roof shingle removal: A man is sitting on a roof. he"] * 4
    assert conts[3] == " starts pulling up roofing on a roof." and gold == 3
    ctxs, conts, gold = first["piqa"]
    assert ctxs[0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert conts[0].startswith(" Provide the guinea pig with a cage") and len(conts) == 2 and gold == 0
    ctxs, conts, gold = first["arc_easy"]
    assert ctxs[0] == ("Question: Which statement best explains why photosynthesis is the foundation of most "
                       "food webs?\nAnswer:")
    assert conts[0] == " Sunlight is the source of energy for nearly all ecosystems." and gold == 0
    ctxs, conts, gold = first["arc_challenge"]
    assert conts == [" Planetary density will decrease.", " Planetary years will become longer.",
                     " Planetary days will become shorter.", " Planetary gravity will become stronger."]
    assert gold == 2  # answerKey "C"
    ctxs, conts, gold = first["winogrande"]
    assert ctxs == ["Sarah was a much better surgeon than Maria so Sarah",
                    "Sarah was a much better surgeon than Maria so Maria"]
    assert conts == [" always got the easier cases."] * 2 and gold == 1  # answer "2"
    ctxs, conts, gold = first["boolq"]
    assert ctxs[0].startswith("All biomass goes through")
    assert ctxs[0].endswith("than producing gasoline.\nQuestion: does ethanol take more energy make that produces?"
                            "\nAnswer:")
    assert conts == [" no", " yes"] and gold == 0
    ctxs, conts, gold = first["rte"]
    assert ctxs[0] == ("Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, "
                       "according to the Christopher Reeve Foundation.\nQuestion: Christopher Reeve had an "
                       "accident. True or False?\nAnswer:")
    assert conts == [" True", " False"] and gold == 1  # label 1 = not entailment = "False"
    ctxs, conts, gold = first["openbookqa"]
    assert ctxs[0].startswith("A person wants to start saving") and ctxs[0].endswith("best way to save money is to")
    assert conts[1] == " quit eating lunch out" and gold == 1


def test_hellaswag_preprocess_and_capitalize():
    assert ev.hellaswag_preprocess(" How to x [title] Do it [step] now  ok ") == "How to x. Do it now ok"
    doc = {"activity_label": "Cooking", "ctx_a": "He cuts onions.", "ctx_b": "then HE cries",
           "endings": ["[header] Wipe  eyes.", "sleeps"], "label": "0"}
    ctxs, conts, gold = ev.hellaswag(doc)
    assert ctxs[0] == "Cooking: He cuts onions. Then he cries"  # str.capitalize lowercases the rest, as the harness
    assert conts == ["  Wipe eyes.", " sleeps"] and gold == 0  # the tag goes after the strip: its space stays
    doc.update(ctx_b="")  # the shared file's layout: ctx_a holds everything, the trailing space is stripped
    assert ev.hellaswag(doc)[0][0] == "Cooking: He cuts onions."


# ---------------------------------------------------------------- tokenization at the boundary


def test_context_ending_in_space_moves_the_space_to_the_continuation():
    tok = StubTokenizer()
    ctx, cont = ev.encode_pair(tok, "Answer: ", "yes", bos=False)
    assert ctx == [tok.ids[b"Answer:"]] and cont == [tok.ids[b" yes"]]  # one merged token " yes"
    ctx, cont = ev.encode_pair(tok, "Answer:  ", "no", bos=True)  # all trailing spaces move
    assert ctx == [tok.bos_id, tok.ids[b"Answer:"]] and cont == [tok.ids[b" "], tok.ids[b" no"]]


def test_continuation_is_cut_from_the_joint_encoding():
    tok = StubTokenizer()
    # "a" + "b" encodes jointly as the merge "ab": the continuation is what follows len(encode("xa"))
    ctx, cont = ev.encode_pair(tok, "xa", "bc", bos=False)
    assert ctx == tok.encode("xa") and cont == tok.encode("xabc")[2:] == [tok.ids[b"c"]]
    assert cont != tok.encode("bc")


# ---------------------------------------------------------------- scoring with known log-probs


def test_scores_equal_known_bigram_log_probs():
    tok = StubTokenizer()
    model, table = bigram_model(tok)
    items = [ev.piqa({"goal": "Open a jar", "sol1": "twist the lid", "sol2": "ab yes", "label": 1}),
             ev.boolq({"passage": "Sky is blue.", "question": "is the sky blue", "label": 1}),
             ev.winogrande({"sentence": "Tom met Ann so _ was happy.", "option1": "Tom", "option2": "Ann",
                            "answer": "1"}),
             ([("Answer: ")] * 2, ["yes", "no"], 0)]
    for bos in (False, True):
        for batch_size in (1, 3):
            got = ev.score_items(model, tok, items, batch_size=batch_size, bos=bos)
            for (ctxs, conts, _), lls in zip(items, got):
                want = [table_score(tok, table, c, x, bos) for c, x in zip(ctxs, conts)]
                assert lls == pytest.approx(want, abs=1e-4)


def test_acc_uses_sum_and_acc_norm_divides_by_characters(tmp_path):
    # a uniform model: every token costs log V, so the shortest choice has the best sum and the
    # longest the best per-character score
    tok = StubTokenizer()
    model, _ = bigram_model(tok, uniform=True)
    records = [{"goal": "g", "sol1": "short", "sol2": "much longer answer", "label": 0},
               {"goal": "g", "sol1": "short", "sol2": "much longer answer", "label": 1},
               {"goal": "g", "sol1": "same", "sol2": "same", "label": 1}]  # a tie picks the first index
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "piqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    r = ev.evaluate_task(model, tok, "piqa", tmp_path, batch_size=2)
    assert [s["pred"] for s in r["samples"]] == [0, 0, 0]
    assert [s["pred_norm"] for s in r["samples"]] == [1, 1, 0]
    assert r["n"] == 3 and r["acc"] == pytest.approx(1 / 3) and r["acc_norm"] == pytest.approx(1 / 3)
    V = tok.vocab_size
    assert r["samples"][0]["loglikelihoods"][0] == pytest.approx(-6 * math.log(V), abs=1e-4)  # " short"


def test_winogrande_scores_the_shared_continuation_after_each_option(tmp_path):
    tok = StubTokenizer()
    model, table = bigram_model(tok, seed=3)
    rec = {"sentence": "Ann gave Bob a gift because _ was kind.", "option1": "Ann", "option2": "Bob", "answer": "1"}
    ctxs, conts, gold = ev.winogrande(rec)
    assert ctxs == ["Ann gave Bob a gift because Ann", "Ann gave Bob a gift because Bob"]
    assert conts == [" was kind."] * 2 and gold == 0
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "winogrande.jsonl").write_text(json.dumps(rec) + "\n")
    r = ev.evaluate_task(model, tok, "winogrande", tmp_path)
    want = [table_score(tok, table, c, x) for c, x in zip(ctxs, conts)]
    assert r["samples"][0]["loglikelihoods"] == pytest.approx(want, abs=1e-4)
    assert r["samples"][0]["pred"] == int(want[1] > want[0]) and r["acc_norm"] is None


def test_packed_rows_equal_one_forward_per_request():
    """Shared-prefix packing (positions restart after the prefix, block mask) gives the harness's numbers."""
    tok = StubTokenizer()
    model = tiny_transformer(vocab=tok.vocab_size)
    items = [ev.hellaswag({"activity_label": "Baking", "ctx_a": "She mixes flour and", "ctx_b": "",
                           "endings": ["water.", "the eggs then bakes it", "sings", "ab ab ab"], "label": "1"}),
             ev.winogrande({"sentence": "The cup fell off the table because _ was slippery.",
                            "option1": "the cup", "option2": "the table", "answer": "2"}),
             ev.rte({"sentence1": "A cat sat.", "sentence2": "A cat exists.", "label": 0}),
             ([("same context")] * 3, [" same", " same", " same thing"], 2)]
    want = harness_scores(model, tok, items)
    for batch_size in (1, 4):
        got = ev.score_items(model, tok, items, batch_size=batch_size, bos=False)
        for g, w in zip(got, want):
            assert g == pytest.approx(w, abs=2e-4)


def test_length_batches_are_the_cheapest_split():
    import itertools
    lengths = [5, 40, 7, 39, 12, 3, 38, 100, 6]
    batches = ev.length_batches(lengths, batch_size=4, overhead=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(1 <= len(b) <= 4 for b in batches)

    def cost(bs):
        return sum(len(b) * max(lengths[i] for i in b) + 3 for b in bs)

    best = math.inf  # brute force: every split of the items into batches of <= 4, any grouping
    def splits(items):
        if not items:
            yield []
            return
        first, rest = items[0], items[1:]
        for k in range(0, min(3, len(rest)) + 1):
            for others in itertools.combinations(rest, k):
                left = [i for i in rest if i not in others]
                for tail in splits(left):
                    yield [[first, *others], *tail]
    for bs in splits(list(range(len(lengths)))):
        best = min(best, cost(bs))
    assert cost(batches) == best
    chunks = sorted(range(9), key=lambda i: -lengths[i])  # plain chunks of 4, longest first
    assert cost(batches) < cost([chunks[k:k + 4] for k in range(0, 9, 4)])


def test_bfloat16_scores_close_to_float32():
    tok = StubTokenizer()
    model = tiny_transformer(vocab=tok.vocab_size)
    items = [ev.piqa({"goal": "Open a jar", "sol1": "twist the lid", "sol2": "hit it", "label": 0})]
    fp32 = ev.score_items(model, tok, items)[0]
    bf16 = ev.score_items(model.to(torch.bfloat16), tok, items)[0]
    assert bf16 == pytest.approx(fp32, rel=0.05)


def test_left_truncation_to_max_seq_len():
    tok = StubTokenizer()
    model, table = bigram_model(tok)
    model.args.max_seq_len = 8
    items = [([("x" * 20)] * 2, [" yes", " the end"], 0)]
    got = ev.score_items(model, tok, items)[0]
    assert got == pytest.approx([table_score(tok, table, "x" * 20, c) for c in (" yes", " the end")], abs=1e-4)


# ---------------------------------------------------------------- perplexity


def test_perplexity_windows_bos_once_and_tail_dropped():
    tok = StubTokenizer(add_bos=True)
    text = "abc" * 30  # 30 "ab" merges + 30 "c" + BOS = 61 tokens
    windows, p = ev.perplexity_windows(tok, text, seq_len=16)
    assert p == {"tokens": 61, "windows": 3, "seq_len": 16, "bos": True}
    assert windows[0, 0] == tok.bos_id and (windows[1:, 0] != tok.bos_id).all()
    assert ev.perplexity_protocol(tok, text, 16, limit=2, bos=False) == {"tokens": 60, "windows": 2,
                                                                         "seq_len": 16, "bos": False}
    with pytest.raises(UserError, match="fewer than --ppl-seq-len"):
        ev.perplexity_windows(tok, "abc", seq_len=16)


def test_perplexity_is_exp_of_mean_window_nll():
    tok = StubTokenizer(add_bos=True)
    model = tiny_transformer(vocab=tok.vocab_size)
    text = "the cat sat on the mat. " * 8
    ids = tok.encode(text)
    L = 24
    nlls = []
    for i in range(len(ids) // L):
        w = torch.tensor([ids[i * L:(i + 1) * L]])
        nlls.append(F.cross_entropy(model(w)[0, :-1], w[0, 1:]).item())
    want = math.exp(sum(nlls) / len(nlls))
    assert ev.perplexity(model, tok, text, L, batch_size=2) == pytest.approx(want, rel=1e-5)
    assert ev.perplexity(model, tok, text, L, limit=1) == pytest.approx(math.exp(nlls[0]), rel=1e-5)


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits are given: large enough (T 1024, V 16384) for fp32 summation order to matter."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits, requires_grad=False)

    def forward(self, tokens):
        return self.logits.expand(len(tokens), -1, -1)


def test_window_nlls_match_float64():
    torch.manual_seed(0)
    T, V = 1024, 16384
    model = FixedLogits(torch.randn(1, T, V) * 3)
    windows = torch.randint(0, V, (2, T))
    want = [F.cross_entropy(model.logits[0, :-1].double(), w[1:]).item() for w in windows]
    got = ev.window_nlls(model, windows, batch_size=2).tolist()
    assert got == pytest.approx(want, abs=1e-6)  # the (B, V, T) layout was 1e-5 off here


def test_evaluation_of_a_training_model_leaves_it_trainable():
    """Perplexity and scoring run under no_grad, not inference_mode: FSDP allocates its unsharded parameters inside
    the forward, and tensors made in inference mode can't be updated in place by the next training step."""
    tok = StubTokenizer()
    model = tiny_transformer(vocab=tok.vocab_size)
    modes, made = [], []

    def remember(module, args, output):
        modes.append(torch.is_inference_mode_enabled())
        made.append(output)
    model.layers[0].register_forward_hook(remember)
    ev.perplexity(model, tok, "the cat sat on the mat. " * 8, 24)
    ev.score_items(model, tok, [ev.piqa({"goal": "Open a jar", "sol1": "twist", "sol2": "pull", "label": 0})])
    assert modes and not any(modes)
    made[0].add_(1.0)  # what FSDP's next step does to a buffer allocated during evaluation: no error
    model(torch.randint(0, tok.vocab_size, (1, 8))).sum().backward()


def test_wikitext2_protocol_with_llama2_tokenizer(data_dir):
    """The literature's numbers: Llama 2 tokenizer + one BOS = 341,469 tokens, 83 windows of 4096, 166 of 2048."""
    tok = SentencePieceTokenizer((data_dir / "tokenizers" / "llama2" / "tokenizer.model").read_bytes())
    text = wikitext2_text(data_dir)
    assert ev.perplexity_protocol(tok, text, 4096) == {"tokens": 341469, "windows": 83, "seq_len": 4096, "bos": True}
    assert ev.perplexity_protocol(tok, text, 2048)["windows"] == 166
    ppl = ev.WikiText2(tok, data_dir, 2048, windows=8)
    assert ppl.describe() == "WikiText-2 test, seq-len 2048, first 8 of 166 windows, BOS yes"
    assert ev.WikiText2(tok, data_dir, 4096).protocol == ev.perplexity_protocol(tok, text, 4096)
    valid = ev.WikiText2(tok, data_dir, 2048, windows=8, split="valid")
    assert valid.describe() == "WikiText-2 valid, seq-len 2048, first 8 of 146 windows, BOS yes"
    assert ev.WikiText2(tok, data_dir, 2048, split="valid").protocol == ev.perplexity_protocol(
        tok, wikitext2_text(data_dir, "valid"), 2048)


# ---------------------------------------------------------------- bad input


def test_bad_task_files(tmp_path):
    with pytest.raises(UserError, match="unknown task 'nope'"):
        ev.parse_tasks("piqa,nope")
    assert ev.parse_tasks("all") == ["wikitext2", *ev.TASKS]
    with pytest.raises(UserError, match="missing task file"):
        ev.read_task(tmp_path, "piqa")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "piqa.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}\n{"goal": \n')
    with pytest.raises(UserError, match=r"malformed record at .*piqa.jsonl:2"):
        ev.read_task(tmp_path, "piqa")
    (tmp_path / "tasks" / "arc_easy.jsonl").write_text(
        '{"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "E"}\n')
    with pytest.raises(UserError, match="malformed record"):
        ev.read_task(tmp_path, "arc_easy")


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "piqa,bogus"], "unknown task 'bogus'"),
    (["--tasks", "piqa", "--limit", "0"], "--limit 0"),
    (["--tasks", "piqa", "--data-dir", "/nonexistent/dir"], "nonexistent"),
])
def test_cli_errors_are_one_line(argv, message):
    with pytest.raises(UserError, match=message):
        ev.main(argv)


def test_cli_exit_status_and_single_line(tmp_path):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "rte.jsonl").write_text("not json\n")
    r = subprocess.run([sys.executable, "eval.py", "--tasks", "rte", "--data-dir", str(tmp_path), "--ckpt", "x"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ")


def write_piqa(data_dir, n):
    (data_dir / "tasks").mkdir(parents=True, exist_ok=True)
    records = [{"goal": f"Goal {i}", "sol1": "twist the lid", "sol2": "ab yes", "label": i % 2} for i in range(n)]
    (data_dir / "tasks" / "piqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_cli_json_into_a_missing_directory_fails_before_loading(tmp_path, monkeypatch, capsys):
    write_piqa(tmp_path, 2)
    monkeypatch.setattr(ev, "load", lambda *a, **k: pytest.fail("loaded the model before checking --json"))
    target = tmp_path / "no" / "such" / "results.json"
    with pytest.raises(SystemExit) as e:
        cli_main(lambda: ev.main(["--tasks", "piqa", "--data-dir", str(tmp_path), "--json", str(target)]))
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and err.startswith("error: ")
    assert str(target.parent) in err and not target.parent.exists()


@pytest.mark.parametrize("argv, message", [
    (["--ppl-seq-len", "0"], "--ppl-seq-len 0: must be positive"),
    (["--ppl-windows", "-1"], "--ppl-windows -1: must be 0 (all windows) or more"),
])
def test_cli_bad_perplexity_flags_end_in_one_line(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(ev, "load", lambda *a, **k: pytest.fail("loaded the model before checking the flags"))
    with pytest.raises(SystemExit) as e:
        cli_main(lambda: ev.main(["--tasks", "wikitext2", *argv]))
    assert e.value.code == 1 and capsys.readouterr().err == f"error: {message}\n"


def test_cli_limit_is_task_records_and_ppl_windows_is_windows(tmp_path, monkeypatch):
    """--limit cuts each zero-shot task, never the WikiText-2 windows; --ppl-windows cuts those."""
    tok = StubTokenizer()
    model = tiny_transformer(vocab=tok.vocab_size)
    monkeypatch.setattr(ev, "load", lambda *a, **k: (model, tok))
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.test.raw").write_text(" = Title = \n \n the cat sat on the mat . \n" * 10)
    write_piqa(tmp_path, 3)

    def run(*flags):
        ev.main(["--tasks", "wikitext2,piqa", "--data-dir", str(tmp_path), "--ppl-seq-len", "16", "--device", "cpu",
                 "--json", str(tmp_path / "r.json"), "--overwrite", *flags])
        return json.loads((tmp_path / "r.json").read_text())

    every = run()
    windows = every["results"]["wikitext2"]["n"]
    assert windows == every["results"]["wikitext2"]["protocol"]["tokens"] // 16 > 2
    assert every["results"]["piqa"]["n"] == 3
    limited = run("--limit", "1")
    assert limited["results"]["wikitext2"]["n"] == windows and limited["results"]["piqa"]["n"] == 1
    assert limited["results"]["wikitext2"]["ppl"] == every["results"]["wikitext2"]["ppl"]
    cut = run("--ppl-windows", "2")
    assert cut["results"]["wikitext2"]["n"] == 2 and cut["results"]["piqa"]["n"] == 3
    assert cut["protocol"]["ppl_windows"] == 2 and cut["protocol"]["limit"] is None
    (tmp_path / "wikitext-2-raw" / "wiki.valid.raw").write_text(" = Other = \n \n a dog ran . \n" * 10)
    valid = run("--ppl-split", "valid")  # the validation file, scored the same way
    assert valid["protocol"]["data_files"][0].endswith("wiki.valid.raw")
    assert valid["results"]["wikitext2"]["protocol"]["tokens"] != every["results"]["wikitext2"]["protocol"]["tokens"]
    assert valid["results"]["wikitext2"]["ppl"] == pytest.approx(
        ev.perplexity(model, tok, wikitext2_text(tmp_path, "valid"), 16), rel=1e-6)


@pytest.fixture
def no_load(monkeypatch):
    monkeypatch.setattr(ev, "load", lambda *a, **k: pytest.fail("loaded the model before checking the input"))


def test_cli_existing_json_is_kept_unless_overwrite(tmp_path, monkeypatch, cli_error):
    """An earlier run's results are never replaced silently: refused before the model loads, --overwrite replaces."""
    write_piqa(tmp_path, 2)
    results = tmp_path / "results.json"
    results.write_text('{"earlier": "run"}')
    argv = ["--tasks", "piqa", "--data-dir", str(tmp_path), "--device", "cpu", "--json", str(results)]
    monkeypatch.setattr(ev, "load", lambda *a, **k: pytest.fail("loaded the model before checking --json"))
    assert cli_error(lambda: ev.main(argv)) == (f"error: --json {results} already exists: pass --overwrite to "
                                                f"replace it, or choose another file\n")
    assert results.read_text() == '{"earlier": "run"}'
    tok = StubTokenizer()
    monkeypatch.setattr(ev, "load", lambda *a, **k: (tiny_transformer(vocab=tok.vocab_size), tok))
    ev.main(argv + ["--overwrite"])
    assert json.loads(results.read_text())["results"]["piqa"]["n"] == 2


def test_cli_json_that_is_a_directory_is_one_line_before_loading(tmp_path, no_load, cli_error):
    write_piqa(tmp_path, 2)
    err = cli_error(lambda: ev.main(["--tasks", "piqa", "--data-dir", str(tmp_path), "--json", str(tmp_path)]))
    assert err.startswith(f"error: --json {tmp_path} is a directory; give a file name")


def test_cli_json_that_cannot_be_written_is_one_line_before_loading(tmp_path, no_load, cli_error):
    """cli.check_output_file tests that the place can be written (here /proc, where nothing can be created)."""
    write_piqa(tmp_path, 2)
    err = cli_error(lambda: ev.main(["--tasks", "piqa", "--data-dir", str(tmp_path), "--json", "/proc/r.json"]))
    assert "/proc" in err and not Path("/proc/r.json").exists()


def test_cli_log_samples_without_json_is_one_line(tmp_path, no_load, cli_error):
    write_piqa(tmp_path, 2)
    err = cli_error(lambda: ev.main(["--tasks", "piqa", "--data-dir", str(tmp_path), "--log-samples"]))
    assert err == "error: --log-samples writes each item's log-likelihoods into the --json file: add --json FILE\n"


def test_ppl_seq_len_1_is_one_line_not_nan(tmp_path, no_load, cli_error):
    """A window of 1 token predicts nothing: the perplexity would be nan, printed with exit status 0."""
    err = cli_error(lambda: ev.main(["--tasks", "wikitext2", "--data-dir", str(tmp_path), "--ppl-seq-len", "1"]))
    assert err.startswith("error: --ppl-seq-len 1: a perplexity window needs at least 2 tokens")
    with pytest.raises(UserError, match="--ppl-seq-len 1"):
        ev.perplexity_windows(StubTokenizer(), "enough text for many windows " * 10, 1)
    assert ev.perplexity_windows(StubTokenizer(), "xy", 2)[0].tolist() == [[ord("x"), ord("y")]]


def test_a_task_file_that_is_not_utf8_names_the_byte_before_loading(tmp_path, no_load, cli_error):
    write_piqa(tmp_path, 2)
    path = tmp_path / "tasks" / "piqa.jsonl"
    blob = path.read_bytes()
    path.write_bytes(blob + b'{"goal": "caf\xe9", "sol1": "a", "sol2": "b", "label": 0}\n')
    err = cli_error(lambda: ev.main(["--tasks", "piqa", "--data-dir", str(tmp_path)]))
    assert err.startswith(f"error: {path}: byte {len(blob) + 13} (0xe9) is not UTF-8")
