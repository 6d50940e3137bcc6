"""Human-readable output of `evaluate`: a rich table and a query x pool language mAP heatmap (PNG)."""
from __future__ import annotations

from pathlib import Path


def _fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def _short(x):
    return "-" if x is None else ("1.00" if x >= 0.9995 else f"{x:.3f}"[1:])


def summary_table(result: dict):
    """rich Table: Mo. / Cr. / Mul. mAP, R@1 (Mo., Cr.) / R@10 (Mul.) and the Mul. rank distance."""
    from rich.table import Table

    s = result.get("settings", {})
    title = f"{result['dataset']} - {result['model']}"
    if s.get("subset"):
        title += f" (subset: max_paragraphs={s.get('max_paragraphs')}, seed={s.get('seed')})"
    t = Table(title=title)
    for col in ("setting", "pairs", "mAP", "recall", "rank distance"):
        t.add_column(col, justify="left" if col == "setting" else "right")
    m, r, n = result["map"], result["recall"], result.get("n_pairs", {})
    t.add_row("Mo.", str(n.get("mo", "")), _fmt(m["mo"]), f"R@1 {_fmt(r['mo_r1'])}", "")
    t.add_row("Cr.", str(n.get("cr", "")), _fmt(m["cr"]), f"R@1 {_fmt(r['cr_r1'])}", "")
    t.add_row("Mul.", "1", _fmt(m["mul"]), f"R@10 {_fmt(r['mul_r10'])}", _fmt(result["rank_distance"], 1))
    t.caption = (f"{result['n_questions']} questions, {result['n_candidates']} candidates, "
                 f"{result.get('timing', {}).get('total_s', float('nan')):.1f} s")
    return t


def matrix_table(result: dict):
    """rich Table of the query-language (rows) x pool-language (columns) mAP matrix."""
    from rich import box
    from rich.table import Table

    langs = list(result["matrix"])
    # No vertical rules and 3-digit cells: an 11 x 11 matrix fits an 80-column terminal.
    t = Table(title="mAP: query language (rows) x pool language (columns)", box=box.SIMPLE_HEAD,
              padding=(0, 0), pad_edge=False)
    t.add_column("q\\p", no_wrap=True)
    for lang in langs:
        t.add_column(lang, justify="right", no_wrap=True, min_width=4)
    for q in langs:
        t.add_row(q, *[_short(result["matrix"][q][p]) for p in langs])
    return t


def print_report(result: dict, *, matrix: bool = True, console=None) -> None:
    """Print the summary (and the mAP matrix) with rich."""
    from rich.console import Console

    console = console or Console()
    console.print(summary_table(result))
    if matrix:
        console.print(matrix_table(result))


def plot_matrix(result: dict, path) -> Path:
    """Write the query x pool language mAP heatmap of `result` as a PNG (matplotlib Agg); return its path."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    langs = list(result["matrix"])
    mat = np.array([[np.nan if result["matrix"][q][p] is None else result["matrix"][q][p] for p in langs]
                    for q in langs], dtype=float)
    size = 1.0 + 0.55 * len(langs)
    # A bare Figure on the Agg canvas: no pyplot state, no GUI backend, safe in threads and servers.
    fig = Figure(figsize=(size + 1.2, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(mat, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(langs)), langs)
    ax.set_yticks(range(len(langs)), langs)
    ax.set_xlabel("pool language")
    ax.set_ylabel("query language")
    for i in range(len(langs)):
        for j in range(len(langs)):
            if not np.isnan(mat[i, j]):
                ax.text(j, i, f"{mat[i, j]:.2f}"[1:] if mat[i, j] < 1 else "1.0", ha="center", va="center",
                        fontsize=7, color="white" if mat[i, j] < 0.6 else "black")
    m = result["map"]
    ax.set_title(f"{result['dataset']} mAP  Mo {_fmt(m['mo'])}  Cr {_fmt(m['cr'])}  Mul {_fmt(m['mul'])}",
                 fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
