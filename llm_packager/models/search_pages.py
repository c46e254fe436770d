"""Every search the pipeline makes, one page at a time within the tracking server's limits.

A server may refuse a ``max_results`` above its documented maximum outright (Databricks answers
``400 INVALID_PARAMETER_VALUE``) instead of returning fewer results, so each search asks for at
most its page size here and follows the page token. The page sizes are the smallest maximum of
the servers the pipeline is deployed to (Databricks' REST reference, MLflow's own server); see
docs/operations.md ("Search limits and paging") for the sources.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

# Databricks, Search Logged Models: "The maximum limit is 50".
LOGGED_MODELS_PAGE_SIZE = 50
# Databricks, Search Runs: "Max threshold is 50000"; MLflow's default page (1000) is well within.
RUNS_PAGE_SIZE = 1000
# Databricks, Search Model Versions: at most 10000; Unity Catalog lists at most 1000 a page.
MODEL_VERSIONS_PAGE_SIZE = 1000


def all_pages(search: Callable[..., Any], page_size: int, **arguments: Any) -> Iterator[Any]:
    """Every result of ``search(**arguments)`` (an MlflowClient search method returning a
    PagedList), asking for ``page_size`` at a time and following the page token to the end."""
    token = None
    while True:
        page = search(**arguments, max_results=page_size, page_token=token)
        yield from page
        token = page.token
        if not token:
            return
