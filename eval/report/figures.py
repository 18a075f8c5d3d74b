"""Report figures (matplotlib, no display): accuracy heatmaps, the teacher-set comparison, DET curves per model
family, and per-group FMR/FNMR at the global threshold. Every function takes plain data and writes one PNG."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from utils.core.io import atomic_path

# Distinct colours for the four RFW groups (Okabe-Ito palette, readable for colour-blind readers).
GROUP_COLOURS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9")
SET_COLOURS = {"specialized": "#0072B2", "balanced": "#D55E00"}


def save_figure(fig: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def _annotated_heatmap(ax, values: np.ndarray, rows: Sequence[str], cols: Sequence[str], cmap: str,
                       vmin: float, vmax: float):
    image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            value = values[i, j]
            if np.isfinite(value):
                red, green, blue, _ = image.cmap(image.norm(value))
                dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5  # text colour readable on the cell
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if dark else "black")
    return image


def plot_accuracy_heatmaps(panels: Mapping[str, Mapping[str, Mapping[str, float]]], path: Path) -> None:
    """One heatmap per panel: rows are models, columns test groups, cells accuracy in %. One colour scale for
    all panels, from the lowest to the highest accuracy shown."""
    values = [v for panel in panels.values() for acc in panel.values() for v in acc.values()]
    vmin, vmax = (min(values), max(values)) if values else (0.0, 100.0)
    if vmax - vmin < 1.0:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    heights = [max(1.6, 0.32 * len(panel) + 0.9) for panel in panels.values()]
    width = max(7.0, 5.5 + 0.09 * max((len(n) for p in panels.values() for n in p), default=10))
    fig = Figure(figsize=(width, sum(heights) + 0.6), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    image = None
    for ax, (name, panel) in zip(axes, panels.items()):
        cols = list(dict.fromkeys(g for acc in panel.values() for g in acc))
        grid = np.array([[acc.get(g, np.nan) for g in cols] for acc in panel.values()])
        image = _annotated_heatmap(ax, grid, list(panel), cols, "viridis", vmin, vmax)
        ax.set_title(name, fontsize=10, loc="left", fontweight="bold")
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="accuracy (%)", shrink=0.8)
    fig.suptitle("RFW accuracy (%)", fontsize=11)
    save_figure(fig, path)


def plot_teacher_set_comparison(pairs: Sequence[tuple[str, Mapping[str, tuple[float, float, float]],
                                                      Mapping[str, tuple[float, float, float]]]],
                                differences: Sequence[tuple[str, Mapping[str, tuple[float, float, float]]]],
                                path: Path, confidence: float) -> None:
    """Top: Avg, STD and SER of the students of each teacher set (value, low, high) per adaptor and KD kind.
    Bottom: the paired differences specialized - balanced with their intervals; 0 = no difference."""
    metrics = (("avg", "Avg accuracy (%)"), ("std", "STD (%)"), ("ser", "SER"))
    fig = Figure(figsize=(13.0, 7.5), layout="constrained")
    axes = fig.subplots(2, 3)
    labels = [label for label, _, _ in pairs]
    x = np.arange(len(labels))
    for col, (key, name) in enumerate(metrics):
        ax = axes[0, col]
        for offset, (set_name, index) in zip((-0.12, 0.12), (("specialized", 1), ("balanced", 2))):
            est = np.array([p[index][key] for p in pairs], dtype=float)
            ax.errorbar(x + offset, est[:, 0], yerr=_yerr(est), fmt="o", capsize=3, color=SET_COLOURS[set_name],
                        label=f"students of {set_name} teachers")
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax = axes[1, col]
        diff_labels = [label for label, _ in differences]
        est = np.array([d[key] for _, d in differences], dtype=float)
        xd = np.arange(len(diff_labels))
        colours = ["#999999" if lo <= 0 <= hi else "#000000" for _, lo, hi in est]
        for i in range(len(xd)):
            ax.errorbar(xd[i], est[i, 0], yerr=_yerr(est[i:i + 1]), fmt="s", capsize=3, color=colours[i])
        ax.axhline(0.0, color="#999999", linewidth=1, linestyle="--")
        ax.set_xticks(xd, diff_labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{name}: specialized - balanced", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=9)
    fig.suptitle(f"Students of specialized vs balanced teachers, {confidence:.0%} bootstrap intervals\nbottom: paired "
                 "differences; grey = interval covers 0 (no significant difference), black = significant", fontsize=11)
    save_figure(fig, path)


def _yerr(est: np.ndarray) -> np.ndarray:
    """Error-bar lengths from rows (value, low, high); infinite bounds are drawn to the axis edge as NaN-free 0."""
    low = np.where(np.isfinite(est[:, 1]), est[:, 0] - est[:, 1], 0.0)
    high = np.where(np.isfinite(est[:, 2]), est[:, 2] - est[:, 0], 0.0)
    return np.vstack([np.maximum(low, 0.0), np.maximum(high, 0.0)])


def det_points(distances: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FMR, FNMR) at every distinct threshold, a pair matching when its distance is below the threshold."""
    distances, issame = np.asarray(distances, dtype=np.float64), np.asarray(issame, dtype=bool)
    thresholds = np.unique(distances)
    thresholds = np.append(thresholds, np.inf)
    gen, imp = np.sort(distances[issame]), np.sort(distances[~issame])
    fmr = np.searchsorted(imp, thresholds, side="left") / max(imp.size, 1)
    fnmr = 1.0 - np.searchsorted(gen, thresholds, side="left") / max(gen.size, 1)
    return fmr, fnmr


