"""Execute one notebook with papermill, sampling the GPU meanwhile.

Kept apart from `repro.report.pipeline` and free of torch at import: each notebook of a concurrent group
(`params.notebook_jobs`) runs in a freshly spawned process, which imports only this module.
"""

from __future__ import annotations

import time
from pathlib import Path


class RunError(RuntimeError):
    """A run failed; the message names the notebook and cell, or the input at fault."""


def notebook_json(py_path: Path, out_path: Path) -> None:
    """Convert a py:percent notebook to .ipynb (jupytext) for papermill."""
    import jupytext

    nb = jupytext.read(py_path)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    jupytext.write(nb, out_path, fmt="ipynb")


def execute_notebook(name: str, src: Path, out: Path, parameters: dict, cwd: Path) -> dict:
    """Run one notebook; returns its wall seconds and, on a GPU node, how busy the GPU was meanwhile."""
    import papermill as pm

    from repro.profiling.gpu_monitor import GpuMonitor

    tmp_in = out.with_name(f".{name}.input.ipynb")
    notebook_json(src, tmp_in)
    t0 = time.perf_counter()
    monitor = GpuMonitor()
    try:
        with monitor:
            pm.execute_notebook(
                str(tmp_in),
                str(out),
                parameters=parameters,
                kernel_name="python3",
                language="python",
                cwd=str(cwd),
                progress_bar=False,
                log_output=False,
            )
    except pm.PapermillExecutionError as exc:
        raise RunError(
            f"notebook {name} failed in cell {exc.exec_count} ({exc.ename}: {exc.evalue}); "
            f"the partial executed copy is {out}"
        ) from None
    finally:
        tmp_in.unlink(missing_ok=True)
        monitor.write_trace(out.parent.parent / "results" / f"gpu-trace-{name}.csv")
    return {"seconds": round(time.perf_counter() - t0, 1), **(monitor.summary() or {})}
