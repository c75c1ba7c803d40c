"""Evaluation: WikiText-2 perplexity and zero-shot multiple choice, scored as the pruning papers score them.

    python eval.py --ckpt smollm2-135m --tasks all --limit 200 --batch-size 16 --json results.json
    python eval.py --ckpt smollm2-135m --tasks wikitext2 --ppl-seq-len 2048 --ppl-windows 8   # 0: all windows
    python eval.py --ckpt DIR --tasks wikitext2 --ppl-split valid   # the validation file: tune on it, not on test

Perplexity follows the SparseGPT/Wanda script: encode the whole text once (one BOS at the start if the
tokenizer adds one), cut n = len // L non-overlapping windows, drop the tail, ppl = exp(mean window NLL).
Zero-shot tasks follow EleutherAI's lm-evaluation-harness exactly (its task templates, continuation =
" " + choice, the boundary tokenization rule, acc and acc_norm). We are faster than the harness because
each item becomes one packed row: the shared context once, then every choice's tokens, each choice
attending only to the context and itself (positions restart after the context); the LM head runs only
where a continuation token is predicted, and batches are cut to minimise padding.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from checkpoint import load
from cli import (DTYPES, Device, DType, Progress, UserError, atomic_write, autocast, check_output_file, cli_main,
                 parse_config, resolve_device)
from data import read_lines, resolve_data_dir, wikitext2_path, wikitext2_text


@dataclass
class EvalArgs:
    """Evaluate a checkpoint: WikiText-2 perplexity and zero-shot accuracy (lm-evaluation-harness rules)."""
    ckpt: str = "smollm2-135m"  # model name or checkpoint path (checkpoint.load)
    tasks: str = "all"  # comma list of wikitext2 and the zero-shot tasks, or all
    limit: int | None = None  # first N records of each zero-shot task file (None: all)
    ppl_seq_len: int = 2048  # WikiText-2 perplexity window length L
    ppl_windows: int = 0  # first N WikiText-2 windows (0: all)
    ppl_split: Literal["test", "valid"] = "test"  # WikiText-2 file: the test set, or validation to tune on
    batch_size: int = 16  # at most this many items (packed rows) per forward pass
    json: str | None = None  # write results (and protocol) to this file
    overwrite: bool = False  # replace an existing --json file
    log_samples: bool = False  # per-item log-likelihoods and predictions in the JSON
    bos: Literal["auto", "yes", "no"] = "auto"  # a BOS before every request and the text (auto: the tokenizer's)
    data_dir: str | None = None  # default ./data, then ../shared/data
    device: Device = "auto"  # auto: cuda when torch sees a GPU, else cpu
    dtype: DType = "float32"  # weight dtype


# -----------------------------------------------------------------------------------------------------
# Perplexity


def _resolve_bos(tokenizer, bos):
    return tokenizer.add_bos if bos is None else bool(bos)


def check_ppl_seq_len(seq_len):
    """A window predicts its tokens after the first: L = 1 predicts nothing (a perplexity of nan)."""
    if seq_len < 2:
        raise UserError(f"--ppl-seq-len {seq_len}: a perplexity window needs at least 2 tokens (its first token is "
                        f"never predicted); use 2 or more")


def perplexity_windows(tokenizer, text, seq_len, limit=None, bos=None):
    """(windows LongTensor (n, L), protocol dict): the whole text encoded once, n = len // L, tail dropped."""
    check_ppl_seq_len(seq_len)
    bos = _resolve_bos(tokenizer, bos)
    ids = tokenizer.encode(text, bos=bos)
    n = len(ids) // seq_len
    if n == 0:
        raise UserError(f"the text has {len(ids)} tokens, fewer than --ppl-seq-len {seq_len}; lower --ppl-seq-len")
    if limit is not None:
        n = min(n, limit)
    windows = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
    protocol = {"tokens": len(ids), "windows": n, "seq_len": seq_len, "bos": bos}
    return windows, protocol


def perplexity_protocol(tokenizer, text, seq_len, limit=None, bos=None) -> dict:
    """What perplexity() measures: tokens in the text, windows used, L, whether a BOS starts the text."""
    return perplexity_windows(tokenizer, text, seq_len, limit, bos)[1]


