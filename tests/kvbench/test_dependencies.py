"""Every third-party package kvbench imports at run time is a declared dependency (pyproject.toml)."""
import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = ("kvbench", "methods", "kernels", "tasks")
# Imported only inside a guarded block, for an optional feature; each says why it is not required.
OPTIONAL = {
    "kvpress": "the peer that `kvbench bench` compares against when it is installed",
}


def imported_top_levels() -> dict[str, str]:
    found = {}
    for folder in PACKAGE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    found.setdefault(name.split(".")[0], f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def declared() -> set[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}


def test_every_runtime_import_is_declared():
    dists = packages_distributions()
    stdlib = set(sys.stdlib_module_names)
    missing = []
    for module, where in imported_top_levels().items():
        if module in stdlib or module in {"kvbench", "tests", "__future__"} or module in OPTIONAL:
            continue
        names = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        if not names & declared():
            missing.append(f"{module} ({where}; distribution {', '.join(sorted(names))})")
    assert not missing, "imported but not declared in pyproject.toml: " + "; ".join(missing)


def test_the_kernels_folder_never_stands_in_for_the_pypi_package_kernels():
    """From the repository root (``python -m pytest``, ``python -c``) the root is first on ``sys.path``, so
    ``import kernels`` finds this repository's folder, which is installed as ``kvbench.kernels``. transformers
    5.25 imports the PyPI package ``kernels`` on load (CI broke with it, 2026-12-03): the folder hands the import
    over to that package when it is installed, and never passes for it."""
    import subprocess
    probe = ("import importlib.metadata as m, sys\n"
             "try:\n    m.version('kernels'); installed = True\n"
             "except m.PackageNotFoundError:\n    installed = False\n"
             "import kernels\nprint(installed, kernels.__file__)\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    installed, where = done.stdout.split()
    assert (where == str(ROOT / "kernels" / "__init__.py")) == (installed == "False"), done.stdout
