"""Charts and a self-contained HTML report comparing the evaluated candidate models."""

from __future__ import annotations

import base64
import html
import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; the step may run on a machine without a display

import matplotlib.pyplot as plt
import pandas as pd

from llm_packager.evaluation.metrics import QUALITY_METRICS, TEACHER_FORCED_METRICS
from llm_packager.evaluation.record import Evaluation
from llm_packager.keys import (
    CHARTS_DIR,
    COMPARISON_CSV,
    COMPARISON_JSON,
    DECODE_TOKENS_PER_S_METRIC,
    IDENTICAL_RATE_METRIC,
    KL_DIVERGENCE_CHART,
    KLD_MEAN_METRIC,
    LATENCY_CHART,
    MEMORY_CHART,
    MODEL_SIZE_BYTES_METRIC,
    MODEL_SIZE_MIB_METRIC,
    PEAK_RSS_GENERATE_MIB_METRIC,
    PEAK_RSS_LOAD_MIB_METRIC,
    QUALITY_CHART,
    REPORT_ARTIFACT,
    SPEED_CHART,
)

RANDOM_WEIGHTS_WARNING = (
    "These models have random weights (the synthetic tiny Phi-3). Their answers are noise, so "
    "every quality and agreement figure below is meaningless; speed and memory figures are real."
)
# One colour per candidate, in evaluation order (the reference, transformers, comes first).
_PALETTE = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3",
            "#8c8c8c")  # fmt: skip


def _colours(names) -> list[str]:
    return [_PALETTE[index % len(_PALETTE)] for index, _ in enumerate(names)]


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def quality_chart(metrics: dict[str, dict[str, float]], path: Path, *, note: str = "") -> Path:
    """Grouped bars of the quality metrics per model (0 to 1)."""
    figure, axes = plt.subplots(figsize=(max(7, 2 + 1.2 * len(metrics)), 4))
    width = 0.8 / len(metrics)
    colours = _colours(metrics)
    for offset, (model, figures) in enumerate(metrics.items()):
        positions = [index + offset * width for index in range(len(QUALITY_METRICS))]
        bars = axes.bar(positions, [figures[name] for name in QUALITY_METRICS], width,
                        label=model, color=colours[offset])  # fmt: skip
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
    figure, axes = plt.subplots(figsize=(max(6, 1.5 * len(metrics)), 4))
    models = list(metrics)
    values = [metrics[model][DECODE_TOKENS_PER_S_METRIC] for model in models]
    bars = axes.bar(models, values, color=_colours(models))
    axes.bar_label(bars, fmt="%.1f")
    axes.set_ylabel("decode speed (generated tokens / s)")
    axes.set_title("Decode speed, greedy, one request at a time")
    return _save(figure, path)


def memory_chart(metrics: dict[str, dict[str, float]], path: Path) -> Path:
    """Peak memory while loading and while generating, and size on disk, per model. Memory and
    size get their own panels: a small model on disk would vanish on the memory axis."""
    figure, (memory_axes, size_axes) = plt.subplots(
        1, 2, figsize=(max(9, 3 + 1.5 * len(metrics)), 4), gridspec_kw={"width_ratios": [2, 1]}
    )
    measures = [
        (PEAK_RSS_LOAD_MIB_METRIC, "after load"),
        (PEAK_RSS_GENERATE_MIB_METRIC, "while generating"),
    ]
    width = 0.8 / len(metrics)
    colours = _colours(metrics)
    for offset, (model, figures) in enumerate(metrics.items()):
        positions = [index + offset * width for index in range(len(measures))]
        bars = memory_axes.bar(positions, [figures[key] for key, _ in measures], width,
                               label=model, color=colours[offset])  # fmt: skip
        memory_axes.bar_label(bars, fmt="%.0f")
    memory_axes.set_xticks(
        [index + width * (len(metrics) - 1) / 2 for index in range(len(measures))]
    )
    memory_axes.set_xticklabels([label for _, label in measures])
    # Spark's engine does not measure memory (NaN): its bars are empty, the axis still scales.
    tallest = max((figures[key] for figures in metrics.values() for key, _ in measures
                   if math.isfinite(figures[key])), default=1.0)  # fmt: skip
    memory_axes.set_ylim(0, tallest * 1.3)  # room for the legend above the bar labels
    memory_axes.set_ylabel("peak resident memory (MiB)")
    memory_axes.set_title("Peak memory of the serving process")
    memory_axes.legend()
    models = list(metrics)
    bars = size_axes.bar(models, [metrics[m][MODEL_SIZE_MIB_METRIC] for m in models],
                         color=_colours(models))  # fmt: skip
    size_axes.bar_label(bars, fmt="%.3g")
    size_axes.set_ylabel("logged model size on disk (MiB)")
    size_axes.set_title("Model size")
    return _save(figure, path)


