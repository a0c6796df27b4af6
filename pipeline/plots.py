"""The eval stage's pictures: base vs fine-tuned per metric, and the fine-tune run's loss curves.

Each figure must be readable on its own: a title that says what is compared, axis labels with
units, the value on every bar, which way is better, and the teacher as a dashed line where it
has the same score. matplotlib with the Agg backend (no display needed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BASE_COLOR = "#9e9e9e"
FINETUNED_COLOR = "#1f77b4"
TEACHER_COLOR = "#d62728"

# (metric key, title, y label, percent?, which way is better); perplexity is left to the table
# since it is exp(NLL) and would only repeat that panel.
PANELS: list[tuple[str, str, str, bool, str]] = [
    ("accuracy", "Accuracy vs reference", "% of prompts correct", True, "higher is better"),
    ("teacher_match", "Final answer = teacher's", "% of prompts", True, "higher is better"),
    (
        "rouge_l",
        "Text overlap with teacher (ROUGE-L F1)",
        "F1 (0 = none, 1 = same)",
        False,
        "higher is better",
    ),
    ("nll", "NLL of the teacher's answers", "nats per token", False, "lower is better"),
    (
        "format_compliance",
        "Format compliance",
        "% of answers matching format_regex",
        True,
        "higher is better",
    ),
    ("judge_score", "LLM judge score", "score (0-1)", False, "higher is better"),
    (
        "answer_tokens",
        "Answer length",
        "mean tokens per answer",
        False,
        "closer to teacher is better",
    ),
    (
        "hit_max_tokens",
        "Answers cut at max_new_tokens",
        "% of answers (never stopped)",
        True,
        "lower is better",
    ),
]

# Names short enough for the verdict panel.
SHORT = {
    "accuracy": "accuracy",
    "teacher_match": "= teacher's",
    "rouge_l": "ROUGE-L",
    "nll": "NLL",
    "format_compliance": "format",
    "judge_score": "judge",
    "answer_tokens": "length",
    "hit_max_tokens": "cut at max",
}


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(report: dict[str, Any], path: Path) -> None:
    """One small bar chart per metric that has a value: base vs fine-tuned, teacher dashed."""
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    m = report["metrics"]
    panels = [
        p for p in PANELS if m["base"].get(p[0]) is not None or m["finetuned"].get(p[0]) is not None
    ]
    cells = len(panels) + 1  # the last cell holds the verdict in words
    cols = min(4, cells)
    rows = (cells + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows + 1.2), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        _bar_panel(ax, panel, m, report["config"]["max_new_tokens"])
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[len(panels)].text(
        0.0,
        1.0,
        verdict(report, panels),
        va="top",
        ha="left",
        fontsize=10,
        family="monospace",
        transform=axes.flat[len(panels)].transAxes,
    )
    students = report["students"]
    against = students.get("against")
    b = report.get("labels", {}).get("base", "base")
    fig.suptitle(
        f"{b.capitalize()} vs fine-tuned student on {report['prompts']} held-out prompts"
        f" ({'greedy' if report['config']['greedy'] else 'sampled'} decoding)\n"
        f"{b}: {_name(against) if against else Path(students['base']).name}    "
        f"fine-tuned: {_name(students['finetuned'])}",
        fontsize=12,
    )
    handles = [
        Patch(color=BASE_COLOR, label=f"{b} student"),
        Patch(color=FINETUNED_COLOR, label="fine-tuned student"),
        Line2D(
            [],
            [],
            color=TEACHER_COLOR,
            linestyle="--",
            label="teacher (same score on its own answers)",
        ),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bar_panel(ax: Any, panel: tuple[str, str, str, bool, str], m: dict, max_new: Any) -> None:
    """One metric: base and fine-tuned bars with their values, the teacher as a dashed line."""
    key, title, ylabel, percent, better = panel
    scale = 100.0 if percent else 1.0
    values = [m[s].get(key) for s in ("base", "finetuned")]
    heights = [0.0 if v is None else v * scale for v in values]
    bars = ax.bar(["base", "fine-tuned"], heights, color=[BASE_COLOR, FINETUNED_COLOR], width=0.6)
    top = max(heights + [1e-9])
    teacher = m.get("teacher", {}).get(key)
    if teacher is not None:
        y = teacher * scale
        ax.axhline(y, color=TEACHER_COLOR, linestyle="--", linewidth=1.5)
        ax.annotate(
            f"teacher {y:.1f}%" if percent else f"teacher {teacher:.3g}",
            (1.0, y),
            xycoords=("axes fraction", "data"),
            ha="right",
            va="bottom",
            color=TEACHER_COLOR,
            fontsize=8,
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1},
        )
        top = max(top, y)
    for bar, v in zip(bars, values, strict=True):
        text = "n/a" if v is None else f"{v * scale:.1f}%" if percent else f"{v:.3g}"
        ax.annotate(
            text,
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            xytext=(0, 2),
            textcoords="offset points",
            fontsize=10,
            fontweight="bold",
        )
    ax.set_ylim(0, 110 if percent else top * 1.25)
    if key == "answer_tokens":
        title = f"{title} (max_new_tokens {max_new})"
    ax.set_title(f"{title}\n({better})", fontsize=10)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def verdict(report: dict[str, Any], panels: list[tuple[str, str, str, bool, str]]) -> str:
    """Each metric's change from base to fine-tuned in words: "better" or "worse" only when the
    95% interval of the difference (report["differences"]) excludes zero."""
    m, diffs = report["metrics"], report.get("differences", {})
    col = report.get("labels", {}).get("base", "base")  # "against": another fine-tuned student
    lines, better, worse = [f"{col} -> fine-tuned (95% CI)", ""], 0, 0
    for key, _, _, percent, _ in panels:
        b, f, d = m["base"].get(key), m["finetuned"].get(key), diffs.get(key)
        if b is None or f is None or d is None:
            continue
        show = (lambda v: f"{100 * v:.1f}%") if percent else (lambda v: f"{v:.3g}")
        word = {"no clear difference": "unclear"}.get(d["verdict"], d["verdict"])
        better += word == "better"
        worse += word == "worse"
        lines.append(f"{SHORT[key]:<14}{show(b):>7} -> {show(f):>7}  {word}")
    lines += [
        "",
        f"fine-tuned is better on {better}, worse on {worse}",
        f"of {len(lines) - 2} metrics",
    ]
    return "\n".join(lines)


def _name(path: str) -> str:
    """A fine-tuned student's short name: 'run/adapter' rather than just 'adapter'."""
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.name == "adapter" else p.name


