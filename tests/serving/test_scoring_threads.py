"""The served model gives the scoring server's event loop the threads batching needs, found the
way it must be under uvicorn with one worker: a loop that starts after the model loaded."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

from llm_packager.serving import scoring_server


def _pool_size(loop: asyncio.AbstractEventLoop) -> int | None:
    executor = getattr(loop, "_default_executor", None)
    return None if executor is None else executor._max_workers


def _pool_of_a_loop_started_after_the_scan() -> int | None:
    """As uvicorn 0.54 with one worker: the model loads (the scan starts looking), then the
    server's loop starts; its pool size once the scan found it, or after 5 s."""
    threading.Thread(target=scoring_server._when_the_loop_runs, args=(50, 10), daemon=True).start()

    async def serve_a_while() -> int | None:
        for _ in range(100):
            await asyncio.sleep(0.05)
            if _pool_size(asyncio.get_running_loop()) == 50:
                break
        return _pool_size(asyncio.get_running_loop())

    return asyncio.run(serve_a_while())


def test_a_loop_that_starts_later_on_the_main_thread_gets_the_threads():
    assert _pool_of_a_loop_started_after_the_scan() == 50


def test_a_server_that_gave_its_loop_more_threads_keeps_them():
    async def with_own_pool() -> tuple[int | None, int | None]:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(128))
        scoring_server._give_threads(loop, 50)
        smaller = _pool_size(loop)
        loop.set_default_executor(ThreadPoolExecutor(8))
        scoring_server._give_threads(loop, 50)
        return smaller, _pool_size(loop)

    assert asyncio.run(with_own_pool()) == (128, 50)


class _WarnsWhenTouched:
    """As torch's deprecated aliases (``torch.distributed.reduce_op``): reading ``__class__``
    warns, which this project's warning filters turn into an error. CI's run met one on the heap."""

    @property
    def __class__(self):
        import warnings

        warnings.warn("touched", FutureWarning, stacklevel=2)
        return _WarnsWhenTouched


def test_the_heap_scan_survives_objects_that_warn_when_touched():
    touchy = _WarnsWhenTouched()
    assert _pool_of_a_loop_started_after_the_scan() == 50
    del touchy
