"""What every script shares, importing nothing of this project: one-line errors, a config dataclass turned
into flags (each field's comment is its --help), one table of what each flag accepts, dtypes, devices,
atomic writes, a progress line and peak memory.

    @dataclass
    class Config:
        seq_len: int = 2048  # tokens per window
        dtype: Literal["float32", "bfloat16"] = "float32"  # weight dtype
    cfg = parse_config(Config)   # --seq-len 0 -> "error: --seq-len 0: must be a positive integer", exit 1

A flag means the same thing in every script, so its accepted range is written once, in RANGES below.
"""
import argparse
import dataclasses
import errno
import inspect
import io
import math
import os
import re
import shutil
import sys
import time
import tokenize
import types
import typing
from contextlib import nullcontext
from pathlib import Path

import torch


class UserError(Exception):
    """Bad input (a missing file, a wrong shape, an unknown name): reported as one line, never a traceback."""


class DiskFull(UserError):
    """A write that found no space left: the line says what failed (`failed`, for a caller to add to) and what was
    kept."""

    def __init__(self, failed: str, kept: str):
        super().__init__(f"{failed}; {kept}")
        self.failed = failed


CPU_OOM = "DefaultCPUAllocator: can't allocate memory"  # torch's message when the CPU allocation fails


def cli_main(main):
    """Run a script's main(); bad input (and a full disk, or memory run out) ends with one line on stderr and exit
    status 1. Locks taken with lock_dir are released however main() ends."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        if not disk_full(e):
            raise
        print(f"error: the disk is full{f' writing {e.filename}' if e.filename else ''}; free some space and run again",
              file=sys.stderr)
        sys.exit(1)
    except RuntimeError as e:  # torch.OutOfMemoryError (CUDA) is one; the CPU allocator raises a plain one
        where = "the GPU" if isinstance(e, torch.OutOfMemoryError) else "the CPU" if CPU_OOM in str(e) else None
        if where is None:
            raise
        n_bytes, size = re.search(r"allocate (\d+) bytes", str(e)), re.search(r"allocate ([\d.]+ [KMGT]iB)", str(e))
        asked = f"{int(n_bytes[1]) / 2 ** 30:.2f} GiB" if n_bytes else size[1] if size else None
        print(f"error: out of memory on {where}{f' (tried to allocate {asked})' if asked else ''}: use smaller "
              f"batches or shorter sequences (--batch-size, --seq-len, --nsamples: see --help)", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        release_locks()


# ----------------------------------------------------------------------------- dtypes and devices

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DType = typing.Literal["float32", "bfloat16", "float16"]  # the values of every --dtype flag
Device = typing.Literal["auto", "cpu", "cuda"]


def resolve_device(name: str) -> torch.device:
    """auto: cuda when torch sees a GPU, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def autocast(dtype: torch.dtype, device):
    """Mixed precision context (weights keep their dtype); a no-op for float32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


# ----------------------------------------------------------------------------- flags


def _positive(v):
    return v > 0


def _non_negative(v):
    return v >= 0


def _fraction(v):
    return 0 <= v <= 1


def _below_one(v):
    return 0 <= v < 1


POSITIVE, NON_NEGATIVE = (_positive, "must be positive"), (_non_negative, "must be 0 or more")
RANGES = {  # flag -> (test, what it accepts); None (where a field allows it) always passes
    "max_steps": POSITIVE, "batch_size": POSITIVE, "grad_accum": POSITIVE, "seq_len": POSITIVE,
    "ppl_seq_len": POSITIVE, "calib_len": POSITIVE, "nsamples": POSITIVE, "log_interval": POSITIVE,
    "limit": POSITIVE, "lr": POSITIVE, "mask_lr": POSITIVE, "temperature": POSITIVE, "blocksize": POSITIVE,
    "group_size": POSITIVE, "width_multiple": POSITIVE, "runs": POSITIVE, "model_runs": POSITIVE,
    "decode_steps": POSITIVE, "decay_warmup": POSITIVE, "lora_alpha": POSITIVE, "repeat": POSITIVE,
    "threads": NON_NEGATIVE,
    "ppl_windows": (_non_negative, "must be 0 (all windows) or more"),
    "eval_interval": (_non_negative, "must be 0 (only at the start and the end) or more"),
    "ckpt_interval": (_non_negative, "must be 0 (only at the end) or more"),
    "mask_interval": (_non_negative, "must be 0 (a fixed mask) or more"),
    "warmup_steps": NON_NEGATIVE, "weight_decay": NON_NEGATIVE, "grad_clip": NON_NEGATIVE, "decay_max": NON_NEGATIVE,
    "slorb_k": NON_NEGATIVE, "milestone": NON_NEGATIVE, "hsm_rank": NON_NEGATIVE, "lora_rank": NON_NEGATIVE,
    "count_weight": NON_NEGATIVE, "polar_weight": NON_NEGATIVE, "identity_weight": NON_NEGATIVE,
    "percdamp": (_positive, "must be positive (0 leaves a singular Hessian without damping; 0.01 is usual)"),
    "alpha": (_fraction, "must be in [0, 1]"), "min_lr_ratio": (_fraction, "must be in [0, 1]"),
    "ratio": (_below_one, "must be in [0, 1)"), "beta2": (_below_one, "must be in [0, 1)"),
    "seed": (lambda v: 0 <= v < 2 ** 63, "must be in [0, 2**63)"),  # what a torch.Generator takes (and seed + epoch)
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_comments(cls) -> dict:
    """{field: its trailing comment} from the source of cls and its bases (a subclass's comment wins)."""
    comments = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        names = {}  # line number -> the field defined on it
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
        for a, b in zip(tokens, tokens[1:]):
            if a.type == tokenize.NAME and b.string == ":" and a.start[1] == 4:
                names[a.start[0]] = a.string
        for t in tokens:
            if t.type == tokenize.COMMENT and t.start[0] in names:
                comments[names[t.start[0]]] = t.string.lstrip("#").strip()
    return comments


def _flag_kind(hint):
    """(argparse type, choices) of a field annotation: int, float, str, X | None -> X, Literal[...] -> choices."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        return type(choices[0]), choices
    return hint, None


def parse_config(cls, argv=None):
    """One flag per dataclass field (max_steps -> --max-steps; bools as --flag/--no-flag), its comment as
    --help, Literal fields as choices; then check_config. Returns an instance of cls."""
    parser = argparse.ArgumentParser(description=(cls.__doc__ or "").strip() or None,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints, comments = typing.get_type_hints(cls), field_comments(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind, choices = _flag_kind(hints[f.name])
        help_text = comments.get(f.name, " ").replace("%", "%%")
        if kind is bool:
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(flag(f.name), type=kind, choices=choices, default=default, help=help_text)
    return check_config(cls(**vars(parser.parse_args(argv))))


def check_config(cfg):
    """Every field's value against RANGES and, for --device cuda, a GPU that torch can see; returns cfg."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):  # nan fails every test unexplained; inf passes
            raise UserError(f"{flag(f.name)} {value}: must be a finite number")
        if f.name in RANGES and value is not None and not isinstance(value, bool):
            test, accepts = RANGES[f.name]
            if not test(value):
                raise UserError(f"{flag(f.name)} {value}: {accepts}")
    if getattr(cfg, "device", None) == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device cuda: torch {torch.__version__} sees no CUDA GPU here; use --device cpu (or auto)")
    return cfg


def _writable_dir(directory: Path, path: Path, what: str):
    """Create a probe file in `directory` and remove it: one line naming `path` when nothing can be written there."""
    probe = directory / f".write-test{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write {what}{path}: {e.strerror.lower()} in {directory}; "
                        f"choose a writable place") from None


