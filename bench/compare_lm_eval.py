"""Our eval.py against lm-evaluation-harness itself (HF backend, on our Hugging Face export of the same
weights), both scoring the same task files: agreement (both accuracies per task and the fraction of items
whose predictions are identical), or with --speed, items/s of each side and the ratio.

    pip install lm-eval          # a reference for this script only, not a project dependency
    python bench/compare_lm_eval.py --ckpt smollm2-135m --limit 200 --batch-size 16 --bos no
    python bench/compare_lm_eval.py --speed --limit 50 --batch-size 16 --threads 1

The harness reads our files through local task YAMLs written to a temp dir: each one `include`s the
harness's own YAML for the task (its templates, preprocessing and metrics) and only swaps the dataset for
`dataset_path: json` + `data_files` (and adds acc_norm to BoolQ/RTE, whose YAMLs list only acc).
BOS: both sides get the same setting (--bos no: no BOS; yes: BOS before every request).

--speed: the same machine, threads and batch size for both; each side is warmed up on 2 items first, then
timed per task (ours first, then the harness), excluding model loading and dataset building. Why we are
faster: one packed row per item (shared context computed once, choices as segments), the LM head only at
continuation positions, and batch boundaries chosen to minimise padding (eval.length_batches); the harness
runs one row per (context, choice), a full-vocab log_softmax at every position, and fixed chunks of its
length-sorted requests.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eval as ev  # noqa: E402
from checkpoint import export_hf, load, resolve  # noqa: E402
from cli import UserError, cli_main, parse_config  # noqa: E402
from data import resolve_data_dir  # noqa: E402
from tokenizer import SMOLLM_PATTERN  # noqa: E402

HARNESS_YAML = {"hellaswag": "hellaswag/hellaswag.yaml", "piqa": "piqa/piqa.yaml", "arc_easy": "arc/arc_easy.yaml",
                "arc_challenge": "arc/arc_challenge.yaml", "winogrande": "winogrande/default.yaml",
                "boolq": "super_glue/boolq/default.yaml", "rte": "glue/rte/default.yaml",
                "openbookqa": "openbookqa/openbookqa.yaml"}
SPLIT = {"arc_easy": "test", "arc_challenge": "test", "openbookqa": "test"}  # the rest: validation


@dataclass
class CompareArgs:
    """Run eval.py and lm-evaluation-harness on the same files and model; print agreement (or speed) per task."""
    ckpt: str = "smollm2-135m"  # model name or checkpoint path (checkpoint.load)
    tasks: str = "all"  # comma list of the eight zero-shot tasks, or all
    limit: int = 200  # first N records of each task file, for both
    batch_size: int = 16  # ours: items per forward; the harness: requests per forward
    bos: Literal["yes", "no"] = "no"  # a BOS before every request, for both sides
    speed: bool = False  # time both sides per task (each warmed up) instead of comparing predictions
    data_dir: str | None = None  # default ./data, then ../shared/data
    out: str = "out/compare_lm_eval"  # directory: HF export, tokenizer, compare.json
    threads: int = 0  # torch threads for both sides (0: torch's default)


def export_for_harness(model, tokenizer, ckpt, out) -> tuple[Path, Path]:
    """(model dir, tokenizer dir) that transformers loads: checkpoint.export_hf + a HF tokenizer from the GGUF."""
    from transformers import AutoTokenizer
    model_dir, tok_dir = Path(out) / "hf_model", Path(out) / "hf_tokenizer"
    export_hf(model, tokenizer, model_dir)
    source = resolve(ckpt)
    if source.suffix == ".gguf":
        hf_tok = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        if getattr(tokenizer, "pattern", None) == SMOLLM_PATTERN:
            # transformers' GGUF converter drops SmolLM2's digit splitting, so " ¼" becomes [" \xc2", "\xbc"]
            # instead of [" ", "¼"] (0.3% of task strings); SmolLM2's own tokenizer.json splits digits first
            from tokenizers import pre_tokenizers as pt
            hf_tok.backend_tokenizer.pre_tokenizer = pt.Sequence(
                [pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif (source / "tokenizer.json").exists():
        hf_tok = AutoTokenizer.from_pretrained(str(source))
    else:
        raise UserError(f"no Hugging Face tokenizer for {ckpt}: use a GGUF or a HF directory with tokenizer.json")
    hf_tok.save_pretrained(tok_dir)
    return model_dir, tok_dir


def write_task_yamls(yaml_dir, data_dir, tasks) -> dict[str, str]:
    """One YAML per task (JSON is YAML) that includes the harness's own; returns our task -> harness name."""
    import lm_eval.tasks
    harness_dir = Path(lm_eval.tasks.__file__).parent
    names = {}
    for task in tasks:
        split = SPLIT.get(task, "validation")
        cfg = {"include": str(harness_dir / HARNESS_YAML[task]), "task": f"sl_{task}", "tag": "sparsellama_compare",
               "dataset_path": "json", "dataset_name": None,
               "dataset_kwargs": {"data_files": {split: str(ev.task_file(data_dir, task).resolve())}},
               "training_split": None, "validation_split": split if split == "validation" else None,
               "test_split": split if split == "test" else None}
        if task in ("boolq", "rte"):
            cfg["metric_list"] = [{"metric": "acc"}, {"metric": "acc_norm"}]
        (Path(yaml_dir) / f"sl_{task}.yaml").write_text(json.dumps(cfg, indent=1))
        names[task] = f"sl_{task}"
    return names


