"""Key figures of a run: a runbook records them with :func:`record_figures`; the runner finds them in the executed
notebook and copies them into the ledger entry. Stores (a local directory or an S3 bucket/prefix)
live in :mod:`opsbook.engines.records.store`; records are written once and never edited.

This module is imported inside runbook kernels, so it stays light: no boto3, no nbconvert here.
"""

from __future__ import annotations

import json
from typing import Any

FIGURES_MIMETYPE = "application/vnd.opsbook.figures+json"
MAX_FIGURES_BYTES = 16_000  # key figures are a small summary; tables and plots belong in the notebook


def record_figures(**figures: Any) -> None:
    """Record key figures of this run (``record_figures(rows=1000, duration_s=12.5)``).

    They show in the notebook and the runner copies them into the run's ledger entry. Call it
    as often as you like; later values for the same name win. Values must be JSON values
    (numbers, strings, booleans, None, lists and dicts of those).
    """
    for name, value in figures.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"record_figures({name}=...): {value!r} is not a JSON value ({e}); report numbers, strings, "
                "booleans, None, or lists/dicts of those (e.g. float(x), str(ts))"
            ) from None
    blob = json.dumps(figures)
    if len(blob) > MAX_FIGURES_BYTES:
        raise ValueError(
            f"record_figures(): {len(blob)} bytes of figures; key figures are a small summary "
            f"(at most {MAX_FIGURES_BYTES} bytes). Show tables and plots in the notebook instead."
        )
    from IPython.display import display

    # A display with our own mimetype: the runner picks it out of the executed notebook (it is
    # how a kernel hands structured data back through papermill without a side channel);
    # text/plain is what a person sees in the notebook and its HTML rendering.
    lines = "\n".join(f"  {k} = {v!r}" for k, v in figures.items())
    display({FIGURES_MIMETYPE: figures, "text/plain": f"key figures:\n{lines}"}, raw=True)


def figures_in(nb) -> dict[str, Any]:
    """Every figure reported in an executed notebook (nbformat node), later values winning."""
    out: dict[str, Any] = {}
    for cell in nb.get("cells", []):
        for output in cell.get("outputs", []) or []:
            data = output.get("data") or {}
            if FIGURES_MIMETYPE in data and isinstance(data[FIGURES_MIMETYPE], dict):
                out.update(data[FIGURES_MIMETYPE])
    return out
