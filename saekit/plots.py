"""The report plot of `saekit pursue` and `saekit eval`: metrics against L0, one panel per metric.

Each pursuit method is a curve over its k's, each encoder a labelled star, a reference level (the
cache round-trip) a dashed line. matplotlib is imported lazily: it takes seconds, and only the
reports need it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from saekit.atomic import writing

Ys = Sequence[float]  # one value per panel


def plot_against_l0(
    path: Path,
    ylabels: Sequence[str],
    curves: Mapping[str, Sequence[tuple[float, Ys]]],
    points: Mapping[str, tuple[float, Ys]],
    levels: Mapping[str, Ys] | None = None,
    title: str = "",
) -> None:
    """Write a PNG to `path` (replaced atomically): panel i plots value i of every (L0, values).

    curves: label -> points of a line (sorted by L0 here); points: label -> one star;
    levels: label -> a dashed horizontal line. The bytes depend only on the inputs.
    """
    import matplotlib  # lazy: matplotlib takes a second to import

    matplotlib.use("Agg")  # no display needed; also keeps the bytes independent of the backend
    import matplotlib.pyplot as plt  # lazy: after the backend is chosen

    fig, axes = plt.subplots(1, len(ylabels), figsize=(6 * len(ylabels), 4.2), dpi=120, squeeze=False)
    colors = getattr(plt.get_cmap("tab10"), "colors")  # noqa: B009 - a ListedColormap's; the stubs type only Colormap
    star_colors = ["black", *reversed(colors)]  # never a curve's colour
    for i, (ax, ylabel) in enumerate(zip(axes[0], ylabels)):
        for j, (label, pts) in enumerate(curves.items()):
            pts = sorted((l0, ys[i]) for l0, ys in pts)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colors[j % 10], label=label)
        for j, (label, (l0, ys)) in enumerate(points.items()):
            ax.scatter([l0], [ys[i]], marker="*", s=180, zorder=3, color=star_colors[j % len(star_colors)], label=label)
        for label, ys in (levels or {}).items():
            ax.axhline(ys[i], color="gray", linestyle="--", linewidth=1, label=label)
        ax.set_xlabel("L0 (mean nonzero codes per row)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if len(ylabels) == 1:
        axes[0][0].set_title(title, fontsize=9)
    else:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with writing(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
