"""The one thread per loaded model that owns every decoder call, and its defaults.

MLflow's scoring server calls ``predict`` from a thread pool, so concurrent requests reach one
instance at once, and on a CPU a step of several sequences costs far less than a step of each.
Here requests queue, are admitted into the running shared rows (``SharedRows``, which they join
between two steps) or into new Generator batches (``GeneratorBatch``, gathered for at most
``batch_wait_ms``), and get their answers back through their sequences. At most
``max_queued_requests`` requests wait; past that ``submit`` raises ``BusyError`` (HTTP 503).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable

from .generators import GENERATOR_MAX_ROWS, GeneratorBatch
from .requests import BusyError
from .sequence import Sequence
from .shared_rows import SharedRows

# Defaults of the model_config keys of the same names (keys.py).
DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_MAX_QUEUED_REQUESTS = 64
DEFAULT_BATCH_WAIT_MS = 20
LONE_CLIENT_SECONDS = 1.0
# An idle loop's thread ends after this long, and the next request starts a new one: a thread
# that waited for ever would hold the loop, and so the loaded model, alive after its last user
# dropped it (a batch job or Spark task that loads models one after another).
IDLE_THREAD_SECONDS = 30.0


def usable_cores() -> int:
    """The decoders' thread count unless the config sets one: the cores this process may run on,
    or fewer where ``OMP_NUM_THREADS`` says so.

    torch reads that variable too (``MKL_NUM_THREADS``, where set, wins there), so one setting
    bounds both runtimes. It is how a container with a CPU quota (whose affinity still lists
    every core of the host) or several model processes sharing a machine avoid oversubscribing
    the cores: with 2 processes of 2 threads each on 2 cores, onnxruntime's spinning thread
    pools decoded 25 tokens/s per process against 42 with 1 thread each (SmolLM2 int4, measured
    on the development machine). Spark sets it in its Python workers to ``spark.task.cpus``.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    # OpenMP also takes a list ("4,2", one count per nesting level); the first is the outer one.
    budget = os.environ.get("OMP_NUM_THREADS", "").split(",")[0]
    try:
        wanted = int(budget)
    except ValueError:  # unset, empty or not a number: no cap
        return cores
    return min(cores, wanted) if wanted > 0 else cores


