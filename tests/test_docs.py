"""README.md and docs/*.md against the code: every `python ...` command they show (in code blocks and in inline
code, `torchrun ... X.py` included) names a script or project module that exists and uses only flags that its
--help lists, and every relative link resolves, #anchors included. A renamed flag then fails here, not a reader.

Each script's --help runs once, in its own process, as `python X.py --help` would run it: one helper process imports
torch, then forks a child per script (all at once) that runs the script as __main__ (runpy) with argv [X.py, --help], so the suite
pays for importing torch once instead of once per script. A script with subcommands (`X.py sub ...`) is asked
`X.py sub --help` for the subcommands the docs use. Comment lines under a command in a code block (`#   --flag ...`)
list more flags of that command and are checked too.
"""
import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXTERNAL_MODULES = {"pytest", "pip", "torch.distributed.run"}  # `python -m X` that are not ours: not checked
FENCE = re.compile(r"^```(\w*)\s*$")
FLAG = re.compile(r"--[a-z0-9][a-z0-9_-]*")


# ----------------------------------------------------------------------------- finding the commands

def split_fences(text: str):
    """(prose lines with fenced blocks blanked, [(language, first line number, lines)] of the fenced blocks)."""
    prose, blocks, block = [], [], None
    for number, line in enumerate(text.splitlines(), 1):
        fence = FENCE.match(line.strip())
        if block is None and fence:
            block = (fence.group(1), number + 1, [])
            prose.append("")
        elif block is not None and line.strip() == "```":
            blocks.append(block)
            block = None
            prose.append("")
        elif block is not None:
            block[2].append(line)
            prose.append("")
        else:
            prose.append(line)
    return prose, blocks


def parse_command(text: str):
    """'OMP_NUM_THREADS=1 python bench/x.py --a 1 [--b]' -> ('bench/x.py', ['--a', '--b'], first positional or None),
    '... python -m pkg.mod ...' -> ('-m pkg.mod', ...), 'torchrun --nproc_per_node 8 x.py ...' -> ('x.py', ...);
    None when the text runs no Python script of ours (pip, python -c, an external module)."""
    for segment in text.split("&&"):
        words = [w.strip("[](),;`") for w in segment.split()]
        for i, word in enumerate(words):
            if word in ("python", "python3") and i + 1 < len(words):
                if words[i + 1] == "-c":
                    break
                if words[i + 1] == "-m" and i + 2 < len(words):
                    script, rest = "-m " + words[i + 2], words[i + 3:]
                    if words[i + 2] in EXTERNAL_MODULES:
                        break
                else:
                    script, rest = words[i + 1], words[i + 2:]
                return script, flags_in(rest), next((w for w in rest if w and not w.startswith("-")), None)
            if word == "torchrun":
                script = next((w for w in words[i + 1:] if w.endswith(".py")), None)
                if script:
                    rest = words[words.index(script, i) + 1:]
                    return script, flags_in(rest), None
    return None


def flags_in(words) -> list:
    return [m.group(0) for w in words for m in [FLAG.match(w.split("=")[0])] if m]


def commands_in(text: str, name: str) -> list:
    """[(where, script, flags, first positional)] for every Python command the markdown `text` shows."""
    prose, blocks = split_fences(text)
    found = []
    for language, first, lines in blocks:
        if language == "python":  # Python code, not a shell command
            continue
        logical, pending, start = [], "", None  # (first line number, text): backslash continuations joined
        for number, line in enumerate(lines, first):
            start = number if start is None else start
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            logical.append((start, pending + line))
            pending, start = "", None
        for number, line in logical:
            stripped = line.strip()
            if stripped.startswith("#"):  # `#   --flag ...` under a command: more flags of that command
                if found and found[-1][4] == (name, language, first):
                    found[-1][2].extend(FLAG.findall(stripped))
                continue
            command = parse_command(stripped.split(" #")[0])
            if command:
                found.append([f"{name}:{number}", command[0], command[1], command[2], (name, language, first)])
    for match in re.finditer(r"`([^`]+)`", "\n".join(prose)):
        command = parse_command(match.group(1).replace("\n", " "))
        if command:
            line_number = "\n".join(prose)[:match.start()].count("\n") + 1
            found.append([f"{name}:{line_number}", command[0], command[1], command[2], None])
    return [tuple(c[:4]) for c in found]