def kl_divergence_chart(kl_divergences: dict[str, list[float]], path: Path) -> Path:
    """A histogram per candidate of the teacher-forced KL divergence from the reference, one
    count per corpus position, on a log axis: quantization spreads it over decades."""
    import numpy as np

    compared = {name: values for name, values in kl_divergences.items() if max(values) > 0}
    figure, axes = plt.subplots(figsize=(8, 4))
    # The reference compared with itself has KL 0 everywhere: nothing to draw on a log axis.
    if not compared:
        axes.text(0.5, 0.5, "every candidate's KL divergence is 0", ha="center", va="center")
        return _save(figure, path)
    positive = [value for values in compared.values() for value in values if value > 0]
    edges = np.logspace(np.log10(min(positive)), np.log10(max(positive)), 41)
    colours = dict(zip(kl_divergences, _colours(kl_divergences), strict=True))
    for name, values in compared.items():
        # A position whose KL rounds to 0 is counted in the lowest bin, so every position shows.
        clipped = np.clip(values, edges[0], edges[-1])
        axes.hist(clipped, bins=edges, histtype="step", linewidth=1.5, color=colours[name],
                  label=f"{name} (mean {np.mean(values):.3g})")  # fmt: skip
    axes.set_xscale("log")
    axes.set_xlabel("KL(reference || candidate) per position (nats, log scale)")
    axes.set_ylabel("corpus positions")
    axes.set_title("Teacher-forced next-token divergence from the reference")
    axes.legend()
    return _save(figure, path)


def _teacher_forced(evaluation: Evaluation) -> str:
    """The teacher-forced figures per candidate, or why there are none."""
    rows = [
        f"<tr><td>{html.escape(c.name)}</td>"
        + "".join(f"<td>{c.metrics[m]:.4g}</td>" for m in TEACHER_FORCED_METRICS)
        + "</tr>"
        for c in evaluation.candidates
        if KLD_MEAN_METRIC in c.metrics
    ]
    if not rows:
        return "<p>No candidate was compared teacher-forced (see the notes below).</p>"
    header = "".join(f"<th>{html.escape(m)}</th>" for m in TEACHER_FORCED_METRICS)
    return (
        "<p>Each candidate read the same fixed corpus (the evaluation set's reference answers and "
        "a held-out text, tokenized once by the reference's tokenizer) in one forward pass, and "
        "its next-token distribution Q at every position was compared with the reference's P: "
        "KL(P || Q) in nats (the direction of llama.cpp's <code>--kl-divergence</code>), how "
        "often the most likely token is the same, and the perplexity on the corpus with its "
        "ratio to the reference's.</p>"
        f"<table><tr><th>candidate</th>{header}</tr>{''.join(rows)}</table>"
    )


def _image(path: Path) -> str:
    encoded = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{encoded}">'


def _against_reference(evaluation: Evaluation) -> str:
    """Each candidate's quality, speed and size next to the reference candidate's: the change in
    each quality metric (what the gate's relative rule judges), and the speed-up and size ratio."""
    if not evaluation.reference:
        return "<p>The reference candidate was not evaluated.</p>"
    reference = evaluation.candidate(evaluation.reference).metrics
    header = "".join(f"<th>{html.escape(m)} change</th>" for m in QUALITY_METRICS)
    rows = []
    for candidate in evaluation.candidates:
        metrics = candidate.metrics
        changes = "".join(f"<td>{metrics[m] - reference[m]:+.3f}</td>" for m in QUALITY_METRICS)
        speed = metrics[DECODE_TOKENS_PER_S_METRIC] / reference[DECODE_TOKENS_PER_S_METRIC]
        size = metrics[MODEL_SIZE_BYTES_METRIC] / reference[MODEL_SIZE_BYTES_METRIC]
        rows.append(
            f"<tr><td>{html.escape(candidate.name)}</td>{changes}"
            f"<td>{metrics[IDENTICAL_RATE_METRIC]:.0%}</td><td>{speed:.2f}x</td><td>{size:.2f}x</td>"
            f"<td>{html.escape(candidate.verdict.status)}</td></tr>"
        )
    return (
        f"<p>Reference: <b>{html.escape(evaluation.reference)}</b>. Quality changes are the "
        "candidate's score minus the reference's on the same prompts.</p>"
        f"<table><tr><th>candidate</th>{header}<th>identical answers</th><th>decode speed</th>"
        f"<th>size</th><th>gate</th></tr>{''.join(rows)}</table>"
    )


