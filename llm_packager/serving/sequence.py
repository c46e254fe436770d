"""One answer being generated, as the decoders and the decode loop hand it around."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from .requests import held_back


class Sequence:
    """One answer being generated: a prompt, its options, and where its text goes.

    ``report(index, event, value)`` receives, if ``streaming``, ``("delta", text)`` as text
    becomes safe to show; then ``("done", (text, tokens, finish_reason))`` or
    ``("error", exception)``. (Without streaming, the requester is not woken for every token.)
    """

    def __init__(self, index: int, ids: list[int], options: dict[str, Any],
                 report: Callable[[int, str, Any], None], owner: object,
                 streaming: bool) -> None:  # fmt: skip
        self.index, self.ids, self.options, self.report = index, ids, options, report
        self.owner, self.streaming = owner, streaming
        self.text, self.shown, self.produced = "", 0, 0
        self.finished: str | None = None
        self.cancelled = False
        self.stream = None
        self.rng = None  # the shared rows' sampler for this sequence
        self.seen = None  # the shared rows' mask of the tokens already in the sequence

    def search_key(self) -> tuple:
        """Sequences batched together by onnxruntime-genai's Generators must share this. A seed
        seeds a whole Generator, so a seeded sequence is batched only with itself: its samples
        stay what it gets alone, wherever it sits in its request."""
        options = self.options
        alone = id(self) if options["sampling"] and options["seed"] is not None else None
        return options["sampling"], options["temperature"], options["top_p"], options["seed"], alone

    def take(self, token: int, end_tokens: set[int]) -> None:
        """Add one generated token; report new safe text, and the answer once it is finished."""
        if token in end_tokens:
            self._finish("stop")
            return
        self.produced += 1
        self.text += self.stream.decode(token)
        stops = self.options["stop"]
        cut = min((self.text.find(stop) for stop in stops if stop in self.text), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            self._finish("stop")
        elif self.produced == self.options["max_tokens"]:
            self._finish("length")
        elif self.streaming:
            safe = len(self.text) - held_back(self.text, stops)
            if safe > self.shown:
                self.report(self.index, "delta", self.text[self.shown : safe])
                self.shown = safe

    def end_early(self) -> None:
        """The generator stopped (max length reached) before this sequence chose to."""
        if self.finished is None:
            self._finish("length" if self.produced >= self.options["max_tokens"] else "stop")

    def fail(self, error: BaseException) -> None:
        if self.finished is None:
            self.finished = "error"
            self.report(self.index, "error", error)

    def _finish(self, reason: str) -> None:
        self.finished = reason
        if self.streaming and len(self.text) > self.shown:
            self.report(self.index, "delta", self.text[self.shown :])
            self.shown = len(self.text)
        self.report(self.index, "done", (self.text, self.produced, reason))


class ReleasingStream:
    """A request's stream of chunks that gives its place in the decode loop back when it is
    closed or dropped, read or not. (A generator's ``finally`` runs only once it has started: a
    stream dropped before its first chunk would hold its rows until they finished.)"""

    def __init__(self, chunks: Iterator, release: Callable[[], None]) -> None:
        self._chunks, self._release = chunks, release

    def __iter__(self) -> ReleasingStream:
        return self

    def __next__(self):
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()
        self._release()

    def __del__(self) -> None:
        self.close()