def all_commands() -> dict:
    """{script: [(where, flags, first positional)]} over README.md and docs/*.md."""
    by_script = defaultdict(list)
    for doc in DOCS:
        for where, script, flags, positional in commands_in(doc.read_text(encoding="utf-8"), doc.relative_to(ROOT).as_posix()):
            by_script[script].append((where, flags, positional))
    return dict(by_script)


COMMANDS = all_commands()


# ----------------------------------------------------------------------------- running --help

HELP_RUNNER = r"""
import json, os, runpy, sys, tempfile, traceback
import torch  # noqa: F401  imported once here; every forked child reuses it
root, children, results = sys.argv[1], [], {}
for key, argv in json.loads(sys.argv[2]):
    out = tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        code = 0
        try:
            if argv[0] == "-m":
                sys.argv, sys.path[0] = [argv[1], *argv[2:]], root
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:
                script = os.path.join(root, argv[0])
                sys.argv, sys.path[0] = [script, *argv[1:]], os.path.dirname(script)
                runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    children.append((key, pid, out))
for key, pid, out in children:  # all children run at once: --help does no work, so this is cheap
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    out.seek(0)
    results[key] = [status, out.read().decode("utf-8", "replace")]
print(json.dumps(results))
"""


def run_helps(targets: dict) -> dict:
    """{key: argv} -> {key: (exit status, --help output)}, one process for all of them."""
    if not targets:
        return {}
    proc = subprocess.run([sys.executable, "-c", HELP_RUNNER, str(ROOT), json.dumps(list(targets.items()))],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {key: tuple(value) for key, value in json.loads(proc.stdout.splitlines()[-1]).items()}


def listed_flags(help_text: str) -> set:
    """The flags argparse's option lines list ('  --a A, --no-a   help'); not flags its prose mentions."""
    flags = set()
    for line in help_text.splitlines():
        option = re.match(r"^  (-\S.*?)(?:\s{2,}|$)", line)
        if option:
            flags.update(FLAG.findall(option.group(1)))
    return flags


def subcommands(help_text: str) -> set:
    """{a, b} from an argparse positional '{a,b}' of subcommands."""
    return {name for group in re.findall(r"\{([\w,-]+)\}", help_text) for name in group.split(",")}


def script_argv(script: str) -> list:
    return script.split() if script.startswith("-m ") else [script]


def script_exists(script: str) -> bool:
    if script.startswith("-m "):
        path = ROOT / script[3:].replace(".", "/")
        return path.with_suffix(".py").is_file() or (path / "__main__.py").is_file()
    return (ROOT / script).is_file()


@pytest.fixture(scope="module")
def helps():
    """{(script, subcommand or None): (status, help text)} for every script the docs run, each asked once."""
    existing = [s for s in COMMANDS if script_exists(s)]
    top = run_helps({s: script_argv(s) + ["--help"] for s in existing})
    result = {(s, None): top[s] for s in existing}
    subs = {}
    for s in existing:
        names = subcommands(top[s][1])
        for _, _, positional in COMMANDS[s]:
            if positional in names:
                subs[f"{s} {positional}"] = script_argv(s) + [positional, "--help"]
    for key, value in run_helps(subs).items():
        script, sub = key.rsplit(" ", 1)
        result[(script, sub)] = value
    return result


# ----------------------------------------------------------------------------- the checks

def flag_problems(script: str, uses, helps: dict) -> list:
    """One line per shown command that uses a flag its --help does not list."""
    problems = []
    for where, flags, positional in uses:
        key = (script, positional) if (script, positional) in helps else (script, None)
        status, text = helps[key]
        if status != 0:
            problems.append(f"{where}: `{' '.join(filter(None, key))} --help` exited {status}:\n{text[-2000:]}")
            continue
        unknown = sorted(set(flags) - listed_flags(text) - {"--help"})
        if unknown:
            problems.append(f"{where}: python {script}: {', '.join(unknown)} not in its --help")
    return problems


def test_the_docs_show_commands_for_every_part():
    scripts = set(COMMANDS)
    for expected in ["train_ast.py", "train_pat.py", "sparsity.py", "eval.py", "-m kernels24.pack",
                     "bench/ast_study.py", "bench/compare_lm_eval.py", "bench/quant_quality.py"]:
        assert expected in scripts, f"no `python {expected}` command found in README.md or docs/ (parser broken?)"
    readme = [where for uses in COMMANDS.values() for where, _, _ in uses if where.startswith("README.md:")]
    assert len(readme) >= 8, readme


@pytest.mark.parametrize("script", sorted(COMMANDS))
def test_shown_commands_use_existing_scripts_and_flags(script, helps):
    uses = COMMANDS[script]
    assert script_exists(script), f"python {script}: no such script, shown at {', '.join(w for w, _, _ in uses)}"
    problems = flag_problems(script, uses, helps)
    assert not problems, "\n".join(problems)


def test_a_misspelt_flag_is_caught():
    """The parser and the flag check on a made-up page: a flag --help lacks is reported with its line."""
    page = ("# t\n\n```bash\nOMP_NUM_THREADS=1 python x.py --ckpt a \\\n    --ppl-windwos 8   # typo\n"
            "#   --bos yes|no\n```\n\nInline: `python x.py --no-eval --limt 3`; `python -m pytest -m slow`.\n")
    commands = commands_in(page, "t.md")
    assert [(w, s, f) for w, s, f, _ in commands] == [
        ("t.md:4", "x.py", ["--ckpt", "--ppl-windwos", "--bos"]), ("t.md:9", "x.py", ["--no-eval", "--limt"])]
    fake_help = {("x.py", None): (0, "usage: x.py [-h]\n\noptions:\n  -h, --help  show\n  --ckpt CKPT  model\n"
                                     "  --ppl-windows PPL_WINDOWS\n                        0: all\n  --bos {yes,no}\n"
                                     "  --eval, --no-eval  evaluate (--limt is prose, not an option)\n")}
    problems = flag_problems("x.py", [(w, f, p) for w, _, f, p in commands], fake_help)
    assert problems == ["t.md:4: python x.py: --ppl-windwos not in its --help",
                        "t.md:9: python x.py: --limt not in its --help"]


# ----------------------------------------------------------------------------- links

def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set:
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    seen, result = defaultdict(int), set()
    for line in prose:
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            base = slug(heading.group(1).replace("`", "").replace("*", ""))
            result.add(base if not seen[base] else f"{base}-{seen[base]}")
            seen[base] += 1
    return result


def test_slug_follows_github():
    assert slug("The ablation study (bench/ast_study.py)") == "the-ablation-study-benchast_studypy"
    assert slug("LLaMA2-7B on 8 GPUs") == "llama2-7b-on-8-gpus"
    assert slug("PAT: prune the hidden dimension") == "pat-prune-the-hidden-dimension"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(doc):
    prose, _ = split_fences(doc.read_text(encoding="utf-8"))
    problems = []
    for number, line in enumerate(prose, 1):
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            if re.match(r"^[a-z]+:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            if not path.exists():
                problems.append(f"{doc.name}:{number}: {target}: no file {path.relative_to(ROOT)}")
            elif anchor and anchor not in anchors(path):
                problems.append(f"{doc.name}:{number}: {target}: no heading with anchor #{anchor} in {path.name}")
    assert not problems, "\n".join(problems)
