"""An OpenAI-compatible endpoint for a registered chat model (docs/openai.md).

Owns: OpenAI's chat-completions wire format: request checks, error objects, chunks and
server-sent events (`protocol`); the server, MLflow's scoring server with `/v1/chat/completions`
and `/v1/models` added (`app`); and the command line that loads a model and serves it
(`__main__`: ``python -m llm_packager.endpoint -m models:/<name>@champion``).

The top layer: nothing in the package imports it.

Public names:
- protocol: ENDPOINT_FIELDS, MAX_COMPLETION_TOKENS, DONE_EVENT, OpenAIError, bad_request,
  unknown_model, error_from_model, ChatRequest, parse_body, chat_request, served_completion,
  served_chunk, usage_chunk, completion_as_chunk, server_sent_event, models_list, model_card
- app: CHAT_COMPLETIONS_PATH, MODELS_PATH, TIMEOUT_MESSAGE, ChatBackend, build_app
- __main__: DEFAULT_PORT, DEFAULT_THREADS, DEFAULT_TIMEOUT_S, served_name_of, parser, main
"""