class DecodeLoop:
    """The one thread that generates for every request to a loaded model (see the module's
    docstring for why)."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        end_tokens: set[int],
        pad_token: int,
        context_length: int,
        max_batch_size: int,
        max_queued_requests: int,
        gather_seconds: float,
        rows: SharedRows | None = None,
    ) -> None:
        self._model, self._tokenizer, self._rows = model, tokenizer, rows
        self._end_tokens, self._pad_token = end_tokens, pad_token
        self._context_length = context_length
        self._max_batch_size = max_batch_size
        # Generators: a batch cannot grow, so room is kept for a second one to start beside it.
        self._max_held = max_batch_size if rows else 2 * max_batch_size
        self._max_queued_requests = max_queued_requests
        self._gather_seconds = gather_seconds
        self._changed = threading.Condition()
        self._waiting: deque[tuple[float, list[Sequence]]] = deque()
        self._batches: list[GeneratorBatch] = []
        self._thread: threading.Thread | None = None
        self._in_flight = 0
        self._last_concurrent = -math.inf

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue one request's sequences; the caller calls ``release`` with them when done."""
        with self._changed:
            if len(self._waiting) >= self._max_queued_requests:
                raise BusyError(
                    f"The model is busy: {len(self._waiting)} requests are already waiting "
                    f"(max_queued_requests). Retry shortly."
                )
            self._in_flight += 1
            if self._in_flight > 1:
                self._last_concurrent = time.monotonic()
            self._waiting.append((time.monotonic(), sequences))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="onnx-decode-loop", daemon=True
                )
                self._thread.start()
            self._changed.notify()

    def release(self, sequences: list[Sequence]) -> None:
        """The request is answered, failed, or its client left: stop generating for it (its
        rows are given up at the end of the step under way). Releasing again does nothing."""
        with self._changed:
            if sequences and all(sequence.cancelled for sequence in sequences):
                return
            for sequence in sequences:
                sequence.cancelled = True
            self._in_flight -= 1
            # A request that leaves while it waits frees its place in the queue at once.
            self._waiting = deque(
                (arrived, waiting) for arrived, waiting in self._waiting
                if not all(sequence.cancelled for sequence in waiting)
            )  # fmt: skip

    def _wait_before_admitting(self) -> float | None:
        """Seconds until waiting requests should start (None: none wait; 0: now).

        A batch cannot grow once it runs, and on a CPU a step of 8 sequences yields about twice
        the tokens per second of a step of one (21 vs 5.5 ms on the benchmark proxy), so requests
        arriving a few milliseconds apart are worth gathering into one batch: they start once a
        full batch waits or the oldest has waited ``gather_seconds``, which bounds what this adds
        to the time to the first token. A lone client (no two requests in flight together for
        a second) never waits.
        """
        if not self._waiting:
            return None
        if self._rows is not None:
            return 0  # a request joins the running batch at the next step: nothing to gather
        full = min(self._max_batch_size, GENERATOR_MAX_ROWS)  # rows of one Generator
        if sum(len(sequences) for _, sequences in self._waiting) >= full:
            return 0
        if time.monotonic() - self._last_concurrent > LONE_CLIENT_SECONDS:
            return 0
        return max(0.0, self._waiting[0][0] + self._gather_seconds - time.monotonic())

    def _admit(self) -> list[Sequence]:
        """Take waiting requests in order while their sequences fit beside those held. A request
        with more sequences than fit (rows times ``n``) is taken in parts, as rows free up: the
        decoders never hold more than ``max_batch_size`` rows (Generators: two batches)."""
        held = sum(len(batch.sequences) for batch in self._batches)
        if self._rows is not None:
            held = self._rows.held()
        admitted: list[Sequence] = []
        while self._waiting and held < self._max_held:
            arrived, sequences = self._waiting[0]
            sequences = [sequence for sequence in sequences if not sequence.cancelled]
            room = self._max_held - held
            if len(sequences) > room:
                self._waiting[0] = (arrived, sequences[room:])
                sequences = sequences[:room]
            else:
                self._waiting.popleft()  # whole (or its client left while it waited)
            admitted.extend(sequences)
            held += len(sequences)
        return admitted

    def _new_batches(self, admitted: list[Sequence]) -> list[list[Sequence]]:
        groups: dict[tuple, list[Sequence]] = {}
        for sequence in admitted:
            groups.setdefault(sequence.search_key(), []).append(sequence)
        batches = []
        # A Generator holds at most GENERATOR_MAX_ROWS rows, whatever max_batch_size allows.
        rows = min(self._max_batch_size, GENERATOR_MAX_ROWS)
        for sequences in groups.values():
            for start in range(0, len(sequences), rows):
                chunk = sequences[start : start + rows]
                longest = max(len(sequence.ids) for sequence in chunk)
                if longest + max(s.options["max_tokens"] for s in chunk) > self._context_length:
                    # Padding to the longest prompt would pass the context length; one at a time,
                    # each sequence fits (checked when it was encoded).
                    batches.extend([sequence] for sequence in chunk)
                else:
                    batches.append(chunk)
        return batches

    def _run(self) -> None:
        try:
            while True:
                with self._changed:
                    while not self._busy() and (wait := self._wait_before_admitting()) != 0:
                        if wait is None and not self._changed.wait(IDLE_THREAD_SECONDS):
                            if not self._busy() and not self._waiting:
                                self._thread = None  # submit starts a new one
                                return
                        elif wait is not None:
                            self._changed.wait(wait)
                    admitted = self._admit() if self._wait_before_admitting() == 0 else []
                if self._rows is not None:
                    self._step_rows(admitted)
                    continue
                for sequences in self._new_batches(admitted):
                    self._guarded(sequences, lambda batch=sequences: self._start(batch))
                for batch in list(self._batches):
                    self._guarded(batch.sequences, lambda b=batch: b.step(self._end_tokens))
                with self._changed:
                    self._batches = [batch for batch in self._batches if batch.live()]
        except BaseException as error:  # the loop itself broke: no waiter may hang on it
            with self._changed:
                stranded = [s for batch in self._batches for s in batch.sequences]
                stranded += self._rows.fail_all() if self._rows is not None else []
                stranded += [s for _, sequences in self._waiting for s in sequences]
                self._batches, self._waiting = [], deque()
            for sequence in stranded:
                sequence.fail(error)
            raise

    def _busy(self) -> bool:
        return bool(self._batches) or (self._rows is not None and self._rows.live())

    def _step_rows(self, admitted: list[Sequence]) -> None:
        rows = self._rows
        if admitted:
            try:
                rows.add(admitted, self._end_tokens)
            except Exception:
                # Read again one by one, so that a prompt that fails fails only its own sequence.
                for sequence in admitted:
                    if not rows.holds(sequence) and sequence.finished is None:
                        self._guarded(
                            [sequence], lambda one=sequence: rows.add([one], self._end_tokens)
                        )
        if rows.live():
            try:
                rows.step(self._end_tokens)
            except Exception as error:
                # A failure of one row (its run, sampling or text) ends that row inside step;
                # what escapes is a fault of the step itself, which leaves no row it can trust.
                for sequence in rows.fail_all():
                    sequence.fail(error)

    def _start(self, sequences: list[Sequence]) -> None:
        # Reading the prompts (prefill) happens here, between two decode steps of the others.
        self._batches.append(
            GeneratorBatch(self._model, self._tokenizer, self._pad_token, sequences)
        )

    def _guarded(self, sequences: list[Sequence], action: Callable[[], None]) -> None:
        """Run ``action``; if onnxruntime-genai fails, only these sequences fail with it."""
        try:
            action()
        except Exception as error:  # handed to the requests it concerns, not the loop
            for sequence in sequences:
                sequence.fail(error)
            self._batches = [b for b in self._batches if b.sequences is not sequences]