def _file_above(path: Path) -> Path | None:
    """The file standing where one of path's directories should be, if any."""
    return next((p for p in path.parents if p.exists() and not p.is_dir()), None)


def check_output_file(path, flag: str | None = None) -> Path:
    """Before the work, not after it: `path` is a writable place for a file (not a directory, its directory exists
    and takes a new file). Creates nothing that stays. flag (e.g. "--json"): named in the line."""
    path, what = Path(path), f"{flag} " if flag else ""
    if path.is_dir():
        raise UserError(f"cannot write {what}{path}: it is a directory; give a file name inside it")
    parent = path.parent
    blocker = _file_above(path)
    if blocker:
        raise UserError(f"cannot write {what}{path}: {blocker} is a file, not a directory")
    if not parent.is_dir():
        raise UserError(f"cannot write {what}{path}: the directory {parent} does not exist; create it first")
    _writable_dir(parent, path, what)
    return path


LOCK_FILE = ".lock"  # in a run directory while a process holds it: that process's pid


def check_output_dir(path, overwrite=False, resumable=False, flag: str = "--out") -> Path:
    """A directory to write results into, created and tested now (before the work): refused when it is a file, cannot
    be made or written, or already holds files, unless --overwrite. resumable: the script can also continue what is
    there (--resume), and the line says so. A run's lock file (LOCK_FILE) does not count as content."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file; {flag} is a directory")
    present = sorted(p.name for p in path.iterdir() if p.name != LOCK_FILE) if path.is_dir() else []
    if present and not overwrite:
        what = (("continue that run with --resume, start over with --overwrite, or choose another --out") if resumable
                else f"choose another {flag}, or pass --overwrite to replace what this script writes there")
        raise UserError(f"{flag} {path} already holds {', '.join(present[:4])}{' ...' if len(present) > 4 else ''}: "
                        f"{what}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = _file_above(path)
        why = f"{blocker} is a file, not a directory" if blocker else e.strerror.lower()
        raise UserError(f"cannot create {flag} {path}: {why}; choose another {flag}") from None
    _writable_dir(path, path, f"{flag} ")
    return path


_held_locks = {}  # resolved directory -> the open descriptor whose flock this process holds


def lock_dir(path, flag: str = "--out"):
    """Hold an exclusive lock on a directory until release_locks() or the process ends (the kernel drops it then, so
    a crashed run never blocks the next one). A second process gets one line naming the first's pid. Re-entrant
    within a process. No-op where flock is unavailable (a filesystem without locks, or no fcntl)."""
    try:
        import fcntl  # Unix
    except ImportError:
        return
    path = Path(path).resolve()
    if path in _held_locks:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        try:
            pid = (path / LOCK_FILE).read_text().strip() or "unknown"
        except OSError:
            pid = "unknown"
        raise UserError(f"{flag} {path} is in use by another run (pid {pid}); wait for it to end, or choose another "
                        f"{flag}") from None
    except OSError:  # no locks on this filesystem
        os.close(fd)
        return
    _held_locks[path] = fd
    (path / LOCK_FILE).write_text(f"{os.getpid()}\n")


def release_locks():
    """Release every lock_dir of this process (its pid file first, then the lock)."""
    while _held_locks:
        path, fd = _held_locks.popitem()
        try:
            (path / LOCK_FILE).unlink(missing_ok=True)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------- files


def disk_full(e: BaseException) -> bool:
    """Whether a failed write ran out of space: ENOSPC / EDQUOT, safetensors' "os error 28", or torch.save's short
    write ("unexpected pos", which carries no errno)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return any(s in text for s in ("No space left on device", "os error 28", "Disk quota exceeded", "unexpected pos"))