@torch.no_grad()  # not inference_mode: FSDP allocates unsharded params here that the next training step updates
def window_nlls(model, windows, batch_size=1):
    """Mean next-token NLL of each window (float64 tensor (n,)); the first token of a window is never predicted."""
    device = next(model.parameters()).device
    nlls, progress = [], Progress("perplexity", len(windows), unit="windows")
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size].to(device)
        logits = model(batch)[:, :-1].float()
        # rows of (B*T, V): the log-softmax reduces along contiguous memory (the (B, V, T) layout costs 1e-4 nats)
        nll = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
        nlls.append(nll.view(len(batch), -1).double().mean(dim=1).cpu())
        progress.redraw(i + len(batch))
    return torch.cat(nlls)


def perplexity(model, tokenizer, text, seq_len, limit=None, batch_size=1, bos=None) -> float:
    """exp(mean over windows of the window's mean NLL); see perplexity_windows for the windows."""
    windows, _ = perplexity_windows(tokenizer, text, seq_len, limit, bos)
    return math.exp(window_nlls(model, windows, batch_size).mean().item())


class WikiText2:
    """The WikiText-2 test perplexity that every script prints: windows encoded once, any model scored on them.

        ppl = WikiText2(tokenizer, data_dir, seq_len=2048, windows=8)   # windows 0: all of them
        ppl(model), ppl.describe()   # -> 20.71, "WikiText-2 test, seq-len 2048, first 8 of 148 windows, BOS no"

    split "valid": the validation file, to choose settings on without looking at the test set.
    """

    def __init__(self, tokenizer, data_dir, seq_len, windows=0, bos=None, split="test"):
        self.split = split
        self.windows, self.protocol = perplexity_windows(tokenizer, wikitext2_text(data_dir, split), seq_len,
                                                         windows or None, bos)

    def __call__(self, model, dtype=torch.float32) -> float:
        """Perplexity of `model` (eval mode meanwhile; autocast to `dtype` unless float32)."""
        was_training = model.training
        model.eval()
        try:
            with autocast(dtype, next(model.parameters()).device):
                return math.exp(window_nlls(model, self.windows).mean().item())
        finally:
            model.train(was_training)

    def describe(self) -> str:
        p = self.protocol
        return (f"WikiText-2 {self.split}, seq-len {p['seq_len']}, first {p['windows']} of "
                f"{p['tokens'] // p['seq_len']} windows, BOS {'yes' if p['bos'] else 'no'}")


# -----------------------------------------------------------------------------------------------------
# Zero-shot tasks: one JSON record -> (contexts, continuations, gold); request k = (contexts[k], continuations[k])


def _choices(context, choices, gold):
    """The usual shape: one context, continuation = " " + choice (the harness's target_delimiter)."""
    return [context] * len(choices), [" " + c for c in choices], gold


def hellaswag_preprocess(text):
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)  # WikiHow artifacts like [header], [step]
    return text.replace("  ", " ")


def hellaswag(doc):
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return _choices(hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
                    [hellaswag_preprocess(e) for e in doc["endings"]], int(doc["label"]))


def piqa(doc):
    return _choices("Question: " + doc["goal"] + "\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def arc(doc):
    return _choices("Question: " + doc["question"] + "\nAnswer:", doc["choices"]["text"],
                    doc["choices"]["label"].index(doc["answerKey"]))


def boolq(doc):
    return _choices(doc["passage"] + "\nQuestion: " + doc["question"] + "?\nAnswer:", ["no", "yes"],
                    int(doc["label"]))


def rte(doc):
    return _choices(doc["sentence1"] + "\nQuestion: " + doc["sentence2"] + " True or False?\nAnswer:",
                    ["True", "False"], int(doc["label"]))


def openbookqa(doc):
    return _choices(doc["question_stem"], doc["choices"]["text"],
                    doc["choices"]["label"].index(doc["answerKey"].lstrip()))


def winogrande(doc):
    """Partial scoring: the option goes into the context; both score the same rest of the sentence."""
    i = doc["sentence"].index("_")
    rest = " " + doc["sentence"][i + 1 :].strip()
    return [doc["sentence"][:i] + doc["option1"], doc["sentence"][:i] + doc["option2"]], [rest, rest], \
        int(doc["answer"]) - 1


TASKS = {"hellaswag": hellaswag, "piqa": piqa, "arc_easy": arc, "arc_challenge": arc,
         "winogrande": winogrande, "boolq": boolq, "rte": rte, "openbookqa": openbookqa}
NO_ACC_NORM = {"winogrande"}  # its choices differ in the context, not the continuation
PAPER_TASKS = ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]


def task_file(data_dir, task) -> Path:
    return Path(data_dir) / "tasks" / f"{task}.jsonl"


