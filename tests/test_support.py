"""The shared test helpers do what the tests rely on: the tracking-URI swap puts back exactly what
was there, even after an error, a loopback process that dies says why, with its log, and a copied
empty tracking store is the one MLflow would have made."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import mlflow
import pytest

from benchmarks.common import LoopbackProcess, local_server

from .support import MlflowServer, copy_tracking_store, tracking_uri


def test_the_tracking_uri_swap_restores_an_unset_uri_even_after_an_error(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(None)
    inside = f"sqlite:///{tmp_path / 'inside.db'}"
    with pytest.raises(RuntimeError, match="raised inside"), tracking_uri(inside):
        assert mlflow.get_tracking_uri() == inside
        # Child processes inherit the URI through the environment, as MLflow intends.
        assert os.environ["MLFLOW_TRACKING_URI"] == inside
        raise RuntimeError("raised inside")
    # Unset again, not pinned to whatever the default resolved to.
    assert "MLFLOW_TRACKING_URI" not in os.environ
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'later.db'}")
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path / 'later.db'}"


def test_the_tracking_uri_swap_keeps_a_uri_set_in_the_environment(tmp_path, monkeypatch):
    # As a test that monkeypatches the variable leaves it: set in the environment only.
    mlflow.set_tracking_uri(None)
    outer = f"sqlite:///{tmp_path / 'outer.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", outer)
    inner = f"sqlite:///{tmp_path / 'inner.db'}"
    with tracking_uri(inner):
        with tracking_uri(f"sqlite:///{tmp_path / 'innermost.db'}"):
            assert mlflow.get_tracking_uri().endswith("innermost.db")
        assert mlflow.get_tracking_uri() == os.environ["MLFLOW_TRACKING_URI"] == inner
    assert os.environ["MLFLOW_TRACKING_URI"] == outer
    assert mlflow.get_tracking_uri() == outer


def test_a_loopback_process_that_exits_fails_with_its_log(tmp_path):
    def command(port: int) -> list[str]:
        return [sys.executable, "-c", f"print('cannot listen on {port}'); raise SystemExit(3)"]

    server = LoopbackProcess(command, "/", log=tmp_path / "server.log", start_seconds=30)
    with pytest.raises(RuntimeError, match=rf"exited with code 3; its log:\ncannot listen on "
                                           rf"{server.port}"):  # fmt: skip
        server.start()


def test_a_local_server_answers_at_its_url_and_is_stopped_on_the_way_out(tmp_path):
    import urllib.request

    (tmp_path / "page.txt").write_text("served")

    def command(port: int) -> list[str]:
        return [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                "--directory", str(tmp_path)]  # fmt: skip

    with (
        local_server(command, "/page.txt", environment={}, start_seconds=30) as uri,
        urllib.request.urlopen(f"{uri}/page.txt", timeout=10) as response,
    ):
        assert response.read() == b"served"
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{uri}/page.txt", timeout=2)


def test_a_copied_tracking_store_is_the_store_mlflow_would_make_there(
    tmp_path, monkeypatch, empty_tracking_store
):
    import sqlite3
    from contextlib import closing

    def contents(store: Path) -> dict[str, list[tuple]]:
        with closing(sqlite3.connect(store)) as connection:
            tables = [name for (name,) in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]  # fmt: skip
            rows = {table: connection.execute(f'SELECT * FROM "{table}"').fetchall()
                    for table in tables}  # fmt: skip
        # The Default experiment's creation and update times are the only differences allowed.
        rows["experiments"] = [row[:3] for row in rows["experiments"]]
        return rows

    made, copied = tmp_path / "made", tmp_path / "copied"
    made.mkdir()
    copied.mkdir()
    monkeypatch.chdir(made)  # MLflow puts the Default experiment's artifacts under the cwd
    mlflow.MlflowClient(f"sqlite:///{made / 'mlflow.db'}").search_experiments()
    copy_tracking_store(empty_tracking_store, copied)
    expected = contents(made / "mlflow.db")
    expected["experiments"] = [
        (row[0], row[1], row[2].replace(str(made), str(copied))) for row in expected["experiments"]
    ]
    assert contents(copied / "mlflow.db") == expected
    assert expected["experiments"][0][2] == str(copied / "mlruns" / "0")


def test_a_server_started_on_a_copied_store_keeps_default_artifacts_where_it_keeps_others(
    tracking_server,
):
    # The session server's store is a copy (see MlflowServer); the server itself says where an
    # experiment's artifacts go when it makes one.
    client = mlflow.MlflowClient(tracking_server.uri)
    made = client.get_experiment(client.create_experiment("where-artifacts-go"))
    default = client.get_experiment("0")
    assert default.artifact_location == made.artifact_location.replace(
        f"/{made.experiment_id}", "/0"
    )
    assert default.artifact_location == MlflowServer.DEFAULT_ARTIFACTS
