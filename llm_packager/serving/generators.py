"""The decoder for builds the shared rows cannot decode (CUDA builds, ``batching: generators``):
onnxruntime-genai Generators, each a batch fixed when it starts."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime_genai as og

from .requests import RowFailedError
from .sequence import Sequence

# onnxruntime-genai refuses a Generator of more rows, on every device: "batch_size (48) must be in
# [1, 32]" (kMaxBatchSize in its src/generators.cpp). More sequences than this are more Generators.
GENERATOR_MAX_ROWS = 32


def right_padded(prompts: list[list[int]], pad_token: int) -> np.ndarray:
    """Prompts as one Generator's rows: padded on the right with the pad token, as
    Tokenizer.encode_batch does; onnxruntime-genai masks pad positions, so each answer equals the
    one its prompt gets alone."""
    rows = np.full((len(prompts), max(len(ids) for ids in prompts)), pad_token, dtype=np.int32)
    for row, ids in enumerate(prompts):
        rows[row, : len(ids)] = ids
    return rows


class GeneratorBatch:
    """Sequences decoded together by one onnxruntime-genai Generator."""

    def __init__(self, model, tokenizer, pad_token: int, sequences: list[Sequence]) -> None:
        self.sequences = sequences
        options = sequences[0].options
        prompts = right_padded([sequence.ids for sequence in sequences], pad_token)
        search: dict[str, Any] = {
            "max_length": prompts.shape[1] + max(s.options["max_tokens"] for s in sequences),
            "do_sample": options["sampling"],
            "batch_size": len(sequences),
        }
        if options["sampling"]:
            search |= {"temperature": options["temperature"], "top_p": options["top_p"]}
            if options["seed"] is not None:
                # A seeded sequence is a batch of its own (Sequence.search_key), seeded by the
                # request's seed and its choice's index, so its samples do not depend on where
                # it sits in its request.
                choice = options.get("choice", sequences[0].index)
                search["random_seed"] = (options["seed"] + 7919 * choice) % (2**31 - 1)
        generator_params = og.GeneratorParams(model)
        generator_params.set_search_options(**search)
        self.generator = og.Generator(model, generator_params)
        for sequence in sequences:
            sequence.stream = tokenizer.create_stream()
        self.generator.append_tokens(prompts)

    def live(self) -> bool:
        return any(sequence.finished is None and not sequence.cancelled
                   for sequence in self.sequences)  # fmt: skip

    def step(self, end_tokens: set[int]) -> None:
        if self.generator.is_done():
            for sequence in self.sequences:
                sequence.end_early()
            return
        self.generator.generate_next_token()
        for sequence, token in zip(self.sequences, self.generator.get_next_tokens(), strict=True):
            if sequence.finished is None and not sequence.cancelled:
                try:
                    sequence.take(int(token), end_tokens)
                except Exception as error:  # showing its text failed: this sequence alone
                    sequence.fail(RowFailedError(
                        "Generating this answer failed and it was stopped; the model's other "
                        f"answers go on. {type(error).__name__}: {error}"))  # fmt: skip
