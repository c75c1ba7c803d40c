"""The layout, read with the `ast` module: which module may import which, nothing imports bench/ or tests/,
no project module is imported inside a function, no import cycle, no file over 500 lines.

ALLOWED is the whole layering in one table: a module may import only the project modules listed for it
(third-party and standard-library imports are free). A new module must be added to it. bench/ and tests/
may import any project module, but no module (theirs included) imports bench/ or tests/.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 500

TRAINER_MAY_IMPORT = {"cli", "model", "tokenizer", "checkpoint", "data", "training", "rundir", "eval", "sparsity",
                      "chunked_loss"}
ALLOWED = {  # module -> the project modules it may import
    # the bottom: import nothing of ours
    "cli": set(),
    "model": set(),
    "tokenizer": set(),
    "chunked_loss": set(),  # the LM-head loss in token chunks (both trainers)
    # formats and data
    "packed": {"cli"},
    "gguf_file": {"cli", "model", "tokenizer"},  # llama.cpp's format, read and written
    "hf": {"cli", "model", "tokenizer", "packed"},  # Hugging Face's names, config.json, Hub names, export
    "checkpoint": {"cli", "model", "tokenizer", "packed", "hf", "gguf_file"},
    "data": {"cli"},
    # shared machinery, evaluation, pruning
    "training": {"cli", "data", "checkpoint", "model"},
    "rundir": {"cli", "training"},  # a trainer's --out: checks, lock, resume against state.pt
    "eval": {"cli", "data", "model", "checkpoint"},
    "obs": {"cli", "packed"},  # the OBS column walk of SparseGPT and GPTQ
    "sparsity": {"cli", "data", "model", "eval", "checkpoint", "obs"},
    "pat": {"cli", "model"},  # PAT's modules, mask and merge (train_pat trains them)
    # 2:4 sparsity beyond masks
    "kernels24": set(),  # not "kernels": a PyPI package of that name comes with transformers
    "kernels24.pack": {"cli", "model", "packed", "checkpoint", "sparsity", "obs", "data"},
    "kernels24.sparse": {"cli", "sparsity"},
    "kernels24.bench": {"cli", "model", "checkpoint", "sparsity", "kernels24.sparse"},
    # the two trainers at the top: never each other, never kernels24
    "train_ast": TRAINER_MAY_IMPORT,
    "train_pat": TRAINER_MAY_IMPORT | {"pat"},
    "export": {"cli", "checkpoint", "gguf_file", "tokenizer"},  # to the engines: Hugging Face directory or GGUF
}
FORBIDDEN = {"bench", "tests"}  # folders nothing may import from
DYNAMIC_IMPORTS = {"__import__", "import_module", "importorskip"}  # f("name") calls that import a module


# ----------------------------------------------------------------------------- reading the imports

def module_name(rel: str) -> str:
    """'kernels24/pack.py' -> 'kernels24.pack', 'kernels24/__init__.py' -> 'kernels24', 'bench/x.py' -> 'bench.x'."""
    parts = list(Path(rel).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def read_sources() -> dict:
    """{relative path: source} of every .py file we check: top level, kernels24/, bench/, tests/."""
    files = [*ROOT.glob("*.py"), *ROOT.glob("kernels24/*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("tests/*.py")]
    return {f.relative_to(ROOT).as_posix(): f.read_text(encoding="utf-8") for f in sorted(files)}


def is_project(rel: str) -> bool:
    """A file of the project itself, not of bench/ or tests/."""
    return Path(rel).parts[0] not in FORBIDDEN


def is_project_module(name: str) -> bool:
    return name.split(".")[0] not in FORBIDDEN


class Imports(ast.NodeVisitor):
    """Every import of one file as (line, dotted name, inside a function or class body?)."""

    def __init__(self, package: str):
        self.package, self.found, self.depth = package, [], 0

    def nested(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = visit_ClassDef = nested

    def visit_Import(self, node):
        for alias in node.names:
            self.found.append((node.lineno, alias.name, self.depth > 0))

    def visit_ImportFrom(self, node):
        base = node.module or ""
        if node.level:  # relative: from . import x / from .x import y, inside a package
            up = self.package.split(".")[: len(self.package.split(".")) - node.level + 1]
            base = ".".join(p for p in [*up, base] if p)
        # `from kernels24 import pack` reads kernels24.pack (a module), `from cli import UserError` reads cli
        self.found.extend((node.lineno, ".".join(p for p in (base, a.name) if p), self.depth > 0) for a in node.names)

    def visit_Call(self, node):
        name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
        if name in DYNAMIC_IMPORTS and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            self.found.append((node.lineno, node.args[0].value, self.depth > 0))
        self.generic_visit(node)


def known_modules(sources: dict) -> dict:
    """Every name an import can reach in this tree -> the module it means: project modules by their dotted
    name; bench and tests files both as 'bench.x' and as 'x' (each folder is on sys.path when its scripts run)."""
    names = {}
    for rel in sources:
        name = module_name(rel)
        names[name] = name
        if not is_project(rel):
            names[name.split(".", 1)[-1]] = name
            names[name.split(".")[0]] = name.split(".")[0]
    return names


def arrows(sources: dict) -> list:
    """(file, line, importer, imported, nested) for every import of one of our modules, bench and tests included."""
    known = known_modules(sources)
    found = []
    for rel, source in sources.items():
        name = module_name(rel)
        package = name if rel.endswith("__init__.py") else name.rpartition(".")[0]
        visitor = Imports(package)
        visitor.visit(ast.parse(source, filename=rel))
        for line, dotted, nested in visitor.found:
            parts = dotted.split(".")  # the longest prefix naming one of ours: kernels24.sparse.f -> kernels24.sparse
            prefixes = (".".join(parts[:n]) for n in range(len(parts), 0, -1))
            hit = next((known[p] for p in prefixes if p in known), None)
            arrow = (rel, line, name, hit, nested)
            if hit and hit != name and arrow not in found:  # `from cli import A, B` is one arrow
                found.append(arrow)
    return found


# ----------------------------------------------------------------------------- the rules

def unlisted_modules(sources: dict) -> list:
    return [f"{rel}: module '{module_name(rel)}' is not in ALLOWED: add it with the modules it may import"
            for rel in sources if is_project(rel) and module_name(rel) not in ALLOWED]


def layering_violations(sources: dict) -> list:
    """(a) a project module imports one of ours that ALLOWED does not list for it."""
    problems = []
    for rel, line, src, dst, _ in arrows(sources):
        if is_project(rel) and is_project_module(dst) and dst not in ALLOWED.get(src, set()):
            may = ", ".join(sorted(ALLOWED.get(src, ()))) or "nothing of ours"
            problems.append(f"{rel}:{line}: {src} -> {dst} (not allowed; {src} may import: {may})")
    return problems


def bench_or_tests_imports(sources: dict) -> list:
    """(b) anything imports a module of bench/ or tests/."""
    return [f"{rel}:{line}: {src} -> {dst} (nothing imports bench/ or tests/)"
            for rel, line, src, dst, _ in arrows(sources) if not is_project_module(dst)]


def nested_imports(sources: dict) -> list:
    """(c) a project module imported inside a function or class body (tests/ exempt)."""
    return [f"{rel}:{line}: {src} -> {dst} inside a function (import it at the top of the file)"
            for rel, line, src, dst, nested in arrows(sources)
            if nested and is_project_module(dst) and not rel.startswith("tests/")]


def find_cycle(graph: dict) -> list | None:
    """A list [a, b, ..., a] of modules that import each other in a circle, or None."""
    state = {}  # module -> "open" while on the DFS path, "done" after

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":  # back on the current path: a circle
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, path + [nxt])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def import_cycle(sources: dict) -> list:
    """(d) a cycle among the imports that are there (at any depth, in any file)."""
    graph = {}
    for _, _, src, dst, _ in arrows(sources):
        graph.setdefault(src, set()).add(dst)
    cycle = find_cycle(graph)
    return [f"import cycle: {' -> '.join(cycle)}"] if cycle else []


def long_files(sources: dict) -> list:
    """(e) a project or bench file over MAX_LINES lines."""
    return [f"{rel}: {n} lines (at most {MAX_LINES})" for rel, source in sources.items()
            if not rel.startswith("tests/") and (n := len(source.splitlines())) > MAX_LINES]


def report(problems: list) -> str:
    return f"{len(problems)} layout problem(s):\n" + "\n".join(problems)


# ----------------------------------------------------------------------------- the tests

def test_allowed_is_closed_and_acyclic():
    unknown = [f"{m} -> {d}" for m, deps in ALLOWED.items() for d in deps if d not in ALLOWED]
    assert not unknown, f"ALLOWED names modules it does not list: {unknown}"
    cycle = find_cycle(ALLOWED)
    assert cycle is None, f"ALLOWED itself has a cycle: {' -> '.join(cycle)}"
    assert "train_pat" not in ALLOWED["train_ast"] and "train_ast" not in ALLOWED["train_pat"]
    for low in ("eval", "sparsity"):
        assert not {d for d in ALLOWED[low] if d.startswith(("train_", "kernels24"))}, f"{low} may import a trainer"


def test_every_project_module_is_listed():
    sources = read_sources()
    problems = unlisted_modules(sources)
    assert not problems, report(problems)
    missing = sorted(set(ALLOWED) - {module_name(rel) for rel in sources})
    assert not missing, f"ALLOWED lists modules that do not exist: {missing}"


def test_imports_follow_the_layering():
    problems = layering_violations(read_sources())
    assert not problems, report(problems)


def test_nothing_imports_bench_or_tests():
    problems = bench_or_tests_imports(read_sources())
    assert not problems, report(problems)


def test_project_modules_are_imported_at_the_top():
    problems = nested_imports(read_sources())
    assert not problems, report(problems)


def test_no_import_cycle():
    problems = import_cycle(read_sources())
    assert not problems, report(problems)


def test_no_file_over_500_lines():
    problems = long_files(read_sources())
    assert not problems, report(problems)


def test_the_rules_catch_what_they_claim():
    """Each rule on a small made-up tree: a check that can't fail proves nothing."""
    clean = {"cli.py": "import os\n", "model.py": "import torch\n", "data.py": "from cli import UserError\n",
             "kernels24/__init__.py": "", "kernels24/pack.py": "", "kernels24/sparse.py": "from cli import UserError\n",
             "kernels24/bench.py": "from kernels24 import sparse\n", "train_ast.py": "import data\n",
             "train_pat.py": "import data\n", "bench/helper.py": "", "tests/test_x.py": "import train_ast\n"}
    rules = (unlisted_modules, layering_violations, bench_or_tests_imports, nested_imports, import_cycle, long_files)

    def problems(**changes):
        tree = clean | {k.replace("__", "/") + ".py": v for k, v in changes.items()}
        return [p for rule in rules for p in rule(tree)]

    assert problems() == []
    assert problems(kernels24__bench="from kernels24 import sparse\nimport sparsity\n") == []  # allowed arrows
    assert problems(train_ast="import data\nimport train_pat\n") == [
        "train_ast.py:2: train_ast -> train_pat (not allowed; train_ast may import: "
        + ", ".join(sorted(TRAINER_MAY_IMPORT)) + ")"]
    assert problems(kernels24__bench="from . import sparse\nfrom .sparse import to_sparse\n") == []  # relative
    assert problems(kernels24__bench="from ..train_pat import x\n")[0].startswith(
        "kernels24/bench.py:1: kernels24.bench -> train_pat (not allowed")
    assert problems(kernels24__bench="from kernels24 import pack\n")[0].startswith(
        "kernels24/bench.py:1: kernels24.bench -> kernels24.pack (not allowed")
    assert problems(data="from cli import UserError\nfrom kernels24.sparse import to_sparse\n")[0].startswith(
        "data.py:2: data -> kernels24.sparse (not allowed")
    nested = problems(data="from cli import UserError\n\ndef f():\n    import cli\n")
    assert nested == ["data.py:4: data -> cli inside a function (import it at the top of the file)"]
    assert problems(data="def f():\n    from cli import UserError, cli_main\n") == [  # one arrow per line
        "data.py:2: data -> cli inside a function (import it at the top of the file)"]
    assert problems(data="class A:\n    def f(self):\n        from cli import UserError\n")[0].startswith("data.py:3:")
    assert problems(data="import kernels24.sparse as ks\n")[0].startswith("data.py:1: data -> kernels24.sparse (not")
    assert problems(bench__helper="def main():\n    import data\n") == [
        "bench/helper.py:2: bench.helper -> data inside a function (import it at the top of the file)"]
    assert problems(tests__test_x="def test():\n    import train_ast\n") == []  # tests may import late
    assert problems(tests__test_x="import helper\n") == [
        "tests/test_x.py:1: tests.test_x -> bench.helper (nothing imports bench/ or tests/)"]
    assert "-> tests.test_x" in problems(bench__helper="from tests import test_x\n")[0]
    assert "-> cli" in problems(model="import importlib\nimportlib.import_module('cli')\n")[0]
    cyc = problems(cli="import model\n", model="import cli\n")
    assert "import cycle: cli -> model -> cli" in cyc and len(cyc) == 3  # two arrows not allowed, one cycle
    assert problems(newmod="") == [
        "newmod.py: module 'newmod' is not in ALLOWED: add it with the modules it may import"]
    assert problems(bench__helper="x = 1\n" * 501) == [f"bench/helper.py: 501 lines (at most {MAX_LINES})"]
    assert problems(tests__test_x="x = 1\n" * 501) == []
    assert "os" not in known_modules(clean) and "torch" not in known_modules(clean)