def harness_lm(model_dir, tok_dir, batch_size, bos, tokenizer=None, check_texts=()):
    """The harness's HF model; with `tokenizer`, first check that the harness tokenizes `check_texts` (with
    this BOS setting) exactly as ours does, so that a disagreement can't come from the tokenizers."""
    from lm_eval.models.huggingface import HFLM
    lm = HFLM(pretrained=str(model_dir), tokenizer=str(tok_dir), batch_size=batch_size, device="cpu",
              dtype="float32", add_bos_token=bos)
    for text in check_texts:
        if lm.tok_encode(text) != tokenizer.encode(text, bos=bos):
            raise UserError(f"the harness's tokenizer (add_bos_token={bos}) encodes {text[:40]!r} differently "
                            f"from ours; compare with the other --bos setting")
    return lm


def run_harness_task(lm, task_manager, name, limit):
    """(per-doc list of choice log-likelihoods, per-doc choice texts, seconds of evaluate() alone)."""
    import lm_eval.evaluator
    loaded = task_manager.load([name])  # builds the dataset from our JSON file (not timed)
    for t in loaded["tasks"].values():
        t.set_config(key="num_fewshot", value=0)
        t.set_fewshot_seed(seed=1234)
    t0 = time.perf_counter()
    res = lm_eval.evaluator.evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=0, log_samples=True,
                                     verbosity="WARNING")
    seconds = time.perf_counter() - t0
    samples = sorted(res["samples"][name], key=lambda s: s["doc_id"])
    lls = [[float(r[0][0]) for r in s["resps"]] for s in samples]
    metrics = res["results"][name]
    return lls, seconds, metrics


def harness_predictions(task, lls, items):
    """acc / acc_norm predictions from the harness's log-likelihoods with the harness's rule (np.argmax)."""
    preds, norms = [], []
    for ll, (_, conts, _) in zip(lls, items):
        preds.append(int(np.argmax(ll)))
        norms.append(None if task in ev.NO_ACC_NORM else int(np.argmax(np.array(ll) / [len(c[1:]) for c in conts])))
    return preds, norms


