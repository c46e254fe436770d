"""The log_transformers step on the tiny model, logged to a throwaway SQLite store."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from llm_packager.config.compose import ConfigError, compose_config
from llm_packager.config.specs import LogTransformersParameters
from llm_packager.keys import MODEL_OUTPUT, MODEL_SIZE_BYTES_METRIC, OUTPUTS_TAG
from llm_packager.pipeline.reuse import output_exists, outputs_exist
from llm_packager.sources.manifest import ModelFilesError
from steps.fetch_model import fetch_model
from steps.log_transformers import (
    ChatTemplateMissingError,
    log_transformers,
)
from tests.support import local_fetch_parameters, project_environment


def _fetch(folder: Path) -> str:
    with mlflow.start_run() as run:
        fetch_model(local_fetch_parameters(folder), run.info.run_id)
    return run.info.run_id


def _log(fetch_run_id: str, **options) -> tuple[str, object]:
    with mlflow.start_run() as run:
        result = log_transformers(
            LogTransformersParameters(fetch_model_run_id=fetch_run_id, **options), run.info.run_id
        )
    return run.info.run_id, result


def _artifact_folder(client, run_id: str) -> Path:
    return Path(client.get_run(run_id).info.artifact_uri.removeprefix("file://"))


def test_logged_model_has_the_openai_chat_signature_and_answers(local_tracking, tiny_model_dir):
    run_id, result = _log(_fetch(tiny_model_dir), max_new_tokens=12)

    info = mlflow.models.get_model_info(result.model_uri)
    inputs = {spec.name for spec in info.signature.inputs}
    outputs = {spec.name for spec in info.signature.outputs}
    assert {"messages", "temperature", "max_tokens", "stop", "n", "stream"} <= inputs
    assert {"id", "object", "created", "model", "choices", "usage"} <= outputs
    assert info.flavors["transformers"]["inference_task"] == "llm/v1/chat"
    model_folder = Path(mlflow.artifacts.download_artifacts(result.model_uri))
    pins = (model_folder / "requirements.txt").read_text().split()
    assert "torch==2.13.0" in pins
    assert not any(pin.startswith("torchvision") for pin in pins)
    run = local_tracking.get_run(run_id)
    assert json.loads(run.data.tags[OUTPUTS_TAG]) == {MODEL_OUTPUT: result.model_uri}
    assert outputs_exist(local_tracking, run)
    assert not output_exists(local_tracking, "models:/m-00000000000000000000000000000000")
    assert run.data.metrics[MODEL_SIZE_BYTES_METRIC] == result.model_size_bytes > 800_000
    sample = json.loads(Path(mlflow.artifacts.download_artifacts(
        f"runs:/{run_id}/sample_completion.json")).read_text())  # fmt: skip
    assert sample["object"] == "chat.completion"


@pytest.mark.slow
def test_fresh_process_loads_by_uri_and_respects_max_tokens(
    local_tracking, tiny_model_dir, tmp_path
):
    _, result = _log(_fetch(tiny_model_dir))
    script = (
        "import json, sys, mlflow\n"
        "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "request = {'messages': [{'role': 'user', 'content': 'What is the capital of Spain?'}],"
        " 'max_tokens': 5}\n"
        "print(json.dumps(model.predict(request)[0]))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script, result.model_uri],
        env=project_environment(MLFLOW_TRACKING_URI=mlflow.get_tracking_uri()),
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    completion = json.loads(completed.stdout.strip().splitlines()[-1])
    assert completion["choices"][0]["message"]["role"] == "assistant"
    assert isinstance(completion["choices"][0]["message"]["content"], str)
    assert 1 <= completion["usage"]["completion_tokens"] <= 5
    assert completion["model"] == "tiny"


def test_tokenizer_without_chat_template_fails_before_logging(
    local_tracking, tiny_model_dir, tmp_path
):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "no-template")
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    fetch_run_id = _fetch(folder)

    with pytest.raises(
        ChatTemplateMissingError,
        match=rf"^The tokenizer of model 'tiny' \(fetch_model run {fetch_run_id}\) has no chat "
        "template",
    ):
        _log(fetch_run_id)
    assert mlflow.search_logged_models(output_format="list") == []


def _change_config(artifacts: Path) -> None:
    config = artifacts / "hf_model" / "config.json"
    config.write_text(config.read_text().replace("64", "66", 1))


# How a fetch_model run's artifacts were damaged, and what log_transformers says about it
# ({run} is the damaged run's id).
_DAMAGED_UPSTREAM = [
    pytest.param(lambda artifacts: shutil.rmtree(artifacts / "hf_model"),
                 r"^Upstream fetch_model run {run} has no usable hf_model \(.*\); "
                 "rerun it with -P force=fetch_model$",
                 id="missing-files"),
    pytest.param(lambda artifacts: (artifacts / "hf_model" / "tokenizer.json").unlink(),
                 r"^Upstream fetch_model run {run}: the logged model does not match its "
                 r"manifest: .* is missing 1 file\(s\), first: tokenizer\.json$",
                 id="a-file-missing"),
    pytest.param(_change_config,
                 r"^Upstream fetch_model run {run}: the logged model does not match its "
                 r"manifest: config\.json: sha256 does not match the manifest$",
                 id="changed-file"),
    pytest.param(lambda artifacts: (artifacts / "manifest.json").unlink(),
                 r"^Upstream fetch_model run {run} has no usable manifest\.json .*"
                 "rerun it with -P force=fetch_model$",
                 id="without-manifest"),
]  # fmt: skip


@pytest.mark.parametrize(("damage", "error"), _DAMAGED_UPSTREAM)
def test_a_damaged_upstream_run_is_named(local_tracking, tiny_model_dir, damage, error):
    fetch_run_id = _fetch(tiny_model_dir)
    damage(_artifact_folder(local_tracking, fetch_run_id))
    with pytest.raises(ModelFilesError, match=error.format(run=fetch_run_id)):
        _log(fetch_run_id)


def test_cached_copy_is_reused_only_while_it_verifies(local_tracking, tiny_model_dir, tmp_path):
    from llm_packager.sources.upstream import cache_root, fetched_model

    fetch_run_id = _fetch(tiny_model_dir)
    first = fetched_model(fetch_run_id).folder
    assert first.parent == cache_root() / "models"
    (first / "config.json").write_text("{}")
    second = fetched_model(fetch_run_id).folder
    assert second == first
    assert json.loads((second / "config.json").read_text())["hidden_size"] == 64


def test_reference_logging_needs_a_hub_model(local_tracking, tiny_model_dir):
    fetch_run_id = _fetch(tiny_model_dir)
    with pytest.raises(
        ValueError, match=r"^save_pretrained=false needs a model fetched from the Hub"
    ):
        _log(fetch_run_id, save_pretrained=False)


def test_unknown_generation_option_is_named():
    with pytest.raises(
        ConfigError, match=r"^Unknown config key 'transformers\.beams' in overrides"
    ):
        compose_config("tiny-random-phi3", "transformers.beams=4")
    with pytest.raises(ConfigError, match=r"^Invalid config at 'transformers\.beams'"):
        compose_config("tiny-random-phi3", "+transformers.beams=4")


def test_bad_generation_values_and_reference_without_hub_are_named():
    with pytest.raises(ConfigError, match=r"^transformers\.max_new_tokens must be at least 1$"):
        compose_config("tiny-random-phi3", "transformers.max_new_tokens=0")
    with pytest.raises(
        ConfigError, match=r"^transformers\.save_pretrained=false .* needs model\.source=hub"
    ):
        compose_config("tiny-random-phi3", "transformers.save_pretrained=false")