def plot_det_families(families: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]], path: Path) -> None:
    """One DET panel per model family with one curve per group: FNMR against FMR, both on log axes. A family's
    curve pools the pairs of its models, i.e. the error rates averaged over them at each threshold."""
    n = len(families)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.2 * cols, 3.8 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
    # Axes start at the smallest rate the pair counts can measure.
    counts = [int(np.sum(np.asarray(s) == label)) for groups in families.values() for _, s in groups.values()
              for label in (False, True)]
    floor = 1.0 / max(max(counts, default=1), 1)
    for ax, (family, groups) in zip(axes, families.items()):
        ax.set_xlim(floor, 1.0)
        ax.set_ylim(floor, 1.0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        for colour, (group, (distances, issame)) in zip(GROUP_COLOURS, groups.items()):
            fmr, fnmr = det_points(distances, issame)
            keep = (fmr > 0) & (fnmr > 0)  # zero rates have no place on log axes
            ax.plot(fmr[keep], fnmr[keep], color=colour, label=group, linewidth=1.5)
        ax.set_title(family, fontsize=9)
        ax.set_xlabel("false match rate")
        ax.set_ylabel("false non-match rate")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="lower left")
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle("DET per model family and RFW group (lower left is better)", fontsize=11)
    save_figure(fig, path)


def plot_operating_points(tables: Mapping[float, tuple[Sequence[str], Sequence[str], np.ndarray, np.ndarray]],
                          path: Path) -> None:
    """Per target FMR: heatmaps of FMR and FNMR (%) per model (rows) and group (columns) at each model's global
    threshold. Colour scales are per heatmap, from the smallest to the largest rate shown."""
    fig = Figure(figsize=(12.0, sum(max(2.0, 0.3 * len(t[0]) + 1.0) for t in tables.values()) + 0.6),
                 layout="constrained")
    axes = fig.subplots(len(tables), 2, squeeze=False)
    for (target, (models, groups, fmr, fnmr)), row in zip(tables.items(), axes):
        for ax, values, name in ((row[0], fmr, "FMR"), (row[1], fnmr, "FNMR")):
            finite = 100 * values[np.isfinite(values)]
            low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
            image = _annotated_heatmap(ax, 100 * values, models if ax is row[0] else [""] * len(models), groups,
                                       "magma_r", low, max(high, low + 1e-6))
            ax.set_title(f"{name} (%) at global threshold for pooled FMR {target:g}", fontsize=9, loc="left")
            fig.colorbar(image, ax=ax, shrink=0.8)
    save_figure(fig, path)