def read_task(data_dir, task, limit=None):
    """The first `limit` records of tasks/<task>.jsonl, each turned into (contexts, continuations, gold)."""
    path = task_file(data_dir, task)
    if not path.is_file():
        raise UserError(f"missing task file {path}; pass --data-dir pointing at a folder with tasks/{task}.jsonl")
    items = []
    for line_no, line in enumerate(read_lines(path), 1):
        if limit is not None and len(items) == limit:
            break
        if not line.strip():
            continue
        try:
            contexts, continuations, gold = TASKS[task](json.loads(line))
            assert 0 <= gold < len(continuations) and all(isinstance(c, str) for c in contexts + continuations)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, AssertionError) as e:
            raise UserError(f"malformed record at {path}:{line_no} ({type(e).__name__}: {e}); "
                            f"expected the Hugging Face field layout of {task} (README.md, section Data)")
        items.append((contexts, continuations, gold))
    if not items:
        raise UserError(f"no records in {path}")
    return items


# -----------------------------------------------------------------------------------------------------
# Scoring: sum of log P(continuation tokens | context), requests packed per item


def encode_pair(tokenizer, context, continuation, bos):
    """(context ids, continuation ids) by the harness's rule: trailing spaces of the context move to the
    continuation, context + continuation is encoded as one string, the continuation is what follows
    len(encode(context)). Encoding the two separately would change tokens at the boundary."""
    if context == "":  # the harness scores an empty context from the prefix token (BOS, else EOS)
        prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        return [prefix], tokenizer.encode(continuation, bos=False)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation, bos=bos)
    context_ids = tokenizer.encode(context, bos=bos)
    return context_ids, whole[len(context_ids) :]


def pack_item(requests, max_len):
    """One row for all requests of an item: the longest common prefix of their inputs, then each request's
    remaining input tokens as a segment. Returns (tokens, positions, segments, picks) where picks[k] is a
    list of (row index, target token) whose log-probs sum to request k's score.
    Input of a request = (context + continuation)[-(max_len + 1):][:-1], as the harness truncates."""
    inputs, conts = [], []
    for ctx, cont in requests:
        seq = (ctx + cont)[-(max_len + 1) :]
        inputs.append(seq[:-1])
        conts.append(cont)
    shared = min(len(x) for x in inputs)
    for x in inputs[1:]:
        shared = next((i for i in range(shared) if x[i] != inputs[0][i]), shared)
    tokens, positions, segments = list(inputs[0][:shared]), list(range(shared)), [0] * shared
    picks = []
    for k, (x, cont) in enumerate(zip(inputs, conts)):
        start = len(tokens)
        tokens += x[shared:]
        positions += range(shared, len(x))
        segments += [k + 1] * (len(x) - shared)
        first = len(x) - len(cont)  # input index whose output predicts cont[0]
        picks.append([(i if i < shared else start + i - shared, t) for i, t in zip(range(first, len(x)), cont)])
    return tokens, positions, segments, picks


def packed_hidden(model, tokens, positions, mask):
    """model.forward up to the final norm, but with explicit positions (B, T) and a boolean attention mask
    (B, 1, T, T) instead of plain causal attention; tests check it equals model.forward on causal rows."""
    freqs_cis = model.rope(0, int(positions.max()) + 1, tokens.device)[positions]  # (B, T, 1, head_dim // 2)
    h = model.tok_embeddings(tokens)
    for layer in model.layers:
        h = layer(h, freqs_cis, mask=mask)
    return model.norm(h)


