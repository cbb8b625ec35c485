"""The house style of every PNG the project draws (the stability sweep's plots, the run report):
panels sized for reading, one legend per figure, titles and labels laid out inside the canvas
(constrained layout), and a moving average for noisy curves. Kept free of the rest of the
package, so that any layer's plots share it; matplotlib is imported on first use only (a run
never pays for it)."""
from __future__ import annotations

import textwrap
from typing import Dict

import numpy as np

PANEL_W, PANEL_H = 4.4, 3.3   # inches per panel; at DPI a panel is ~530 x 400 px
DPI = 120
CHARS_PER_INCH = 9            # of the 13 pt figure title: it is wrapped to stay on the canvas
MAX_COLS = 4                  # panels per row where the panels are not a table


def pyplot():
    """matplotlib.pyplot on the file-only backend, with the house font sizes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 10, "axes.titlesize": 10, "legend.fontsize": 9,
                         "figure.titlesize": 13})
    return plt


def figure(plt, rows: int, cols: int, title: str, sharey: bool = False,
           panel=(PANEL_W, PANEL_H)):
    """A figure of rows x cols panels (`panel`: inches each) under a wrapped title."""
    width, height = panel
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows + 0.9),
                             squeeze=False, layout="constrained", sharey=sharey)
    fig.suptitle(textwrap.fill(title, int(width * cols * CHARS_PER_INCH)))
    return fig, axes


def wrap(n: int):
    """(rows, cols) for n panels, at most MAX_COLS a row."""
    cols = min(MAX_COLS, n)
    return -(-n // cols), cols


def finish(fig, axes, handles: Dict[str, object], path: str) -> None:
    """Hide the spare panels, put one legend under the panels, save at DPI."""
    for ax in axes.flat:  # the spare panels of the last row
        if not ax.has_data() and not ax.get_title():
            ax.set_visible(False)
    if handles:
        fig.legend(list(handles.values()), list(handles.keys()), loc="outside lower center",
                   ncol=min(len(handles), 6), frameon=False)
    fig.savefig(path, dpi=DPI)


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over finite values (batch noise is ~0.2 nats a step)."""
    out = np.full(len(values), np.nan)
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1):i + 1]
        chunk = chunk[np.isfinite(chunk)]
        out[i] = chunk.mean() if len(chunk) else np.nan
    return out
