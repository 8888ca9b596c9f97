"""``git theta diff --plot FILE.png``: the relative change of every changed tensor, by layer.

When the changed tensors form a grid (the same kinds of tensor in several layers, as in a
transformer) the picture is a heat map: one row per layer/block, one column per tensor kind
(the name after the layer prefix), colour = log10 of the relative change. Otherwise it is a bar chart
of the relative change per tensor, coloured by layer. matplotlib is an optional extra
(``pip install 'git-theta[plot]'``) and is imported only here.
"""

import math

from git_theta.diff.compare import natural_key
from git_theta.errors import UsageError


def _matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise UsageError(
            "--plot needs matplotlib, which is not installed",
            hint="pip install 'git-theta[plot]'  (or pip install matplotlib)",
        ) from None
    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    return plt


def points(diff):
    """(row label, column label, tensor name, relative change) of every tensor with a number."""
    many = len(diff["files"]) > 1
    result = []
    for f in diff["files"]:
        for t in f["tensors"]:
            rel = (t["stats"] or {}).get("relative_change")
            if rel is None:
                continue
            group = t["group"]
            column = t["name"][len(group) + 1 :] if t["name"].startswith(group + ".") else t["name"]
            row = f"{f['path']}: {group}" if many else group
            result.append((row, column, t["name"], rel))
    return result


def plot_diff(diff, out_path):
    """Draw the diff's relative changes to ``out_path`` (PNG); UsageError when there is nothing."""
    data = points(diff)
    if not data:
        raise UsageError("nothing to plot: no tensor changed in value between these versions")
    plt = _matplotlib()
    rows = sorted({r for r, _, _, _ in data}, key=natural_key)
    columns = sorted({c for _, c, _, _ in data}, key=natural_key)
    if len(rows) >= 2 and len(columns) <= 64 and len(data) >= 1.5 * max(len(rows), len(columns)):
        fig = _heatmap(plt, data, rows, columns)
    else:
        fig = _bars(plt, data)
    title = f"relative change ||new - old|| / ||old||: {diff.get('old')} -> {diff.get('new')}"
    fig.suptitle(title, fontsize=10)
    fig.savefig(out_path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _log10(x):
    return math.log10(x) if x > 0 else float("nan")


def _heatmap(plt, data, rows, columns):
    import numpy as np

    grid = np.full((len(rows), len(columns)), np.nan)
    r_index = {r: i for i, r in enumerate(rows)}
    c_index = {c: i for i, c in enumerate(columns)}
    for r, c, _, rel in data:
        grid[r_index[r], c_index[c]] = _log10(rel)
    height = min(40, 1.5 + 0.28 * len(rows))
    width = min(30, 3 + 0.45 * len(columns) + 0.08 * max(len(r) for r in rows))
    fig, ax = plt.subplots(figsize=(width, height))
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("#dddddd")  # grey: unchanged or not comparable
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, interpolation="nearest")
    ax.set_xticks(range(len(columns)), labels=columns, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), labels=rows, fontsize=8)
    ax.set_xlabel("tensor")
    ax.set_ylabel("layer / block")
    bar = fig.colorbar(image, ax=ax)
    bar.set_label("log10 relative change (grey: unchanged)")
    return fig


def _bars(plt, data):
    data = sorted(data, key=lambda d: natural_key(d[2]))
    groups = sorted({r for r, _, _, _ in data}, key=natural_key)
    palette = plt.get_cmap("tab10")
    colour = {g: palette(i % 10) for i, g in enumerate(groups)}
    height = min(60, 1.2 + 0.25 * len(data))
    fig, ax = plt.subplots(figsize=(9, height))
    labels = [d[2] for d in data]
    values = [d[3] for d in data]
    ax.barh(range(len(data)), values, color=[colour[d[0]] for d in data])
    ax.set_yticks(range(len(data)), labels=labels, fontsize=8)
    ax.invert_yaxis()
    if values and min(v for v in values if v >= 0) > 0 and max(values) / max(min(values), 1e-300) > 100:
        ax.set_xscale("log")
    ax.set_xlabel("relative change ||new - old|| / ||old||")
    if 1 < len(groups) <= 20:
        from matplotlib.patches import Patch

        ax.legend(
            handles=[Patch(color=colour[g], label=g) for g in groups],
            fontsize=7,
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            title="layer / block",
            title_fontsize=7,
        )
    return fig
