"""A trainer's run directory (--out), checked before anything loads: made and tested, never holding or inside what the
run reads, locked for the life of the run (one line naming the pid of a run already there), and on --resume a
state.pt of the same kind of run with the same defining flags (each one that differs is named). --overwrite deletes
the run's own files only after its inputs have loaded (clear_run).

    state = rundir.open_run(args, "train_ast", state_keys=("model", ...), reads={"--ckpt": args.ckpt}, rank=rank)
    ... load the models and data ...
    rundir.clear_run(args, rank)
    training.save_state(out / "state.pt", {"step": step, ..., **rundir.run_record(args, "train_ast")})
"""
from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import torch.distributed as dist

from cli import UserError, check_output_dir, flag, lock_dir
from training import JsonlLog, load_state


RUN_FILES = ("state.pt", "log.jsonl", "log.png", "final")  # what a run writes into --out
# Flags that may change on --resume: where files are, how fast it runs, how often it reports and checkpoints, how
# long it trains, and the remedies a NaN stop suggests (--lr, --warmup-steps). Every other flag defines the run: it is
# stored in state.pt and must match.
RESUMABLE_FLAGS = ("out", "resume", "overwrite", "max_steps", "lr", "warmup_steps", "data_dir", "device", "compile",
                   "activation_checkpointing", "log_interval", "ckpt_interval", "eval_interval")
PATH_FLAGS = ("ckpt", "init_mask", "data")  # compared as absolute paths when they name a file or directory here


def run_flags(args) -> dict:
    """The flags that define a run (all but RESUMABLE_FLAGS), paths made absolute."""
    flags = {}
    for name, value in asdict(args).items():
        if name not in RESUMABLE_FLAGS:
            if name in PATH_FLAGS and isinstance(value, str) and value and Path(value).exists():
                value = str(Path(value).resolve())
            flags[name] = value
    return flags


def run_record(args, kind: str) -> dict:
    """What a trainer adds to every state.pt so that --resume can check it continues the same run."""
    return {"kind": kind, "flags": run_flags(args)}


def _spell(name, value) -> str:
    if isinstance(value, bool):
        return flag(name) if value else "--no-" + flag(name)[2:]
    return f"{flag(name)} {'(unset)' if value is None else value}"


def check_resume(state, args, kind: str, state_keys, path):
    """One line when state.pt is not a `kind` run (the other trainer's, or missing keys) or was started with other
    defining flags (each named). A state.pt without a record of its flags (written before they were stored) resumes
    unchecked, with a warning."""
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise UserError(f"--resume: {path} is not a state.pt of {kind}.py (no step); point --out at a {kind} run, "
                        f"or start again with --overwrite")
    other = state.get("kind")
    if other is not None and other != kind:
        raise UserError(f"--resume: {path} is a {other}.py run, not a {kind}.py one; continue it with {other}.py")
    missing = [k for k in state_keys if k not in state]
    if missing:
        raise UserError(f"--resume: {path} lacks {', '.join(missing)}: not a complete {kind}.py state; start again "
                        f"with --overwrite instead of --resume")
    if "flags" not in state:
        print(f"warning: {path} records no flags (an older version wrote it): resuming with the flags given, unchecked")
        return
    given = run_flags(args)
    differ = [name for name, value in state["flags"].items() if name in given and given[name] != value]
    if differ:
        was = ", ".join(_spell(n, state["flags"][n]) for n in differ)
        now = ", ".join(_spell(n, given[n]) for n in differ)
        raise UserError(f"--resume: {path} was started with {was}, not {now}; these flags define the run (only "
                        f"{', '.join(flag(n) for n in RESUMABLE_FLAGS[3:8])}, ... may change on --resume): resume with "
                        f"the run's values, or start a new run in another --out")


def check_inputs(out: Path, reads: dict):
    """Refuse an --out that holds, or is inside, a file or directory the run reads ({flag: path}): --overwrite would
    delete it, the export replace it."""
    where = out.resolve()
    for name, value in reads.items():
        if value and Path(value).exists():
            source = Path(value).resolve()
            if source == where or where in source.parents:
                raise UserError(f"--out {out} holds {name} {value}, which this run reads (and --overwrite or the "
                                f"export would replace); choose an --out outside it")
            if source in where.parents:
                raise UserError(f"--out {out} is inside {name} {value}, which this run reads; choose an --out "
                                f"outside it")


def _open_run(args, kind, state_keys, reads):
    """Rank 0's part of open_run: every check, the lock, and the state to resume."""
    out = Path(args.out)
    if args.resume and args.overwrite:
        raise UserError("--resume continues the run in --out and --overwrite deletes it: pass one of them")
    check_inputs(out, reads)
    if out.is_dir():
        lock_dir(out)  # first: a run still writing there is named by its pid, not by its files
    if not args.resume:
        check_output_dir(out, args.overwrite, resumable=True)  # makes and tests --out
        lock_dir(out)
        return None
    state = load_state(out / "state.pt")
    check_resume(state, args, kind, state_keys, out / "state.pt")
    step = state["step"]
    if finished(args, state):
        print(f"{out} already finished {step} of --max-steps {args.max_steps}; its results are in "
              f"{out / 'final'}. Nothing to do (raise --max-steps to train on).")
    elif step > args.max_steps:
        raise UserError(f"--resume: {out / 'state.pt'} is at step {step}, past --max-steps {args.max_steps}, and "
                        f"its export is missing; pass --max-steps {step} to export it")
    elif step == args.max_steps:
        print(f"{out / 'state.pt'} holds all {step} steps but {out / 'final'} is missing (an interrupted export): "
              f"exporting again")
    else:
        JsonlLog(out / "log.jsonl").keep_until(step)
        print(f"resuming from {out / 'state.pt'} at step {step}")
    return state


def open_run(args, kind: str, state_keys=(), reads=None, rank=0):
    """Before anything is loaded: the state to resume (--resume), or None for a fresh run. Rank 0 checks --out (made
    and tested; refused when it holds or is inside one of `reads`, {flag: path}), locks it for the life of the run
    (lock_dir), and on --resume checks state.pt against `kind`, `state_keys` and the defining flags; the other ranks
    learn the outcome from it. A fresh run never writes into a --out that holds anything unless --overwrite, whose
    deletion waits for clear_run (after the run has read its inputs); a resumed run cuts its log back to the
    checkpoint's step; a finished run is reported (see finished)."""
    error = state = None
    if rank == 0:
        try:
            state = _open_run(args, kind, state_keys, reads or {})
        except UserError as e:
            error = e
    if dist.is_initialized():
        said = [str(error) if error else None]
        dist.broadcast_object_list(said, src=0)
        if said[0] is not None:
            dist.destroy_process_group()
            if rank:
                raise SystemExit(1)  # rank 0 prints the line
        elif args.resume and rank:
            state = load_state(Path(args.out) / "state.pt")
    if error:
        raise error
    return state


def finished(args, state) -> bool:
    """A resumed run with nothing left to do: every step trained and final/ exported."""
    return state is not None and state["step"] >= args.max_steps and (Path(args.out) / "final").is_dir()


def clear_run(args, rank=0):
    """--overwrite on a fresh run: delete the run's own files, once everything the run reads has loaded."""
    if args.overwrite and not args.resume and rank == 0:
        for name in RUN_FILES:
            path = Path(args.out) / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    if dist.is_initialized():
        dist.barrier()  # no rank starts writing before rank 0 has cleared the directory
