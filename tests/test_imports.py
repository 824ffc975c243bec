"""The house's import rules (STYLE.md): who may import whom, checked two ways.

Loaded modules, each in a fresh interpreter: importing any ``towers`` module loads no ray;
importing the Serve side loads no ``training`` and none of the model classes (it runs the
exported program). Source imports, by parsing every module with ``ast`` (imports inside
functions included): nothing imports ``jobs``, each package imports only packages at or
below it in the dependency direction, and the ``prepare`` stage is imported by ``jobs``
alone (it may import only ``pipeline``). ``pipeline``, the contracts core, loads neither
Ray nor torch and has no import circle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("pipeline", "prepare", "towers", "indexing", "training", "serve_app", "jobs")  # lowest
STAGE = "prepare"  # a stage beside training and indexing: only jobs import it
SOURCE = LAYERS[:-1]  # the packages; jobs holds the entry points
SERVE_MODULES = ["serve_app.app", "serve_app.retriever", "serve_app.check",
                 "serve_app.deploy_config", "serve_app.api", "serve_app.contract",
                 "serve_app.filters", "serve_app.environment"]
MODEL_CLASSES = ("towers.model", "towers.bodies", "towers.features", "towers.layers",
                 "towers.sequence_encoders")

LOADED = """
import sys
names, forbidden = sys.argv[1].split(","), tuple(sys.argv[2].split(","))
for name in names:
    __import__(name)
loaded = sorted(m for m in sys.modules if m in forbidden or m.startswith(
    tuple(f + "." for f in forbidden)))
