"""Execute the tutorial notebooks and stamp them with a hash of their code.

``make notebooks`` runs ``python tutorials/run_notebooks.py``: every ``tutorials/*.ipynb`` is
executed top to bottom in a fresh kernel (nbclient) and written back in place with its outputs and,
in ``metadata["captum_vlm"]["code_sha256"]``, the hash of its code cells at execution time. The
test suite recomputes that hash (:func:`code_hash`) to check that the committed outputs come from
the committed code, and executes a scratch copy of each notebook (:func:`execute`) to check that it
still runs without an error or a warning.

Usage:
    python tutorials/run_notebooks.py                   # every notebook, in place
    python tutorials/run_notebooks.py tutorials/01-quickstart.ipynb
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import nbformat
import psutil
from jupyter_client import KernelManager
from nbclient import NotebookClient

TUTORIALS = Path(__file__).resolve().parent
METADATA_KEY = "captum_vlm"
TIMEOUT_S = 300  # per cell
# the kernel runs like the test suite: offline, one thread, figures through the inline backend
KERNEL_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
              "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}


def notebooks() -> list[Path]:
    """The tutorial notebooks, in order."""
    return sorted(TUTORIALS.glob("*.ipynb"))


def code_hash(notebook: nbformat.NotebookNode) -> str:
    """SHA-256 of the notebook's code cells (their sources, in order; outputs excluded)."""
    digest = hashlib.sha256()
    for cell in notebook.cells:
        if cell.cell_type == "code":
            digest.update(cell.source.strip().encode("utf-8"))
            digest.update(b"\n\0\n")
    return digest.hexdigest()


def problems(notebook: nbformat.NotebookNode) -> list[str]:
    """Error outputs, stderr streams and warnings in an executed notebook (empty when clean)."""
    found = []
    for index, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []):
            text = output.get("text", "")
            if output.output_type == "error":
                found.append(f"cell {index}: {output.ename}: {output.evalue}")
            elif output.output_type == "stream" and output.name == "stderr":
                found.append(f"cell {index}: stderr: {text.strip()[:300]}")
            elif "Warning" in text:
                found.append(f"cell {index}: warning: {text.strip()[:300]}")
    return found


@contextmanager
def _kernel_environment():
    """Set the kernel's environment (inherited from this process) for the duration."""
    saved = dict(os.environ)
    os.environ.update(KERNEL_ENV)
    os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend shows the figures
    repo = str(TUTORIALS.parent)  # the checkout's captum_vlm, as in the tests
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (repo, saved.get("PYTHONPATH")) if p)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def execute(path: str | Path, out: str | Path | None = None, stats: dict | None = None) -> nbformat.NotebookNode:
    """Execute a notebook in a fresh kernel and write it (with its code hash) to ``out``.

    Args:
        path: the ``.ipynb`` to run; it runs with the tutorials folder as working directory.
        out: where to write the executed notebook; ``None`` writes nothing.
        stats: a dict that receives ``kernel_cpu_s``, the kernel's CPU seconds (user + system).

    Returns:
        The executed notebook.

    Raises:
        nbclient.exceptions.CellExecutionError: when a cell raises.
    """
    notebook = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as folder, _kernel_environment():
        # IPC transport: a local socket file instead of TCP ports (and no warning from the kernel)
        manager = KernelManager(kernel_name="python3", transport="ipc",
                                connection_file=str(Path(folder) / "kernel.json"))
        client = NotebookClient(notebook, km=manager, timeout=TIMEOUT_S, record_timing=False,
                                coalesce_streams=True, resources={"metadata": {"path": str(TUTORIALS)}})
        try:
            client.execute()
        finally:  # the client does not shut down a kernel it was given
            if manager.has_kernel:
                if stats is not None:
                    times = psutil.Process(manager.provisioner.pid).cpu_times()
                    stats["kernel_cpu_s"] = times.user + times.system
                manager.shutdown_kernel()
    notebook.metadata[METADATA_KEY] = {"code_sha256": code_hash(notebook)}
    if out is not None:
        nbformat.write(notebook, out)
    return notebook


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or notebooks()
    failed = 0
    for path in paths:
        start, stats = time.perf_counter(), {}
        notebook = execute(path, stats=stats)
        found = problems(notebook)
        if found:
            failed += 1
            kept = Path(tempfile.gettempdir()) / f"failed-{path.name}"
            nbformat.write(notebook, kept)
            print(f"{path}: not written ({kept} holds the run), {len(found)} problem(s):\n  "
                  + "\n  ".join(found))
            continue
        nbformat.write(notebook, path)
        size = path.stat().st_size / 1024
        print(f"{path}: executed in {time.perf_counter() - start:.0f} s (kernel CPU "
              f"{stats['kernel_cpu_s']:.0f} s), {size:.0f} KB")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