def html_report(
    *,
    evaluation: Evaluation,
    comparison: pd.DataFrame,
    per_category: pd.DataFrame,
    settings: dict[str, object],
    charts: list[Path],
) -> str:
    """One HTML page with everything inlined (tables and PNGs), readable without the MLflow UI."""
    verdict_rows = "".join(
        f"<tr><td>{html.escape(c.name)}</td><td>{html.escape(c.runtime)}</td>"
        f"<td>{html.escape(c.verdict.status)}</td>"
        f"<td>{html.escape('; '.join(c.verdict.reasons) or '-')}</td></tr>"
        for c in evaluation.candidates
    )
    settings_rows = "".join(
        f"<tr><td>{html.escape(str(key))}</td><td>{html.escape(str(value))}</td></tr>"
        for key, value in settings.items()
    )
    warning = (
        f'<p class="warning">{html.escape(RANDOM_WEIGHTS_WARNING)}</p>'
        if evaluation.random_weights
        else ""
    )
    notes_html = "".join(
        f"<li>{html.escape(note)}</li>" for note in evaluation.notes
        if note != RANDOM_WEIGHTS_WARNING
    )  # fmt: skip
    recommendation = evaluation.recommendation
    policy = html.escape(recommendation.policy.value)
    chosen = (
        f"<b>{html.escape(recommendation.candidate)}</b> (policy <code>{policy}</code>)"
        if recommendation.candidate
        else f"none: no candidate passed the gate (policy <code>{policy}</code>)"
    )
    agreement = (
        f"Agreement (<code>identical_rate</code>, <code>token_agreement</code>) is measured "
        f"against the reference candidate <b>{html.escape(evaluation.reference)}</b>."
        if evaluation.reference
        else "Agreement was not measured: the reference candidate was not evaluated."
    )
    title = "Model comparison: " + ", ".join(evaluation.names())
    against = _against_reference(evaluation)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; max-width: 60em; margin: 2em auto; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
.warning {{ background: #fff3cd; border: 1px solid #e0c060; padding: 0.8em; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
{warning}
<h2>Verdict</h2>
<p>Recommended model: {chosen}</p>
<table><tr><th>candidate</th><th>runtime</th><th>gate</th><th>reasons</th></tr>{verdict_rows}</table>
<h2>Against the reference</h2>
{against}
<h2>Teacher-forced against the reference</h2>
{_teacher_forced(evaluation)}
<h2>Figures</h2>
<p>{agreement}</p>
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


def write_report(
    folder: Path,
    evaluation: Evaluation,
    table: pd.DataFrame,
    settings: dict[str, object],
    kl_divergences: dict[str, list[float]] | None = None,
) -> None:
    """Write ``comparison.csv``, ``comparison.json``, the four charts and ``report.html``, and
    given each candidate's teacher-forced KL divergence per position, their histogram."""
    metrics = {candidate.name: candidate.metrics for candidate in evaluation.candidates}
    comparison = pd.DataFrame(metrics)
    comparison.to_csv(folder / COMPARISON_CSV)
    (folder / COMPARISON_JSON).write_text(comparison.to_json(indent=2))
    per_category = table.groupby("category")[[f"{name}_exact_match" for name in metrics]].mean()
    charts_folder = folder / CHARTS_DIR
    charts_folder.mkdir()
    note = "random weights: these numbers mean nothing" if evaluation.random_weights else ""
    charts = [
        quality_chart(metrics, charts_folder / QUALITY_CHART, note=note),
        latency_chart({name: list(table[f"{name}_latency_s"]) for name in metrics},
                      charts_folder / LATENCY_CHART),
        speed_chart(metrics, charts_folder / SPEED_CHART),
        memory_chart(metrics, charts_folder / MEMORY_CHART),
    ]  # fmt: skip
    if kl_divergences:
        charts.append(kl_divergence_chart(kl_divergences, charts_folder / KL_DIVERGENCE_CHART))
    report = html_report(evaluation=evaluation, comparison=comparison,
                         per_category=per_category, settings=settings, charts=charts)  # fmt: skip
    (folder / REPORT_ARTIFACT).write_text(report, encoding="utf-8")
