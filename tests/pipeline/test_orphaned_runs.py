"""Runs left RUNNING by a gone process: found by the server's own status filter where it has one,
so a start does not list the host's whole history."""

from __future__ import annotations

import socket

from llm_packager.keys import HOST_TAG, PID_TAG
from llm_packager.pipeline.step_run import fail_orphaned_runs


def _run(client, experiment: str, status: str, pid: str) -> str:
    run = client.create_run(experiment, tags={HOST_TAG: socket.gethostname(), PID_TAG: pid})
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status=status)
    return run.info.run_id


def test_the_search_for_orphans_filters_on_status_where_the_server_can(local_tracking):
    experiment = local_tracking.create_experiment("orphans")
    history = [_run(local_tracking, experiment, "FINISHED", "999999999") for _ in range(3)]
    orphan = _run(local_tracking, experiment, "RUNNING", "999999999")
    searches: list[tuple[str, list[str]]] = []
    search_runs = local_tracking.search_runs

    def counting_search(*arguments, **keywords):
        found = search_runs(*arguments, **keywords)
        searches.append((keywords["filter_string"], [run.info.run_id for run in found]))
        return found

    local_tracking.search_runs = counting_search
    assert fail_orphaned_runs(local_tracking, experiment) == [orphan]
    (filter_string, listed), *more = searches
    assert not more
    assert "attributes.status = 'RUNNING'" in filter_string
    # The finished history never left the server.
    assert listed == [orphan] and not set(history) & set(listed)
    assert local_tracking.get_run(orphan).info.status == "FAILED"
