"""The notebooks under notebooks/ run top to bottom, in small mode, in a fresh kernel.

Each notebook is executed with nbclient in a Jupyter kernel started from this interpreter
(``sys.executable -m ipykernel_launcher``) through a kernel spec written into a temporary folder,
so no user-level or system-wide kernel spec is needed (or used). The kernel's environment selects
small mode (``FISHER_JAX_NOTEBOOK_SMALL=1``, read by each notebook's ``parameters`` cell), the
local GLUE copy (``GLUE_DIR``) and a temporary cache (``FISHER_JAX_CACHE``); its working directory
is a temporary folder. A cell that raises fails the test, and the executed notebook is written
next to the temporary folder for inspection.

The two notebooks share one cache, so ``reproduce_paper`` reuses the MiniLM checkpoints that
``quickstart`` fine-tuned (with ``--dist loadfile`` both run on the same worker, in file order);
either notebook alone fine-tunes what it needs.

The committed notebooks carry no outputs: :func:`test_committed_notebooks_have_no_outputs`.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
NAMES = ("quickstart.ipynb", "reproduce_paper.ipynb")
KERNEL = "fisher-jax-notebook-test"
CELL_TIMEOUT_S = 900

# What the notebooks may import from the package: the public API (SPEC §7) and documented modules.
PUBLIC_MODULES = {
    "fisher_jax", "fisher_jax.data", "fisher_jax.tree", "fisher_jax.stats", "fisher_jax.stats.plots",
    "fisher_jax.train.finetune", "fisher_jax.train.evaluate", "fisher_jax.train.zoo",
    "fisher_jax.experiment.config", "fisher_jax.experiment.runner", "fisher_jax.experiment.report",
}


def _read(name: str):
    import nbformat

    return nbformat.read(NOTEBOOKS / name, as_version=4)


def _code(nb) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code"]


# --------------------------------------------------------------------------- static checks (fast)
@pytest.mark.parametrize("name", NAMES)
def test_committed_notebooks_have_no_outputs(name):
    """Outputs are stripped before committing: no outputs, no execution counts, valid nbformat 4."""
    import nbformat

    nb = _read(name)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{name}: cells {dirty} carry outputs; strip them (e.g. jupyter nbconvert --clear-output)"
    assert "widgets" not in nb.metadata, f"{name}: widget state in the metadata"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_structure(name):
    """One `parameters` cell that reads FISHER_JAX_NOTEBOOK_SMALL; the install cell runs only on Colab."""
    nb = _read(name)
    code = [c for c in nb.cells if c.cell_type == "code"]
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, f"{name}: expected exactly one cell tagged 'parameters', found {len(params)}"
    assert "FISHER_JAX_NOTEBOOK_SMALL" in params[0].source and re.search(r"^SMALL\s*=", params[0].source, re.M)
    installs = [c.source for c in code if re.search(r"^\s*[%!]pip\s+install", c.source, re.M)]
    assert installs, f"{name}: no install cell for Colab"
    for src in installs:
        assert "google.colab" in src, f"{name}: the pip install cell must be guarded to run only on Colab"
        for line in src.splitlines():
            if re.match(r"^\s*[%!]pip\s+install", line):
                assert line.startswith((" ", "\t")), f"{name}: unguarded install line {line!r}"


@pytest.mark.parametrize("name", NAMES)
def test_notebooks_use_public_api(name):
    """Only `import fisher_jax as fj` and documented modules; no private names."""
    from IPython.core.inputtransformer2 import TransformerManager

    transform = TransformerManager().transform_cell
    for src in _code(_read(name)):
        tree = ast.parse(transform(src))  # IPython magics (%pip) become plain calls
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fisher_jax"):
                assert node.module in PUBLIC_MODULES, f"{name}: imports from {node.module}"
                bad = [a.name for a in node.names if a.name.startswith("_")]
                assert not bad, f"{name}: imports private {bad} from {node.module}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("fisher_jax"):
                        assert a.name in PUBLIC_MODULES, f"{name}: imports {a.name}"
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "fj":
                assert not node.attr.startswith("_") or node.attr == "__version__", f"{name}: uses fj.{node.attr}"


# --------------------------------------------------------------------------- execution (slow)
@pytest.fixture(scope="module")
def notebook_env(tmp_path_factory, glue_dir, minilm_path):
    """A kernel spec for this interpreter plus the environment both notebooks run under."""
    root = tmp_path_factory.mktemp("notebooks")
    cache = root / "cache"
    cache.mkdir()
    kernels = root / "kernels"
    spec_dir = kernels / KERNEL
    spec_dir.mkdir(parents=True)
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "fisher_jax tests",
        "language": "python",
        "env": {
            "FISHER_JAX_NOTEBOOK_SMALL": "1",
            "GLUE_DIR": str(glue_dir),
            "FISHER_JAX_CACHE": str(cache),
            "PYTHONPATH": pythonpath,
            "TQDM_DISABLE": "1",
        },
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
    return {"root": root, "kernels": kernels}


def _execute(name: str, env: dict, cwd: Path):
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    nb = _read(name)
    ksm = KernelSpecManager(kernel_dirs=[str(env["kernels"])], ensure_native_kernel=False)
    km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=ksm)
    client = NotebookClient(nb, km=km, kernel_name=KERNEL, timeout=CELL_TIMEOUT_S, allow_errors=False,
                            resources={"metadata": {"path": str(cwd)}})
    t0, c0 = time.perf_counter(), _children_cpu_s()
    try:
        client.execute()
    finally:
        if km.has_kernel:  # nbclient leaves a kernel it did not create running
            km.shutdown_kernel(now=False)
        nbformat.write(nb, str(cwd / f"executed_{name}"))  # what ran, with outputs, for debugging
    return nb, time.perf_counter() - t0, _children_cpu_s() - c0


def _children_cpu_s() -> float:
    """CPU seconds of finished child processes (the kernel, once shut down)."""
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(name, notebook_env, tmp_path):
    nb, seconds, cpu_s = _execute(name, notebook_env, tmp_path)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    # Every code cell ran (nbclient stops at the first error; this guards against silent skips).
    assert all(c.execution_count is not None for c in nb.cells if c.cell_type == "code" and c.source.strip())
    # FISHER_JAX_CACHE was honoured: the fine-tuned models went to the temporary cache.
    assert (notebook_env["root"] / "cache" / "notebooks").is_dir()
    print(f"{name}: executed in {seconds:.0f} s wall, {cpu_s:.0f} s CPU (kernel)")