def length_batches(lengths, batch_size, overhead=16):
    """Split the items, longest first, into batches of at most batch_size that minimise the padded tokens
    computed (each batch pays its longest row for every row) plus `overhead` tokens per forward pass.
    Cutting a sorted list into contiguous batches is optimal for this cost; a DP over the cut points finds
    the best one. On BoolQ's first 200 rows, fixed chunks of 16 compute 29% more tokens than the rows hold;
    these batches 1%."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    cost, cut = [0] + [math.inf] * n, [0] * (n + 1)  # cost[j]: best for the first j; cut[j]: its last batch start
    for j in range(1, n + 1):
        for i in range(max(0, j - batch_size), j):
            c = cost[i] + (j - i) * lengths[order[i]] + overhead
            if c < cost[j]:
                cost[j], cut[j] = c, i
    batches, j = [], n
    while j > 0:
        batches.append(order[cut[j] : j])
        j = cut[j]
    return batches[::-1]


@torch.no_grad()  # as window_nlls: a model still in training may be scored
def score_items(model, tokenizer, items, batch_size=16, bos=None, name="score"):
    """Per item, the list of continuation log-likelihood sums (float64), in the items' order."""
    bos = _resolve_bos(tokenizer, bos)
    device = next(model.parameters()).device
    max_len = model.args.max_seq_len
    rows = [pack_item([encode_pair(tokenizer, c, x, bos) for c, x in zip(ctxs, conts)], max_len)
            for ctxs, conts, _ in items]
    scores, done = [None] * len(rows), 0
    progress = Progress(name, len(rows), unit="items")
    # a forward's fixed cost in tokens: ~nothing on CPU; a small forward on a GPU is launch-bound (an estimate)
    overhead = 16 if device.type == "cpu" else 1024
    for batch in length_batches([len(r[0]) for r in rows], batch_size, overhead):
        T = max(len(rows[i][0]) for i in batch)
        tokens = torch.zeros(len(batch), T, dtype=torch.long)
        positions = torch.zeros(len(batch), T, dtype=torch.long)
        segments = torch.full((len(batch), T), -1, dtype=torch.long)  # -1: padding
        for b, i in enumerate(batch):
            tok, pos, seg, _ = rows[i]
            tokens[b, : len(tok)], positions[b, : len(tok)], segments[b, : len(tok)] = (
                torch.tensor(tok), torch.tensor(pos), torch.tensor(seg))
        # a token sees earlier tokens of the shared prefix (segment 0) and of its own segment
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        same = (segments[:, :, None] == segments[:, None, :]) | (segments[:, None, :] == 0)
        mask = (causal & same)[:, None].to(device)
        hidden = packed_hidden(model, tokens.to(device), positions.to(device), mask)
        rows_b = [b for b, i in enumerate(batch) for p in rows[i][3] for _ in p]
        cols = [r for i in batch for p in rows[i][3] for r, _ in p]
        targets = torch.tensor([t for i in batch for p in rows[i][3] for _, t in p], device=device)
        logprobs = F.log_softmax(model.output(hidden[rows_b, cols]).float(), dim=-1)
        picked = logprobs.gather(1, targets[:, None])[:, 0].double().cpu().tolist()
        for i in batch:
            sums = []
            for p in rows[i][3]:
                sums.append(math.fsum(picked[: len(p)]))
                picked = picked[len(p) :]
            scores[i] = sums
        done += len(batch)
        progress.redraw(done)
    return scores


def _argmax(values):
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first maximum, as np.argmax


def evaluate_task(model, tokenizer, task, data_dir, limit=None, batch_size=16, bos=None):
    """{"n", "acc", "acc_norm", "samples"} for one zero-shot task on an in-memory model."""
    items = read_task(data_dir, task, limit)
    scores = score_items(model, tokenizer, items, batch_size, bos, name=task)
    samples = []
    for doc_id, ((_, conts, gold), lls) in enumerate(zip(items, scores)):
        pred = _argmax(lls)
        # acc_norm divides by the choice's length in characters (the continuation minus its " ")
        pred_norm = None if task in NO_ACC_NORM else _argmax([s / len(c[1:]) for s, c in zip(lls, conts)])
        samples.append({"doc_id": doc_id, "gold": gold, "pred": pred, "pred_norm": pred_norm, "loglikelihoods": lls})
    n = len(samples)
    acc = sum(s["pred"] == s["gold"] for s in samples) / n
    acc_norm = None if task in NO_ACC_NORM else sum(s["pred_norm"] == s["gold"] for s in samples) / n
    return {"n": n, "acc": acc, "acc_norm": acc_norm, "samples": samples}


def evaluate(model, tokenizer, tasks, data_dir, limit=None, batch_size=16, bos=None, ppl_seq_len=2048,
             ppl_windows=0, ppl_split="test") -> dict:
    """Run `tasks` (names from TASKS and/or "wikitext2") on an in-memory model. limit: the first N records of
    each zero-shot task; ppl_windows: the first N WikiText-2 windows of ppl_seq_len tokens (0: all) of
    ppl_split (test or valid).
    Returns {"results": {task: {...}}, "mean7": mean acc of PAPER_TASKS when all ran, else None}."""
    results = {}
    for task in tasks:
        if task == "wikitext2":
            ppl = WikiText2(tokenizer, data_dir, ppl_seq_len, ppl_windows, bos, ppl_split)
            t0 = time.perf_counter()
            results[task] = {"n": ppl.protocol["windows"], "ppl": ppl(model), "protocol": ppl.protocol,
                             "seconds": time.perf_counter() - t0}
        else:
            t0 = time.perf_counter()
            results[task] = evaluate_task(model, tokenizer, task, data_dir, limit, batch_size, bos)
            results[task]["seconds"] = time.perf_counter() - t0
    mean7 = (sum(results[t]["acc"] for t in PAPER_TASKS) / len(PAPER_TASKS)
             if all(t in results for t in PAPER_TASKS) else None)
    return {"results": results, "mean7": mean7}


