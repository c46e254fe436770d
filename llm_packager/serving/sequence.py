"""One answer being generated, as the decoders and the decode loop hand it around."""

from __future__ import annotations

from collections.abc import Callable
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

    def search_key(self) -> tuple:
        """Sequences batched together must share this. A seed seeds the whole batch, so a seeded
        request is batched only with itself: its samples stay what it gets alone."""
        options = self.options
        owner = id(self.owner) if options["sampling"] and options["seed"] is not None else None
        return options["sampling"], options["temperature"], options["top_p"], options["seed"], owner

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