def plot_loss_curves(log_history: Path, path: Path) -> bool:
    """Train and eval loss vs optimizer step from a Trainer's log_history; False if it has none.
    A `--loss kd` run also logs both terms of its mix: drawn on their own, so a term that does
    nothing shows. A file that is missing or unreadable is False too (eval relies on it)."""
    try:
        history = json.loads(log_history.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(history, list):
        return False
    history = [h for h in history if isinstance(h, dict)]
    kd = any("kd_loss" in h and "loss" in h for h in history)
    return plot_step_curves(
        history,
        path,
        ("loss", "train loss"),
        ("eval_loss", "eval loss, held-out prompts"),
        terms=(
            (("kd_loss", "train KD term, KL to the teacher's top-k"), ("ce_loss", "train CE term"))
            if kd
            else ()
        ),
        title="Fine-tuning: loss on the teacher's answers (lower is better)",
        ylabel="nats per assistant token" if kd else "cross-entropy (nats per assistant token)",
    )


def plot_step_curves(
    history: list[dict[str, Any]],
    path: Path,
    train: tuple[str, str],
    held: tuple[str, str],
    *,
    terms: tuple[tuple[str, str], ...] = (),
    title: str,
    ylabel: str,
) -> bool:
    """Curves per optimizer step from a history of {"step": ..., key: value} entries: the
    training one and the held-out one, each (key, label), and dashed `terms` of the training
    one; False when there is nothing to plot. A fine-tune's loss and eval loss (with KD's two
    terms), on-policy distillation's reverse KL (pipeline/onpolicy.py)."""

    def points(key: str) -> list[tuple[Any, Any]]:
        return [(h["step"], h[key]) for h in history if h.get(key) is not None and "step" in h]

    curves = [points(key) for key, _ in (train, held)]
    if not any(curves):
        return False
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.2))
    # (points, label, style): the training curve, the held-out one, the dashed terms
    lines: list[tuple[list[Any], str, dict[str, Any]]] = [
        (
            curves[0],
            train[1],
            {"color": FINETUNED_COLOR, "marker": "." if len(curves[0]) < 30 else None},
        ),
        (curves[1], held[1], {"color": TEACHER_COLOR, "marker": "o"}),
        *(
            (points(key), label, {"color": FINETUNED_COLOR, "linestyle": style, "alpha": 0.8})
            for (key, label), style in zip(terms, ("--", ":", "-."), strict=False)
        ),
    ]
    # The last values go in the legend: annotations at the last step would overlap.
    for xy, label, style in lines:
        if xy:
            ax.plot(*zip(*xy, strict=True), **style, label=f"{label} (last {xy[-1][1]:.3f})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
