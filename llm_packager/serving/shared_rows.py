"""The decoder for CPU builds of the model builder's decoder: continuous batching on a key/value
cache the model owns, a row per sequence (see ``SharedRows``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from .sequence import Sequence

_logger = logging.getLogger(__name__)


class SharedRows:
    """Continuous batching on CPU: every sequence decoded in one batch whose rows come and go.

    An onnxruntime-genai Generator fixes its batch when it starts. Here the key/value cache is
    ours: one array per layer with a row per sequence, bound as both past and present, which is
    how the builder's GroupQueryAttention graphs share one buffer (each row's length comes from
    its attention mask, and a step writes each row's new entry at that row's own length). A new
    sequence is read in (prefill) into the next free row between two steps, and the step a
    sequence finishes, the last row moves into its place. Rows are kept contiguous, so a step
    binds the first ``len(sequences)`` rows of each array without copying.
    """

    def __init__(self, session, tokenizer, genai_config: dict[str, Any]) -> None:
        decoder = genai_config["model"]["decoder"]
        self._session, self._tokenizer = session, tokenizer
        self._layers = int(decoder["num_hidden_layers"])
        self._row_shape = (int(decoder["num_key_value_heads"]), int(decoder["head_size"]))
        inputs = {node.name: node.type for node in session.get_inputs()}
        self._cache_dtype = (
            np.float16 if "float16" in inputs["past_key_values.0.key"] else np.float32
        )
        self._ids_dtype = np.int32 if inputs["input_ids"] == "tensor(int32)" else np.int64
        self._context_length = int(genai_config["model"]["context_length"])
        self._top_k = int(genai_config.get("search", {}).get("top_k", 0))
        self.sequences: list[Sequence] = []
        self._lengths: list[int] = []  # tokens whose keys and values are in each row
        self._last: list[int] = []  # each row's newest token, not yet in the cache
        self._cache: list[np.ndarray] = []  # past_key_values.<layer>.key, .value, ...
        # A step binds the same rows as the step before unless a row came or went or the cache
        # was replaced, so its binding is kept: (cache generation, rows) and the binding.
        self._generation = 0
        self._step_binding: tuple[tuple[int, int], Any] | None = None

    @classmethod
    def open(
        cls, folder: Path, genai_config: dict[str, Any], tokenizer, threads: int
    ) -> SharedRows | None:
        """Rows over this build, or None (then onnxruntime-genai's Generators decode it) where it
        is not a CPU build whose only inputs are the token ids, the attention mask and the cache,
        or where the cache cannot be shared by past and present (a probe decode says so)."""
        import onnxruntime as ort

        decoder = genai_config["model"].get("decoder", {})
        if decoder.get("session_options", {}).get("provider_options"):
            return None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(
            str(folder / decoder["filename"]), options, providers=["CPUExecutionProvider"]
        )
        cache = [f"{layer}.{kind}" for layer in range(int(decoder["num_hidden_layers"]))
                 for kind in ("key", "value")]  # fmt: skip
        inputs = {node.name for node in session.get_inputs()}
        outputs = {node.name for node in session.get_outputs()}
        if inputs != {"input_ids", "attention_mask", *(f"past_key_values.{n}" for n in cache)}:
            return None
        if outputs != {"logits", *(f"present.{name}" for name in cache)}:
            return None
        rows = cls(session, tokenizer, genai_config)
        try:
            rows._probe()
        except Exception as error:  # e.g. an attention whose present outgrows its past
            _logger.warning("Decoding with onnxruntime-genai Generators: %s", error)
            return None
        return rows

    def _probe(self) -> None:
        """Read two tokens into one row, then decode one: the shapes a shared cache needs."""
        self._reserve(1, 3)
        rows = [array[:1] for array in self._cache]
        prompt = self._run(rows, np.zeros((1, 2), self._ids_dtype), np.ones((1, 2), np.int64))
        step = self._run(rows, np.zeros((1, 1), self._ids_dtype), np.ones((1, 3), np.int64))
        self._replace_cache([])
        if prompt.shape[:2] != (1, 2) or step.shape[:2] != (1, 1):
            raise ValueError(f"unexpected logits shapes {prompt.shape} and {step.shape}")

    def live(self) -> bool:
        return bool(self.sequences)

    def add(self, sequences: list[Sequence], end_tokens: set[int]) -> None:
        """Read the prompts into new rows, together, and take each one's first generated token."""
        first, lengths = len(self.sequences), [len(sequence.ids) for sequence in sequences]
        self._reserve(first + len(sequences), max(
            length + sequence.options["max_tokens"]
            for length, sequence in zip(lengths, sequences, strict=True)))  # fmt: skip
        # Padded on the right; the mask gives each row its own length, so the pad is never read.
        ids = np.zeros((len(sequences), max(lengths)), dtype=self._ids_dtype)
        mask = np.zeros(ids.shape, dtype=np.int64)
        for row, sequence in enumerate(sequences):
            ids[row, : lengths[row]], mask[row, : lengths[row]] = sequence.ids, 1
        # Read into a cache just as long as the prompts, then copied into the rows: attention over
        # a prompt costs in proportion to its buffer's length, not the prompt's (on the benchmark
        # proxy a 14-token prompt took 20 ms with a 96-token buffer, 55 ms with a 2048-token one).
        shape = (len(sequences), self._row_shape[0], ids.shape[1], self._row_shape[1])
        prompt_cache = [np.zeros(shape, self._cache_dtype) for _ in self._cache]
        logits = self._run(prompt_cache, ids, mask)
        for array, prompts in zip(self._cache, prompt_cache, strict=True):
            for row, length in enumerate(lengths):
                array[first + row, :, :length] = prompts[row, :, :length]
        for row, sequence in enumerate(sequences):
            seed = sequence.options["seed"]
            sequence.rng = np.random.default_rng(None if seed is None else [seed, sequence.index])
            sequence.stream = self._tokenizer.create_stream()
            self.sequences.append(sequence)
            self._lengths.append(lengths[row])
            self._last.append(self._choose(logits[row, lengths[row] - 1], sequence))
            sequence.take(self._last[-1], end_tokens)
        self._drop_finished()

    def step(self, end_tokens: set[int]) -> None:
        count = len(self.sequences)
        mask = np.zeros((count, max(self._lengths) + 1), dtype=np.int64)
        for row, length in enumerate(self._lengths):
            mask[row, : length + 1] = 1
        ids = np.array(self._last, dtype=self._ids_dtype).reshape(count, 1)
        key = (self._generation, count)
        if self._step_binding is None or self._step_binding[0] != key:
            self._step_binding = (key, self._bind([array[:count] for array in self._cache]))
        logits = self._execute(self._step_binding[1], ids, mask)
        for row, sequence in enumerate(self.sequences):
            self._lengths[row] += 1
            self._last[row] = self._choose(logits[row, -1], sequence)
            if sequence.finished is None and not sequence.cancelled:
                sequence.take(self._last[row], end_tokens)
        self._drop_finished()

    def fail_all(self) -> list[Sequence]:
        """Give up every row (a step failed): the sequences it held, for the caller to fail."""
        held, self.sequences, self._lengths, self._last = self.sequences, [], [], []
        self._replace_cache([])
        return held

    def _choose(self, logits: np.ndarray, sequence: Sequence) -> int:
        options = sequence.options
        if not options["sampling"]:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / options["temperature"]
        # The build's top_k (its genai_config's search options), then nucleus (top_p) sampling.
        keep = min(self._top_k or scaled.size, scaled.size)
        candidates = np.argpartition(-scaled, keep - 1)[:keep]
        candidates = candidates[np.argsort(-scaled[candidates], kind="stable")]
        weights = np.exp(scaled[candidates] - scaled[candidates[0]])
        cumulative = np.cumsum(weights) / weights.sum()
        kept = min(int(np.searchsorted(cumulative, options["top_p"])) + 1, len(weights))
        weights = weights[:kept]
        return int(candidates[sequence.rng.choice(kept, p=weights / weights.sum())])

    def _drop_finished(self) -> None:
        for row in range(len(self.sequences) - 1, -1, -1):
            sequence = self.sequences[row]
            if sequence.finished is None and not sequence.cancelled:
                continue
            last = len(self.sequences) - 1
            if row != last:
                for array in self._cache:
                    array[row] = array[last]
                self.sequences[row] = self.sequences[last]
                self._lengths[row], self._last[row] = self._lengths[last], self._last[last]
            del self.sequences[last], self._lengths[last], self._last[last]
        if not self.sequences:
            self._replace_cache([])  # nothing held while idle

    def _reserve(self, rows: int, length: int) -> None:
        """Grow the cache to hold ``rows`` rows of ``length`` tokens, keeping what it holds."""
        have_rows, have_length = self._cache[0].shape[::2] if self._cache else (0, 0)
        if rows <= have_rows and length <= have_length:
            return
        # Rounded up, so a burst of arrivals does not copy the cache at every one; no spare rows
        # for a lone request, whose cache is zeroed afresh each time (8 rows cost 5 ms a request).
        new_rows = max(rows, 2 * have_rows)
        new_length = min(max(length, have_length, -(-length // 256) * 256), self._context_length)
        heads, head_size = self._row_shape
        grown = []
        for index in range(2 * self._layers):
            array = np.zeros((new_rows, heads, new_length, head_size), dtype=self._cache_dtype)
            if self._cache:
                array[: len(self.sequences), :, :have_length] = self._cache[index][
                    : len(self.sequences)
                ]
            grown.append(array)
        self._replace_cache(grown)

    def _replace_cache(self, arrays: list[np.ndarray]) -> None:
        self._cache, self._generation, self._step_binding = arrays, self._generation + 1, None

    def _run(self, cache: list[np.ndarray], ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """One forward pass over ``cache`` (contiguous arrays, each bound as past and present)."""
        return self._execute(self._bind(cache), ids, mask)

    def _bind(self, cache: list[np.ndarray]):
        """An io_binding of ``cache`` as past and present, and of the logits (first, so the
        binding's first output; onnxruntime allocates them at every run)."""
        import onnxruntime as ort

        binding = self._session.io_binding()
        binding.bind_output("logits")
        for index, array in enumerate(cache):
            layer, kind = divmod(index, 2)
            suffix = f"{layer}.{('key', 'value')[kind]}"
            rows = ort.OrtValue.ortvalue_from_numpy(array)
            binding.bind_ortvalue_input(f"past_key_values.{suffix}", rows)
            binding.bind_ortvalue_output(f"present.{suffix}", rows)
        return binding

    def _execute(self, binding, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        self._session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()
