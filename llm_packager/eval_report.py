"""Charts and a self-contained HTML report comparing the evaluated models."""

from __future__ import annotations

import base64
import html
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; the step may run on a machine without a display

import matplotlib.pyplot as plt
import pandas as pd

from llm_packager.evaluation import QUALITY_METRICS

RANDOM_WEIGHTS_WARNING = (
    "These models have random weights (the synthetic tiny Phi-3). Their answers are noise, so "
    "every quality and agreement figure below is meaningless; speed and memory figures are real."
)
_COLOURS = {"transformers": "#4c72b0", "onnx": "#dd8452"}


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def quality_chart(metrics: dict[str, dict[str, float]], path: Path, *, note: str = "") -> Path:
    """Grouped bars of the quality metrics per model (0 to 1)."""
    figure, axes = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(metrics)
    for offset, (model, figures) in enumerate(metrics.items()):
        positions = [index + offset * width for index in range(len(QUALITY_METRICS))]
        bars = axes.bar(positions, [figures[name] for name in QUALITY_METRICS], width,
                        label=model, color=_COLOURS.get(model))  # fmt: skip
        # Labels keep a score of 0 visible, where a bar has no height.
        axes.bar_label(bars, fmt="%.2f")
    axes.set_xticks(
        [index + width * (len(metrics) - 1) / 2 for index in range(len(QUALITY_METRICS))]
    )
    axes.set_xticklabels(["exact match", "contains reference", "token F1"])
    axes.set_ylim(0, 1)
    axes.set_ylabel("score (fraction of prompts, 0-1)")
    axes.set_title("Answer quality against the references" + (f"\n{note}" if note else ""))
    axes.legend()
    return _save(figure, path)


def latency_chart(latencies: dict[str, list[float]], path: Path) -> Path:
    """Distribution of end-to-end request latency per model."""
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.boxplot(list(latencies.values()), tick_labels=list(latencies), showmeans=True)
    medians = sorted(statistics.median(values) for values in latencies.values())
    scale = ""
    # Models an order of magnitude apart would leave the faster one a flat line on a linear axis.
    if medians[0] > 0 and medians[-1] / medians[0] > 10:
        axes.set_yscale("log")
        scale = ", log scale"
    axes.set_ylabel(f"end-to-end latency per request (s{scale})")
    axes.set_title("Request latency (box: quartiles, line: median, triangle: mean)")
    return _save(figure, path)


def speed_chart(metrics: dict[str, dict[str, float]], path: Path) -> Path:
    """Decode tokens per second per model."""
    figure, axes = plt.subplots(figsize=(6, 4))
    models = list(metrics)
    values = [metrics[model]["decode_tokens_per_s"] for model in models]
    bars = axes.bar(models, values, color=[_COLOURS.get(model) for model in models])
    axes.bar_label(bars, fmt="%.1f")
    axes.set_ylabel("decode speed (generated tokens / s)")
    axes.set_title("Decode speed, greedy, one request at a time")
    return _save(figure, path)


def memory_chart(metrics: dict[str, dict[str, float]], path: Path) -> Path:
    """Peak memory while loading and while generating, and size on disk, per model. Memory and
    size get their own panels: a small model on disk would vanish on the memory axis."""
    figure, (memory_axes, size_axes) = plt.subplots(
        1, 2, figsize=(9, 4), gridspec_kw={"width_ratios": [2, 1]}
    )
    measures = [("peak_rss_load_mib", "after load"), ("peak_rss_generate_mib", "while generating")]
    width = 0.8 / len(metrics)
    for offset, (model, figures) in enumerate(metrics.items()):
        positions = [index + offset * width for index in range(len(measures))]
        bars = memory_axes.bar(positions, [figures[key] for key, _ in measures], width,
                               label=model, color=_COLOURS.get(model))  # fmt: skip
        memory_axes.bar_label(bars, fmt="%.0f")
    memory_axes.set_xticks(
        [index + width * (len(metrics) - 1) / 2 for index in range(len(measures))]
    )
    memory_axes.set_xticklabels([label for _, label in measures])
    tallest = max(figures[key] for figures in metrics.values() for key, _ in measures)
    memory_axes.set_ylim(0, tallest * 1.3)  # room for the legend above the bar labels
    memory_axes.set_ylabel("peak resident memory (MiB)")
    memory_axes.set_title("Peak memory of the serving process")
    memory_axes.legend()
    models = list(metrics)
    bars = size_axes.bar(models, [metrics[m]["model_size_mib"] for m in models],
                         color=[_COLOURS.get(m) for m in models])  # fmt: skip
    size_axes.bar_label(bars, fmt="%.3g")
    size_axes.set_ylabel("logged model size on disk (MiB)")
    size_axes.set_title("Model size")
    return _save(figure, path)


def _image(path: Path) -> str:
    encoded = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{encoded}">'


def html_report(
    *,
    comparison: pd.DataFrame,
    per_category: pd.DataFrame,
    verdicts: dict[str, tuple[str, list[str]]],
    recommended: str | None,
    policy: str,
    settings: dict[str, object],
    notes: list[str],
    charts: list[Path],
    random_weights: bool,
) -> str:
    """One HTML page with everything inlined (tables and PNGs), readable without the MLflow UI."""
    verdict_rows = "".join(
        f"<tr><td>{html.escape(model)}</td><td>{html.escape(status)}</td>"
        f"<td>{html.escape('; '.join(reasons) or '-')}</td></tr>"
        for model, (status, reasons) in verdicts.items()
    )
    settings_rows = "".join(
        f"<tr><td>{html.escape(str(key))}</td><td>{html.escape(str(value))}</td></tr>"
        for key, value in settings.items()
    )
    warning = (
        f'<p class="warning">{html.escape(RANDOM_WEIGHTS_WARNING)}</p>' if random_weights else ""
    )
    notes_html = "".join(f"<li>{html.escape(note)}</li>" for note in notes)
    recommendation = (
        f"<b>{html.escape(recommended)}</b> (policy <code>{html.escape(policy)}</code>)"
        if recommended
        else f"none: no model passed the gate (policy <code>{html.escape(policy)}</code>)"
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Model comparison</title>
<style>
body {{ font-family: sans-serif; max-width: 60em; margin: 2em auto; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
.warning {{ background: #fff3cd; border: 1px solid #e0c060; padding: 0.8em; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>Transformers vs ONNX: model comparison</h1>
{warning}
<h2>Verdict</h2>
<p>Recommended model: {recommendation}</p>
<table><tr><th>model</th><th>gate</th><th>reasons</th></tr>{verdict_rows}</table>
<h2>Figures</h2>
{comparison.to_html(float_format=lambda value: f"{value:.4g}")}
<h2>Quality by category</h2>
{per_category.to_html(float_format=lambda value: f"{value:.3f}")}
<h2>Charts</h2>
{"".join(_image(chart) for chart in charts)}
<h2>Settings</h2>
<table>{settings_rows}</table>
<ul>{notes_html}</ul>
</body></html>
"""
