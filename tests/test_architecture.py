"""The library's architecture, checked: layers, torch-free parse-time modules, imports at the top.

See the layer list in ``dinopipe/__init__.py``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dinopipe"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")

TRAINING = {"train", "train_params", "objective", "loader", "losses", "augment", "curves"}
INFERENCE = {"predict", "segment", "linkage", "evaluate", "baseline", "tune", "checkpoint", "report", "distributed"}
#: Imported when Snakemake parses the workflow (workflow/rules/common.smk): no torch.
PARSE_TIME = ["config", "checks", "sheet", "tune", "io", "sources", "geometry", "runtime", "backbone_spec",
              "distributed"]
#: Third-party packages heavy enough to import only where needed.
HEAVY = {"torch", "transformers", "huggingface_hub", "matplotlib", "skimage", "scipy", "waterz", "mwatershed",
         "h5py", "snakemake"}
#: Modules that import other dinopipe modules lazily on purpose: the workflow glue (each job
#: loads only its own stage's dependencies) and the parse-time key classification (segment
#: loads mwatershed).
LAZY_GLUE = {"stages", "cli", "config"}


def _tree(module: str) -> ast.Module:
    return ast.parse((PACKAGE / f"{module}.py").read_text())


def _dinopipe_imports(node: ast.AST) -> set[str]:
    found = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.ImportFrom) and sub.module:
            if sub.module.startswith("dinopipe."):
                found.add(sub.module.split(".")[1])
            elif sub.module == "dinopipe":
                found |= {a.name for a in sub.names if a.name in MODULES}
        elif isinstance(sub, ast.Import):
            found |= {a.name.split(".")[1] for a in sub.names if a.name.startswith("dinopipe.")}
    return found


GRAPH = {m: _dinopipe_imports(_tree(m)) for m in MODULES}


def _reachable(module: str) -> set[str]:
    seen: set[str] = set()
    stack = [module]
    while stack:
        for dep in GRAPH[stack.pop()]:
            if dep not in seen:
                seen.add(dep)
                stack.append(dep)
    return seen


@pytest.mark.parametrize("module", MODULES)
def test_every_module_states_its_job_in_its_first_line(module):
    doc = ast.get_docstring(_tree(module))
    assert doc, f"dinopipe/{module}.py has no module docstring"
    assert len(doc.splitlines()[0]) > 20, f"dinopipe/{module}.py: first docstring line says too little"


@pytest.mark.parametrize("module", sorted(INFERENCE))
def test_inference_and_reporting_never_import_training(module):
    assert not _reachable(module) & TRAINING, (module, sorted(_reachable(module) & TRAINING))


def test_the_graph_has_no_cycles():
    for module in MODULES:
        assert module not in _reachable(module), module


@pytest.mark.parametrize("module", MODULES)
def test_imports_inside_functions_only_for_heavy_dependencies(module):
    """An import inside a function hides an edge of the module graph: allowed only for heavy
    third-party packages and in the workflow glue."""
    bad = []
    for node in ast.walk(_tree(module)):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for sub in ast.walk(node):
            if isinstance(sub, ast.Import):
                names = [a.name for a in sub.names]
            elif isinstance(sub, ast.ImportFrom):
                names = [sub.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in HEAVY or (top == "dinopipe" and module in LAZY_GLUE):
                    continue
                bad.append(f"line {sub.lineno}: {name}")
    assert not bad, f"dinopipe/{module}.py imports inside functions: {bad}"


def test_parse_time_modules_load_no_torch():
    code = f"import sys\nfor m in {PARSE_TIME!r}: __import__('dinopipe.' + m)\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_report_loads_no_torch():
    code = "import sys, dinopipe.report, dinopipe.curves; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
