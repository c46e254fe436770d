"""The logged models: how they are built, what they answer, where they are stored and registered.

Owns: the onnxruntime-genai model builder and the chat signature (`onnx_build`), a GGUF file's
quantized blocks carried into an int4 build as they are (`gguf_blocks`), the ONNX
models-from-code file (`onnx_chat_model`: the pyfunc class and `set_model`, nothing else), the
OpenAI chat-completion contract and the load-back check (`chat`), greedy decoding in both runtimes
(`parity`), pinned pip requirements (`requirements`), LoggedModels or run artifacts
and every search paged within the servers' limits (`model_store`), registry names and aliases,
and version tags standing for aliases where a registry has none (`registry`), and the measured
memory each step's processes hold, in copies of the weights (`memory_parts`).

Public names:
- onnx_build: OnnxBuildError, UnsupportedArchitectureError, PrebuiltMismatchError,
  RUNTIME_DISTRIBUTIONS, builder_architectures, check_builder_supports, check_prebuilt_matches,
  hf_architecture, builder_command, build_onnx_model, chat_signature
- gguf_blocks: BLOCK, SUMMARY_FILE, UnsupportedBlocksError, Blocks, ImportSummary, blocks_of,
  gguf_dequantized, unpermute_rows, gguf_weights, import_gguf_blocks
- chat: FINISH_REASONS, EXAMPLE_CHAT_REQUEST, CHECK_MAX_TOKENS, MalformedCompletionError,
  check_chat_completion, LoadBackCheck, LoadedModel, load_logged_model, load_back_and_answer
- parity: PARITY_CHATS, REFERENCE_SAMPLE_CHAT, chat_prompt_text, chat_token_ids,
  greedy_transformers, greedy_onnx, prefix_agreement
- requirements: pinned
- model_store: LOGGED_MODELS_PAGE_SIZE, RUNS_PAGE_SIZE, MODEL_VERSIONS_PAGE_SIZE, all_pages,
  has_status, server_has_logged_models, resolve_model_store, log_chat_model, pending_models,
  runs_left_logging, fail_abandoned_models
- onnx_chat_model: OnnxChatModel
- served_code: MODEL_CODE, SERVING_SOURCE, SERVED_PACKAGE, served_code_paths
- memory_parts: MIB, FLOAT32_BYTES, MemoryPart, StepMemory, LOG_TRANSFORMERS, BUILDER, AGREEMENT,
  ONNX_MODEL, TRANSFORMERS_MODEL, stored_bytes_per_parameter
- registry: UNITY_CATALOG_SCHEME, RegistryNameError, is_unity_catalog,
  check_registered_model_name, check_alias, existing_version, aliases_unsupported, set_alias,
  remove_alias, version_by_alias, alias_model_uri

Imports the root modules and `sources`; the served model's own code is in `serving`.
"""