def compare(args, model, tokenizer, data_dir, tasks, bos, lm, task_manager, names):
    """Per task: both sides' acc and acc_norm, identical predictions, the largest log-likelihood difference."""
    rows, report = [], {}
    for task in tasks:
        items = ev.read_task(data_dir, task, args.limit)
        t0 = time.perf_counter()
        ours = ev.evaluate_task(model, tokenizer, task, data_dir, args.limit, args.batch_size, bos)
        ours_s = time.perf_counter() - t0
        h_lls, h_s, h_metrics = run_harness_task(lm, task_manager, names[task], args.limit)
        h_pred, h_norm = harness_predictions(task, h_lls, items)
        n = len(items)
        assert len(h_lls) == n == ours["n"], (task, len(h_lls), n)
        same = sum(s["pred"] == p for s, p in zip(ours["samples"], h_pred)) / n
        same_norm = (None if task in ev.NO_ACC_NORM else
                     sum(s["pred_norm"] == p for s, p in zip(ours["samples"], h_norm)) / n)
        max_dll = max(abs(a - b) for s, ll in zip(ours["samples"], h_lls) for a, b in zip(s["loglikelihoods"], ll))
        h_acc = sum(p == it[2] for p, it in zip(h_pred, items)) / n
        h_acc_norm = None if task in ev.NO_ACC_NORM else sum(p == it[2] for p, it in zip(h_norm, items)) / n
        report[task] = dict(n=n, acc=ours["acc"], acc_norm=ours["acc_norm"], harness_acc=h_acc,
                            harness_acc_norm=h_acc_norm, harness_reported=h_metrics, same_pred=same,
                            same_pred_norm=same_norm, max_abs_dll=max_dll, ours_s=ours_s, harness_s=h_s)
        rows.append(report[task])
        print(f"{task}: same pred {same:.3f}, max |dll| {max_dll:.2e}, ours {ours_s:.1f}s, harness {h_s:.1f}s",
              file=sys.stderr)
    import lm_eval
    print(f"\nlm-eval {lm_eval.__version__ if hasattr(lm_eval, '__version__') else '?'} vs eval.py: {args.ckpt} fp32 CPU, "
          f"BOS={'yes' if bos else 'no'}, --limit {args.limit}, batch size {args.batch_size}, zero-shot")
    print("| task | n | acc ours | acc lm-eval | acc_norm ours | acc_norm lm-eval | same pred (acc) | same pred (acc_norm) | max abs Δ loglik |")
    print("|---|---|---|---|---|---|---|---|---|")
    for task, r in report.items():
        print(f"| {task} | {r['n']} | {r['acc']:.4f} | {r['harness_acc']:.4f} | {ev.fmt(r['acc_norm'])} | "
              f"{ev.fmt(r['harness_acc_norm'])} | {r['same_pred']:.4f} | {ev.fmt(r['same_pred_norm'])} | {r['max_abs_dll']:.1e} |")
    n_all = sum(r["n"] for r in rows)
    same_all = sum(r["same_pred"] * r["n"] for r in rows) / n_all
    ours_s, h_s = sum(r["ours_s"] for r in rows), sum(r["harness_s"] for r in rows)
    print(f"all: {n_all} items, identical acc predictions {same_all:.4f}; "
          f"time ours {ours_s:.1f}s ({n_all / ours_s:.2f} items/s), lm-eval {h_s:.1f}s ({n_all / h_s:.2f} items/s), "
          f"ratio {h_s / ours_s:.2f}x (threads {torch.get_num_threads()})")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "compare.json").write_text(json.dumps(report, indent=1, default=str))


def speed(args, model, tokenizer, data_dir, tasks, bos, lm, task_manager, names):
    """items/s of each side per task, each warmed up on 2 items of the first task, and the ratio."""
    ev.evaluate_task(model, tokenizer, tasks[0], data_dir, 2, args.batch_size, bos=bos)  # warm-up
    run_harness_task(lm, task_manager, names[tasks[0]], 2)
    rows = []
    for task in tasks:
        t0 = time.perf_counter()
        n = ev.evaluate_task(model, tokenizer, task, data_dir, args.limit, args.batch_size, bos=bos)["n"]
        ours = time.perf_counter() - t0
        theirs = run_harness_task(lm, task_manager, names[task], args.limit)[1]
        rows.append((task, n, ours, theirs))
    print(f"\n{args.ckpt} fp32 CPU, {torch.get_num_threads()} thread(s), batch size {args.batch_size}, "
          f"BOS={'yes' if bos else 'no'}, --limit {args.limit}")
    print("| task | n | ours items/s | lm-eval items/s | ratio |")
    print("|---|---|---|---|---|")
    for task, n, ours, theirs in rows:
        print(f"| {task} | {n} | {n / ours:.2f} | {n / theirs:.2f} | {theirs / ours:.2f}x |")
    n = sum(r[1] for r in rows)
    ours, theirs = sum(r[2] for r in rows), sum(r[3] for r in rows)
    print(f"| all | {n} | {n / ours:.2f} | {n / theirs:.2f} | {theirs / ours:.2f}x |")


def main(argv=None):
    args = parse_config(CompareArgs, argv)
    from lm_eval.tasks import TaskManager  # the reference, installed for this script only
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = list(ev.TASKS) if args.tasks == "all" else ev.parse_tasks(args.tasks)
    data_dir = resolve_data_dir(args.data_dir)
    bos = {"yes": True, "no": False}[args.bos]
    model, tokenizer = load(args.ckpt)
    model_dir, tok_dir = export_for_harness(model, tokenizer, args.ckpt, args.out)
    if args.speed:
        lm = harness_lm(model_dir, tok_dir, args.batch_size, bos)
    else:
        checks = [c + x for t in tasks for ctxs, conts, _ in ev.read_task(data_dir, t, args.limit)
                  for c, x in zip(ctxs, conts)]
        lm = harness_lm(model_dir, tok_dir, args.batch_size, bos, tokenizer, checks)
        print(f"tokenizers agree on all {len(checks)} request strings (BOS={'yes' if bos else 'no'})", file=sys.stderr)
    with tempfile.TemporaryDirectory() as yaml_dir:
        names = write_task_yamls(yaml_dir, data_dir, tasks)
        (speed if args.speed else compare)(args, model, tokenizer, data_dir, tasks, bos, lm,
                                           TaskManager(include_path=yaml_dir), names)


if __name__ == "__main__":
    cli_main(main)
