"""Run every benchmark on this machine's CPU and write the figures as JSON and as a Markdown table.

- model speed: transformers fp32, onnxruntime-genai int4 (raw and through our pyfunc) on the
  ~170 M-parameter proxy, each against its memory-bandwidth bound; batch of 8 against 8 calls;
- pipeline: cold and warm ``main`` on the tiny model, each step's overhead, artifact bytes;
- serving: the pyfunc with 1, 4, 8 and 16 concurrent clients, whole (``mlflow models serve``) and
  streamed (``predict_stream``).

``--quick`` takes fewer repeats and shorter answers and finishes in under 5 minutes here; the
full run takes about 10. Nothing else should run meanwhile: the figures are wall-clock times.

Usage: ``python -m benchmarks.run_all [--quick] [--out benchmarks/results]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks import model_speed, pipeline, serving
from benchmarks.common import PROJECT_DIR, machine_description

FULL = {"new_tokens": 64, "repeats": 5, "pipeline_repeats": 3,
        "stores": ("embedded", "server", "server-run-artifacts"),
        "requests_per_client": 4, "serving_repeats": 3}  # fmt: skip
QUICK = {"new_tokens": 32, "repeats": 2, "pipeline_repeats": 1, "stores": ("embedded",),
         "requests_per_client": 2, "serving_repeats": 1}  # fmt: skip


def _machine_markdown(machine: dict[str, object]) -> str:
    versions = ", ".join(f"{name} {version}" for name, version in machine["versions"].items())
    return (
        f"Taken {machine['date']} at commit {machine['git_commit']} on {machine['cpu']} "
        f"({machine['cores']} cores, {machine['memory_gib']} GiB, no GPU), {machine['os']}, "
        f"Python {machine['python']}; {versions}."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats; under 5 minutes")
    parser.add_argument("--out", type=Path, default=PROJECT_DIR / "benchmarks" / "results")
    arguments = parser.parse_args()
    settings = QUICK if arguments.quick else FULL
    started = time.perf_counter()
    speed = model_speed.measure(settings["new_tokens"], settings["repeats"])
    pipelines = [
        pipeline.measure(settings["pipeline_repeats"], store) for store in settings["stores"]
    ]
    served = serving.measure(
        settings["requests_per_client"],
        (settings["new_tokens"] // 2,),
        settings["serving_repeats"],
    )
    machine = machine_description()
    figures = {
        "machine": machine,
        "mode": "quick" if arguments.quick else "full",
        "seconds": time.perf_counter() - started,
        "model_speed": speed,
        "pipeline": pipelines,
        "serving": served,
    }
    sections = [
        f"# Benchmarks ({figures['mode']})",
        _machine_markdown(machine),
        "## Model speed",
        model_speed.markdown(speed),
        "## Pipeline",
        *[pipeline.markdown(figures) for figures in pipelines],
        "## Serving",
        serving.markdown(served),
        f"All benchmarks took {figures['seconds'] / 60:.1f} minutes.",
    ]
    arguments.out.mkdir(parents=True, exist_ok=True)
    (arguments.out / "results.json").write_text(json.dumps(figures, indent=2))
    (arguments.out / "results.md").write_text("\n\n".join(sections) + "\n")
    print("\n\n".join(sections))
    print(f"\nwrote {arguments.out / 'results.json'} and {arguments.out / 'results.md'}",
          file=sys.stderr)  # fmt: skip


if __name__ == "__main__":
    main()