# -----------------------------------------------------------------------------------------------------
# CLI


def parse_tasks(spec):
    names = ["wikitext2", *TASKS] if spec == "all" else [t.strip() for t in spec.split(",") if t.strip()]
    for t in names:
        if t != "wikitext2" and t not in TASKS:
            raise UserError(f"unknown task {t!r}; choose from all, wikitext2, {', '.join(TASKS)}")
    if not names:
        raise UserError("no tasks given; use --tasks all or a comma list")
    return names


def fmt(x, spec=".4f"):
    return "-" if x is None else format(x, spec)


def check_json(args):
    """--json (with --log-samples, --overwrite) names a file this run may write; checked before the work."""
    if args.log_samples and not args.json:
        raise UserError("--log-samples writes each item's log-likelihoods into the --json file: add --json FILE")
    if not args.json:
        return
    if Path(args.json).is_dir():
        raise UserError(f"--json {args.json} is a directory; give a file name, e.g. {Path(args.json) / 'results.json'}")
    if Path(args.json).exists() and not args.overwrite:
        raise UserError(f"--json {args.json} already exists: pass --overwrite to replace it, or choose another file")
    check_output_file(args.json)  # a directory that can't be written fails now, not after the evaluation


def main(argv=None):
    args = parse_config(EvalArgs, argv)
    check_json(args)
    tasks = parse_tasks(args.tasks)
    if "wikitext2" in tasks:
        check_ppl_seq_len(args.ppl_seq_len)
    device, data_dir = resolve_device(args.device), resolve_data_dir(args.data_dir)
    files = [str(task_file(data_dir, t)) for t in tasks if t != "wikitext2"]
    for t in tasks:  # bad data fails before the model loads
        if t != "wikitext2":
            read_task(data_dir, t, args.limit)
    if "wikitext2" in tasks:
        files.insert(0, str(wikitext2_path(data_dir, args.ppl_split)))
    model, tokenizer = load(args.ckpt, device=device, dtype=DTYPES[args.dtype])
    bos = {"auto": None, "yes": True, "no": False}[args.bos]
    out = evaluate(model, tokenizer, tasks, data_dir, args.limit, args.batch_size, bos, args.ppl_seq_len,
                   args.ppl_windows, args.ppl_split)
    protocol = {"model": args.ckpt, "dtype": args.dtype, "device": str(device), "ppl_seq_len": args.ppl_seq_len,
                "ppl_windows": args.ppl_windows, "bos": _resolve_bos(tokenizer, bos), "bos_flag": args.bos,
                "limit": args.limit, "data_files": files,
                "scoring": "lm-evaluation-harness rules, zero-shot; acc_norm = score / len(choice) in characters"}
    print(f"\n{'task':<14} {'n':>6} {'acc':>8} {'acc_norm':>9} {'ppl':>9}")
    for task, r in out["results"].items():
        print(f"{task:<14} {r['n']:>6} {fmt(r.get('acc')):>8} {fmt(r.get('acc_norm')):>9} {fmt(r.get('ppl'), '.3f'):>9}")
    if out["mean7"] is not None:
        print(f"{'mean of 7':<14} {'':>6} {out['mean7']:>8.4f}   (acc; BoolQ RTE HellaSwag WinoGrande ARC-e ARC-c OBQA)")
    if "wikitext2" in out["results"]:
        p = out["results"]["wikitext2"]["protocol"]
        print(f"wikitext2: {p['tokens']:,} tokens, {p['windows']} windows of L={p['seq_len']}, BOS={p['bos']}")
    print("protocol: " + ", ".join(f"{k}={v}" for k, v in protocol.items() if k != "data_files"))
    print("data files: " + " ".join(files))
    if args.json:
        if not args.log_samples:
            for r in out["results"].values():
                r.pop("samples", None)
        out["protocol"] = protocol
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(out, indent=1)))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    cli_main(main)