print("ok", len(names), *loaded)
"""


def loaded_after_import(modules: list[str], forbidden: tuple[str, ...]) -> list[str]:
    """Import ``modules`` in a fresh interpreter: the ``forbidden`` modules it loaded."""
    done = subprocess.run([sys.executable, "-c", LOADED, ",".join(modules), ",".join(forbidden)],
                          cwd=ROOT, text=True, capture_output=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    status, count, *loaded = done.stdout.split()
    assert (status, int(count)) == ("ok", len(modules)), done.stdout
    return loaded


def module_name(path: Path) -> str:
    """``towers/export.py`` -> ``towers.export`` (a package's ``__init__`` is the package)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(package: str) -> list[Path]:
    """Every ``.py`` file of a package, subpackages included."""
    return sorted((ROOT / package).rglob("*.py"))


def imported_names(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source``, at any depth.

    Relative imports are resolved against ``module``; ``importlib.import_module("x")`` and
    ``__import__("x")`` with a literal name count too.
    """
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] \
                if node.level else []
            found.append((node.lineno, ".".join([*base, *([node.module] if node.module
                                                            else [])])))
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("import_module", "__import__")):
            found.append((node.lineno, node.args[0].value))
    return found


def project_imports(package: str) -> list[tuple[str, int, str]]:
    """(file, line, top-level project package) of every project import in ``package``."""
    out = []
    for path in package_modules(package):
        names = imported_names(path.read_text(encoding="utf-8"), module_name(path),
                               path.name == "__init__.py")
        out += [(str(path.relative_to(ROOT)), line, name.split(".")[0])
                for line, name in names if name.split(".")[0] in LAYERS]
    return out


# -- loaded modules -----------------------------------------------------------------------

def test_importing_towers_leaves_ray_out():
    modules = ["towers", *(module_name(p) for p in package_modules("towers")
                           if p.name != "__init__.py")]
    assert {"towers.model", "towers.features", "towers.bodies", "towers.export",
            "towers.exported"} <= set(modules)
    assert loaded_after_import(modules, ("ray",)) == [], "importing towers loaded ray"


def test_the_contracts_core_loads_neither_ray_nor_torch():
    modules = [module_name(p) for p in package_modules("pipeline")]
    assert {"pipeline.rows", "pipeline.run_dir", "pipeline.arrow"} <= set(modules)
    assert loaded_after_import(modules, ("ray", "torch")) == []
    deferred = [f"{p.relative_to(ROOT)}:{line} {name}" for p in package_modules("pipeline")
                for line, name in imported_names(p.read_text(encoding="utf-8"), module_name(p))
                if name.split(".")[0] in ("ray", "torch")]
    assert deferred == [], f"pipeline imports Ray or torch inside a function: {deferred}"


def test_the_ingress_settings_load_no_ray():
    """serve_app.environment sets Serve's environment before Ray starts: it must not import it."""
    assert loaded_after_import(["serve_app.environment"], ("ray",)) == []


def test_serving_loads_no_training_and_no_model_classes():
    loaded = loaded_after_import(SERVE_MODULES, ("training", *MODEL_CLASSES))
    assert loaded == [], f"importing {SERVE_MODULES} loaded {loaded}"


# -- source imports -----------------------------------------------------------------------

def test_the_scanner_sees_function_level_relative_and_dynamic_imports():
    source = (  # one of each form, with its line number
        "import os\n"                                   # 1
        "from . import sibling\n"                       # 2
        "def f():\n"                                    # 3
        "    from jobs.cli import main\n"               # 4
        "    import importlib\n"                        # 5
        "    importlib.import_module('training.loop')\n"  # 6
        "    from ..towers import model\n")             # 7
    got = imported_names(source, "serve_app.sub.mod")
    assert sorted(got) == [(1, "os"), (2, "serve_app.sub"), (4, "jobs.cli"),
                           (5, "importlib"), (6, "training.loop"), (7, "serve_app.towers")]
    assert imported_names("from . import x\n", "towers", is_package=True) == [(1, "towers")]


def test_only_jobs_import_the_prepare_stage():
    offenders = [f"{f}:{line}" for pkg in SOURCE if pkg != STAGE
                 for f, line, top in project_imports(pkg) if top == STAGE]
    assert offenders == [], f"prepare is imported by {offenders}"
    assert {top for _, _, top in project_imports(STAGE)} == {"pipeline", STAGE}


def kind_members_named(path: Path) -> list[int]:
    """Lines of ``path`` that name a member of ``FeatureKind`` (``FeatureKind.NUMERIC``)."""
    return [node.lineno for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id == "FeatureKind" and node.attr.isupper()]


def test_a_feature_kind_is_named_only_in_its_module():
    """Code outside ``pipeline/features/`` asks a kind's registry entry, never for a member."""
    features = ROOT / "pipeline" / "features"
    offenders = [f"{p.relative_to(ROOT)}:{line}" for pkg in (*SOURCE, "jobs", "benchmarks")
                 for p in package_modules(pkg) if features not in p.parents
                 for line in kind_members_named(p)]
    assert offenders == [], f"FeatureKind members named outside pipeline/features/: {offenders}"
    planted = ROOT / "tests" / "test_feature_kinds.py"  # names members on purpose
    assert kind_members_named(planted), "the scan finds FeatureKind.X"


def test_every_command_line_entry_point_is_under_jobs():
    """A module that runs as ``python -m`` lives in jobs/ (benchmarks are their own)."""
    mains = [str(p.relative_to(ROOT)) for pkg in SOURCE for p in package_modules(pkg)
             if '__name__ == "__main__"' in p.read_text(encoding="utf-8")]
    assert mains == [], f"entry points outside jobs/: {mains}"
    assert '__name__ == "__main__"' in (ROOT / "jobs" / "environment.py").read_text()


def test_the_tests_never_import_benchmarks():
    """Benchmarks are checked by running them (``--tiny``) or by ``benchmarks/test_*.py``."""
    offenders = [f"{p.relative_to(ROOT)}:{line}" for p in sorted((ROOT / "tests").glob("*.py"))
                 for line, name in imported_names(p.read_text(encoding="utf-8"), module_name(p))
                 if name.split(".")[0] == "benchmarks"]
    assert offenders == [], f"tests import benchmarks: {offenders}"


def checks_imported(source: str) -> list[int]:
    """Lines importing ``pipeline.config.checks`` (as a module, or from it)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (
                node.module == "pipeline.config.checks" or node.module == "pipeline.config"
                and any(a.name == "checks" for a in node.names)):
            lines.append(node.lineno)
        elif isinstance(node, ast.Import) and any(a.name == "pipeline.config.checks"
                                                  for a in node.names):
            lines.append(node.lineno)
    return lines


def test_the_towers_build_from_the_plan_and_never_re_run_the_config_checks():
    """The model side reads the resolved plan; the plan resolves the checks once.

    (``pipeline`` and ``prepare`` may ask a rule, e.g. which features are id features.)
    """
    model_side = ("towers", "indexing", "training", "serve_app", "jobs", "benchmarks")
    offenders = [f"{p.relative_to(ROOT)}:{line}" for pkg in model_side
                 for p in package_modules(pkg)
                 for line in checks_imported(p.read_text(encoding="utf-8"))]
    assert offenders == [], f"the config checks are called from {offenders}"
    assert checks_imported("from pipeline.config import checks, plan\n") == [1]


def test_nothing_in_the_source_packages_imports_jobs():
    offenders = [f"{f}:{line}" for pkg in SOURCE for f, line, top in project_imports(pkg)
                 if top == "jobs"]
    assert offenders == [], f"jobs is imported by {offenders}"


@pytest.mark.parametrize("package", LAYERS)
def test_a_package_imports_only_packages_at_or_below_it(package):
    allowed = LAYERS[:LAYERS.index(package) + 1]
    offenders = [f"{f}:{line} imports {top}" for f, line, top in project_imports(package)
                 if top not in allowed]
    assert offenders == [], f"{package} may import only {allowed}; {offenders}"


# -- pipeline/ is acyclic -------------------------------------------------------------------

def module_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` that importing it runs (any depth in the file).

    Importing ``a.b.c`` runs ``a``, ``a.b`` and ``a.b.c`` (each package's ``__init__``),
    except the importer's own packages, which are already running when it is imported;
    ``from a.b import c`` also runs ``a.b.c`` when ``c`` is a module.
    """
    files = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        own = module if is_package else module.rpartition(".")[0]
        ancestors = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join([*own.split(".")[:len(own.split(".")) - node.level + 1],
                                 *([node.module] if node.module else [])]) \
                    if node.level else node.module or ""
                targets = [base, *(f"{base}.{a.name}" for a in node.names)]
            else:
                continue
            for target in targets:
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    name = ".".join(parts[:i])
                    if name in files and name != module and name not in ancestors:
                        graph[module].add(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_pipeline_has_no_import_cycle():
    graph = module_graph(ROOT, "pipeline")
    assert len(graph) > 30 and "pipeline.kinds" in graph["pipeline.state"]
    assert cycles(graph) == []


def test_the_cycle_check_catches_a_planted_cycle(tmp_path):
    """A function-level import closing a loop, and one through a package's __init__."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg import b\n    return b\n")
    (pkg / "b.py").write_text("from pkg.a import f\n")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub import leaf\n")  # fine: its own
    (pkg / "sub" / "leaf.py").write_text("X = 1\n")
    (pkg / "c.py").write_text("from pkg.sub.leaf import X\n")  # runs pkg.sub, then leaf
    assert cycles(module_graph(tmp_path, "pkg")) == [["pkg.a", "pkg.b"]]
    (pkg / "sub" / "leaf.py").write_text("from pkg.c import Y\nX = 1\n")  # c -> sub -> leaf -> c
    assert sorted(cycles(module_graph(tmp_path, "pkg"))) == [
        ["pkg.a", "pkg.b"], ["pkg.c", "pkg.sub", "pkg.sub.leaf"]]

