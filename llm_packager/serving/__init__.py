"""The served ONNX model's own code, logged with every ONNX model.

Owns: the keys the served model reads (its ONNX artifact, its model_config), request validation
and the errors a refused request gets, the sequence record (one answer being generated), the two
decoders (onnxruntime-genai Generators, and our shared key/value rows on onnxruntime), the
decode loop that owns them, and what the model does for MLflow's scoring server. The pyfunc class
that uses them is ``llm_packager/models/onnx_chat_model.py``.

This folder is logged beside that file as the top-level package ``llm_packager_serving`` (see
``llm_packager.models.served_code``), so it imports nothing from ``llm_packager``, only its own
modules, relatively: the model loads where the project is not installed. Nothing is imported here,
so the project's own imports of ``llm_packager.serving.keys`` stay light.

Public names:
- keys: ONNX_ARTIFACT_KEY, MODEL_NAME_KEY, MAX_NEW_TOKENS_KEY, DO_SAMPLE_KEY, TEMPERATURE_KEY,
  TOP_P_KEY, MAX_TOKENS_CAP_KEY, BATCHING_KEY, MAX_BATCH_SIZE_KEY, MAX_QUEUED_REQUESTS_KEY,
  BATCH_WAIT_MS_KEY, INTRA_OP_NUM_THREADS_KEY
- requests: ROLES, MAX_CHOICES, MIN_TEMPERATURE, MAX_TEMPERATURE, MAX_SEED, BadRequestError,
  RowFailedError, BusyError, present, number, request_rows, chat_messages, stop_strings, held_back
- sequence: Sequence, ReleasingStream
- generators: GENERATOR_MAX_ROWS, GeneratorBatch, right_padded
- shared_rows: CACHE_DTYPES, PROMPT_CHUNK_TOKENS, SharedRows, unsupported_search, row_failed
- scoring_server: REQUEST_TIMEOUT_VARIABLE, SPARE_THREADS, server_timeout, grow_server_threads
- decode_loop: DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_QUEUED_REQUESTS, DEFAULT_BATCH_WAIT_MS,
  LONE_CLIENT_SECONDS, usable_cores, DecodeLoop

Imports nothing of this package.
"""