def atomic_write(path, write):
    """write(temporary path) in the same directory, then rename over `path`: a crash never leaves half a file.
    A full disk is one line (DiskFull) saying that the previous file, if any, is kept as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except Exception as e:
        if not disk_full(e):
            raise
        tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free
        kept = f"the previous {path.name} there is kept as it was" if path.exists() else "nothing was written there"
        raise DiskFull(f"the disk is full: could not write {path} ({free / 2 ** 20:.1f} MiB free)", kept) from None
    finally:
        tmp.unlink(missing_ok=True)


def atomic_dir(path, write):
    """write(temporary directory) beside `path`, then swap it in: an interrupted write leaves no half directory at
    `path` (the temporary one is cleared at the next call). One writer per directory (see lock_dir)."""
    path = Path(path)
    tmp, old = path.with_name(f".{path.name}.partial"), path.with_name(f".{path.name}.old")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        write(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- progress and memory


class Progress:
    """`step 120/1000 | loss 2.31 | 5,400 tok/s | ETA 12m03s` (line) or a stderr line redrawn each second (redraw)."""

    def __init__(self, name, total, unit="steps", start=0):
        self.name, self.total, self.unit, self.start = name, total, unit, start
        self.t0 = self.t_last = time.perf_counter()
        self.t_drawn = 0.0

    def line(self, done, tokens=None, **fields) -> str:
        """done: units finished so far; tokens: tokens processed since the previous line (shows tok/s)."""
        now = time.perf_counter()
        if tokens is not None:
            rate = f"{tokens / max(now - self.t_last, 1e-9):,.0f} tok/s"
        else:
            rate = f"{(done - self.start) / max(now - self.t0, 1e-9):.2f} {self.unit}/s"
        self.t_last = now
        eta = (now - self.t0) / (done - self.start) * (self.total - done) if done > self.start else 0.0
        parts = " ".join(f"{k} {v:.4g}" for k, v in fields.items() if v is not None)
        return " | ".join(p for p in (f"{self.name} {done}/{self.total}", parts, rate,
                                      f"ETA {int(eta // 60)}m{int(eta % 60):02d}s") if p)

    def redraw(self, done):
        """Redraw the line on stderr at most once a second; the last one ends with a newline."""
        now = time.perf_counter()
        if now - self.t_drawn < 1.0 and done < self.total:
            return
        self.t_drawn = now
        print("\r" + self.line(done), end="\n" if done >= self.total else "", file=sys.stderr, flush=True)


def reset_peak_memory(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: resets the process's peak resident set size (VmHWM)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_memory_gb(device) -> float:
    """Peak GPU memory allocated by torch, or on CPU the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 2 ** 30
    except OSError:
        pass
    import resource  # Unix only
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 30
