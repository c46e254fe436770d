"""The decoder for CPU builds of the model builder's decoder: continuous batching on a key/value
cache the model owns, a row per sequence (see ``SharedRows``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from .requests import RowFailedError
from .sequence import Sequence

_logger = logging.getLogger(__name__)

# The cache's element type for each type the graph's past_key_values take; bfloat16, which numpy
# lacks, is left to onnxruntime-genai's Generators.
CACHE_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


# A prompt longer than this is read this many tokens per step while answers are decoding, so a
# running stream waits for a chunk between two tokens, not for the whole prompt
# (``python -m benchmarks.prompt_gap`` measures the longest wait).
PROMPT_CHUNK_TOKENS = 256


def unsupported_search(search: dict[str, Any]) -> str | None:
    """What in a build's search section the shared rows do not do as onnxruntime-genai does, or
    None. They apply top_k and the repetition penalty; beams, a minimum length and banned
    n-grams are left to onnxruntime-genai, so that both decoders give one answer."""
    if int(search.get("num_beams", 1)) > 1:
        return f"num_beams is {search['num_beams']}"
    if int(search.get("min_length", 0)) > 0:
        return f"min_length is {search['min_length']}"
    if int(search.get("no_repeat_ngram_size", 0)) > 0:
        return f"no_repeat_ngram_size is {search['no_repeat_ngram_size']}"
    return None


def row_failed(error: BaseException) -> RowFailedError:
    return RowFailedError(
        f"Generating this answer failed and it was stopped; the model's other answers go on. "
        f"{type(error).__name__}: {error}"
    )


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

    def __init__(self, session, tokenizer, genai_config: dict[str, Any], cache_dtype,
                 max_rows: int) -> None:  # fmt: skip
        decoder = genai_config["model"]["decoder"]
        self._session, self._tokenizer = session, tokenizer
        self._layers = int(decoder["num_hidden_layers"])
        self._row_shape = (int(decoder["num_key_value_heads"]), int(decoder["head_size"]))
        self._cache_dtype, self._max_rows = cache_dtype, max_rows
        inputs = {node.name: node.type for node in session.get_inputs()}
        self._ids_dtype = np.int32 if inputs["input_ids"] == "tensor(int32)" else np.int64
        self._context_length = int(genai_config["model"]["context_length"])
        self._vocab_size = int(genai_config["model"]["vocab_size"])
        # The generation settings onnxruntime-genai takes from the build's search section, so
        # that both decoders give one answer (``open`` refuses builds that use others).
        search = genai_config.get("search", {})
        self._top_k = int(search.get("top_k", 0))
        self._repetition_penalty = np.float32(search.get("repetition_penalty", 1.0))
        self.sequences: list[Sequence] = []
        # Kept in step with ``sequences`` (only _append_row and _drop_finished change their
        # lengths): tokens whose keys and values are in each row, and each row's newest token,
        # not yet in the cache.
        self._lengths: list[int] = []
        self._last: list[int] = []
        self._cache: list[np.ndarray] = []  # past_key_values.<layer>.key, .value, ...
        # Long prompts being read a chunk per step: [sequence, its own cache, tokens read].
        self._reading: list[list] = []
        self.prompt_chunk_tokens = PROMPT_CHUNK_TOKENS
        # A step binds the same rows as the step before unless a row came or went or the cache
        # was replaced, so its binding is kept: (cache generation, rows) and the binding.
        self._generation = 0
        self._step_binding: tuple[tuple[int, int], Any] | None = None

    @classmethod
    def open(
        cls, folder: Path, genai_config: dict[str, Any], tokenizer, threads: int,
        max_rows: int = 8,
    ) -> SharedRows | None:  # fmt: skip
        """Rows over this build, or None (then onnxruntime-genai's Generators decode it) where it
        is not a CPU build whose only inputs are the token ids, the attention mask and a float32
        or float16 cache, where its search section asks for what the rows do not do (see
        ``unsupported_search``), or where the cache cannot be shared by past and present (a probe
        decode says so). At most ``max_rows`` rows are ever held."""
        import onnxruntime as ort

        decoder = genai_config["model"].get("decoder", {})
        if decoder.get("session_options", {}).get("provider_options"):
            return None
        if reason := unsupported_search(genai_config.get("search", {})):
            _logger.warning("Decoding with onnxruntime-genai Generators: the build's %s", reason)
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
        cache_dtype = CACHE_DTYPES.get(
            next(node.type for node in session.get_inputs() if node.name.startswith("past_"))
        )
        if cache_dtype is None:  # bfloat16: numpy has no such type to hold the cache in
            return None
        rows = cls(session, tokenizer, genai_config, cache_dtype, max_rows)
        try:
            rows._probe()
        except Exception as error:  # e.g. an attention whose present outgrows its past
            _logger.warning("Decoding with onnxruntime-genai Generators: %s", error)
            return None
        return rows

    def _probe(self) -> None:
        """Read two tokens into one row, then decode one, and compare that step's logits with the
        same three tokens read at once into a cache of their own: a shared cache that the graph
        does not read as we bind it would give other logits (or other shapes)."""
        self._reserve(1, 3)
        rows = [array[:1] for array in self._cache]
        ids = np.array([[1, 2, 3]], dtype=self._ids_dtype) % self._vocab_size
        prompt = self._run(rows, ids[:, :2], np.ones((1, 2), np.int64))
        step = self._run(rows, ids[:, 2:], np.ones((1, 3), np.int64))
        self._replace_cache([])
        alone = [np.zeros((1, *self._row_shape[:1], 3, self._row_shape[1]), self._cache_dtype)
                 for _ in range(2 * self._layers)]  # fmt: skip
        whole = self._run(alone, ids, np.ones((1, 3), np.int64))
        if prompt.shape[:2] != (1, 2) or step.shape[:2] != (1, 1):
            raise ValueError(f"unexpected logits shapes {prompt.shape} and {step.shape}")
        expected, got = whole[0, -1].astype(np.float32), step[0, -1].astype(np.float32)
        # Loose enough for quantised activations (int4 builds' accuracy_level), far tighter than
        # logits read without the first two tokens.
        gap = float(np.abs(expected - got).max())
        if not gap <= 0.05 * (float(np.abs(expected).max()) + 1):
            raise ValueError(f"a step on the shared cache gives other logits (off by {gap:.3g})")

    def live(self) -> bool:
        return bool(self.sequences or self._reading)

    def held(self) -> int:
        """Sequences that hold or will hold a row: those decoding and those being read."""
        return len(self.sequences) + len(self._reading)

    def holds(self, sequence: Sequence) -> bool:
        return sequence in self.sequences or any(entry[0] is sequence for entry in self._reading)

    def add(self, sequences: list[Sequence], end_tokens: set[int]) -> None:
        """Read the prompts into new rows, together, and take each one's first generated token.
        A prompt longer than ``prompt_chunk_tokens`` is read a chunk per step instead (``step``),
        so that the running answers keep flowing while it is read.

        A run that fails raises, holding no new row (the caller reads them again one by one); a
        sequence whose first token cannot be chosen or shown fails alone."""
        heads, head_size = self._row_shape
        for sequence in sequences:
            if len(sequence.ids) > self.prompt_chunk_tokens:
                cache = [np.zeros((1, heads, len(sequence.ids), head_size), self._cache_dtype)
                         for _ in range(2 * self._layers)]  # fmt: skip
                self._reading.append([sequence, cache, 0])
        sequences = [s for s in sequences if len(s.ids) <= self.prompt_chunk_tokens]
        if not sequences:
            return
        lengths = [len(sequence.ids) for sequence in sequences]
        self._reserve(len(self.sequences) + len(sequences), max(
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
        shape = (len(sequences), heads, ids.shape[1], head_size)
        prompt_cache = [np.zeros(shape, self._cache_dtype) for _ in self._cache]
        logits = self._run(prompt_cache, ids, mask)
        for row, sequence in enumerate(sequences):
            self._start(sequence, logits[row, lengths[row] - 1], lengths[row],
                        [part[row] for part in prompt_cache], end_tokens)  # fmt: skip
        self._drop_finished()

    def _start(self, sequence: Sequence, logits: np.ndarray, length: int,
               prompt: list[np.ndarray], end_tokens: set[int]) -> None:  # fmt: skip
        """A sequence whose prompt is read takes a row and its first token."""
        try:
            seed = sequence.options["seed"]
            # Seeded by the request's seed and the choice's index within its row, not by the
            # row's place in its request or in the batch: a row's samples are its own.
            choice = sequence.options.get("choice", sequence.index)
            sequence.rng = np.random.default_rng(None if seed is None else [seed, choice])
            sequence.stream = self._tokenizer.create_stream()
            sequence.seen = np.zeros(self._vocab_size, dtype=bool)
            sequence.seen[np.asarray(sequence.ids) % self._vocab_size] = True
            token = self._choose(logits, sequence)
        except Exception as error:  # this sequence alone; it never held a row
            sequence.fail(row_failed(error))
            return
        self._append_row(sequence, length, token, prompt)
        self._take(len(self.sequences) - 1, end_tokens)

    def _read_chunk(self, end_tokens: set[int]) -> None:
        """Read the next chunk of the oldest prompt being read (all of it when no answer is
        decoding: nobody waits); once it is read, it takes a row. GroupQueryAttention reads a
        chunk after the cache of the chunks before it as it reads a whole prompt (the same
        logits, checked on SmolLM2)."""
        if not self._reading:
            return
        entry = self._reading[0]
        sequence, cache, done = entry
        total = len(sequence.ids)
        if sequence.cancelled or sequence.finished is not None:
            self._reading.pop(0)
            return
        end = min(total, done + self.prompt_chunk_tokens) if self.sequences else total
        ids = np.asarray(sequence.ids[done:end], dtype=self._ids_dtype).reshape(1, -1)
        try:
            logits = self._run(cache, ids, np.ones((1, end), np.int64))
        except Exception as error:  # its own run: it fails alone
            self._reading.pop(0)
            sequence.fail(row_failed(error))
            return
        entry[2] = end
        if end < total:
            return
        self._reading.pop(0)
        self._reserve(len(self.sequences) + 1, total + sequence.options["max_tokens"])
        self._start(sequence, logits[0, -1], total, [part[0] for part in cache], end_tokens)
        self._drop_finished()

    def step(self, end_tokens: set[int]) -> None:
        """Decode one token for every row, then read a chunk of a long prompt, if one waits."""
        if self.sequences:
            self._decode(end_tokens)
        self._read_chunk(end_tokens)

    def _decode(self, end_tokens: set[int]) -> None:
        """One token for every row. A run that fails is run again row by row, so that a row
        that fails alone ends alone and the others take their tokens from their own runs."""
        count = len(self.sequences)
        mask = np.zeros((count, max(self._lengths) + 1), dtype=np.int64)
        for row, length in enumerate(self._lengths):
            mask[row, : length + 1] = 1
        ids = np.array(self._last, dtype=self._ids_dtype).reshape(count, 1)
        key = (self._generation, count)
        if self._step_binding is None or self._step_binding[0] != key:
            self._step_binding = (key, self._bind([array[:count] for array in self._cache]))
        failures: dict[int, Exception] = {}
        try:
            logits = self._execute(self._step_binding[1], ids, mask)[:, -1]
        except Exception as error:
            _logger.warning("A step of %d rows failed (%s); running them one by one", count, error)
            logits, failures = self._rows_one_by_one(ids, mask)
        for row, sequence in enumerate(self.sequences):
            if row in failures:
                sequence.fail(row_failed(failures[row]))
                continue
            self._lengths[row] += 1  # the run wrote its token's keys and values
            try:
                self._last[row] = self._choose(logits[row], sequence)
            except Exception as error:
                sequence.fail(row_failed(error))
                continue
            self._take(row, end_tokens)
        self._drop_finished()

    def fail_all(self) -> list[Sequence]:
        """Give up every row (the loop itself broke): the sequences it held, for the caller to
        fail."""
        held, self.sequences, self._lengths, self._last = self.sequences, [], [], []
        held += [entry[0] for entry in self._reading]
        self._reading = []
        self._replace_cache([])
        return held

    def _rows_one_by_one(self, ids: np.ndarray, mask: np.ndarray) -> tuple[dict, dict]:
        """Each row's logits from a run of its own (its cache row is a contiguous slice, so
        nothing is copied), and the error of each row whose run failed. A run rewrites only its
        row's entry at its length, so running a row again after a failed step is safe."""
        logits: dict[int, np.ndarray] = {}
        failures: dict[int, Exception] = {}
        for row, length in enumerate(self._lengths):
            try:
                binding = self._bind([array[row : row + 1] for array in self._cache])
                logits[row] = self._execute(binding, ids[row : row + 1],
                                            mask[row : row + 1, : length + 1])[0, -1]  # fmt: skip
            except Exception as error:
                failures[row] = error
        return logits, failures

    def _take(self, row: int, end_tokens: set[int]) -> None:
        """Hand a row's newest token to its sequence; a failure to show it fails it alone."""
        sequence = self.sequences[row]
        if sequence.finished is not None or sequence.cancelled:
            return
        try:
            sequence.seen[self._last[row] % self._vocab_size] = True
            sequence.take(self._last[row], end_tokens)
        except Exception as error:
            sequence.fail(row_failed(error))

    def _choose(self, logits: np.ndarray, sequence: Sequence) -> int:
        options = sequence.options
        if self._repetition_penalty != 1:
            # onnxruntime-genai's repetition penalty: every token already in the sequence
            # (prompt and answer) has its score divided by the penalty, or multiplied where it is
            # negative, in float32 as there.
            logits = logits.astype(np.float32)
            seen = logits[sequence.seen]
            logits[sequence.seen] = np.where(
                seen < 0, seen * self._repetition_penalty, seen / self._repetition_penalty
            )
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

    def _append_row(self, sequence: Sequence, length: int, token: int,
                    prompt: list[np.ndarray]) -> None:  # fmt: skip
        """A new row after the last: its prompt's keys and values, and its bookkeeping."""
        row = len(self.sequences)
        for array, part in zip(self._cache, prompt, strict=True):
            array[row, :, :length] = part[:, :length]
        self.sequences.append(sequence)
        self._lengths.append(length)
        self._last.append(token)

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
        """Grow the cache to hold ``rows`` rows of ``length`` tokens, keeping what it holds.

        Never past ``max_rows`` rows (the decode loop admits no more), and one layer at a time,
        so that growing holds the old cache plus one new layer, not two whole copies."""
        if rows > self._max_rows:
            raise ValueError(f"{rows} rows asked for; at most {self._max_rows} are held")
        have_rows, have_length = self._cache[0].shape[::2] if self._cache else (0, 0)
        if rows <= have_rows and length <= have_length:
            return
        # Rounded up, so a burst of arrivals does not copy the cache at every one; no spare rows
        # for a lone request, whose cache is zeroed afresh each time (8 rows cost 5 ms a request).
        new_rows = min(max(rows, 2 * have_rows), self._max_rows)
        new_length = min(max(length, have_length, -(-length // 256) * 256), self._context_length)
        heads, head_size = self._row_shape
        arrays, held = self._cache, len(self.sequences)
        self._replace_cache([])
        for index in range(2 * self._layers):
            array = np.zeros((new_rows, heads, new_length, head_size), dtype=self._cache_dtype)
            if arrays:
                array[:held, :, :have_length] = arrays[index][:held]
                arrays[index] = None  # the old layer goes as its copy arrives
            self._cache.append(array)

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
