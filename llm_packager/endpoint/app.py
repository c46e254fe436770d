"""The OpenAI-compatible server: MLflow's own scoring server with OpenAI's routes added.

`build_app` starts from `mlflow.pyfunc.scoring_server.init`, so `/invocations`, `/ping`,
`/health`, `/version` and its request timeout stay exactly MLflow's, and adds
`POST /v1/chat/completions` (whole, or streamed as server-sent events ending in
``data: [DONE]``) and `GET /v1/models`. It uses only the loaded model's public pyfunc interface:
`predict`, `predict_stream` where the model's MLmodel says it streams, and its signature.

Every model call runs on the executor it is given, one call per thread, so concurrent requests
reach the model at once (the ONNX model batches them); a stream holds a thread only while it
waits for its next chunk. A stream whose client goes away is closed, which tells the model to
give up its row.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

# Imported here, not inside build_app: FastAPI reads the routes' annotations by name from this
# module's globals (a `Request` it cannot resolve becomes a required query parameter).
from fastapi import Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from .protocol import (
    DONE_EVENT,
    ChatRequest,
    OpenAIError,
    chat_request,
    completion_as_chunk,
    error_from_model,
    model_card,
    models_list,
    parse_body,
    served_chunk,
    served_completion,
    server_sent_event,
    unknown_model,
    usage_chunk,
)

CHAT_COMPLETIONS_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
_OPENAI_PREFIX = "/v1/"
# What a model accepts when it was logged without a signature: OpenAI's chat fields that both
# of this project's flavors read.
_UNSIGNED_FIELDS = frozenset({"messages", "max_tokens", "temperature", "top_p", "n", "stop"})
_END = object()


class ChatBackend:
    """A loaded pyfunc chat model, called the way this endpoint needs."""

    def __init__(self, model: Any) -> None:
        self.model = model
        # MLflow reads the same flag when it loads a model (`streamable` in the MLmodel's
        # python_function flavor); without it, `predict_stream` refuses to run.
        flavor = model.metadata.flavors.get("python_function", {})
        self.streams = bool(flavor.get("streamable"))
        schema = model.metadata.get_input_schema()
        names = schema.input_names() if schema is not None else []
        self.accepted = frozenset(name for name in names if isinstance(name, str))
        if not self.accepted:
            self.accepted = _UNSIGNED_FIELDS

    def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        """The model's chat completion for one request."""
        answer = self.model.predict(request)
        return answer[0] if isinstance(answer, list) else answer

    def stream(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The model's chunks for one request; one chunk holding the whole completion when the
        model cannot stream."""
        if self.streams:
            return self.model.predict_stream(request)
        return iter([completion_as_chunk(self.complete(request))])


TIMEOUT_MESSAGE = "Request processing time exceeded the server's --timeout."


def _close_after(
    chunks: Iterator[Any], pending: concurrent.futures.Future | None, context: contextvars.Context
) -> None:
    # A generator cannot be closed while another thread is inside it: wait for the chunk being
    # made, then close it, which runs the model's cleanup (its row is given up).
    if pending is not None:
        concurrent.futures.wait([pending])
    close = getattr(chunks, "close", None)
    if close is not None:
        context.run(close)


def build_app(
    model: Any,
    served_name: str,
    executor: concurrent.futures.ThreadPoolExecutor,
    *,
    created: int | None = None,
):
    """MLflow's scoring server for ``model`` with the OpenAI routes added.

    Args:
        model: a loaded `mlflow.pyfunc.PyFuncModel` answering OpenAI chat requests.
        served_name: the model's id on `/v1/models`; a request naming another model gets 404.
        executor: where model calls run, one per thread.
        created: the Unix time `/v1/models` reports (now, by default).
    """
    from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
    from mlflow.pyfunc import scoring_server

    backend = ChatBackend(model)
    # Read as MLflow's scoring server reads it, when the app is built.
    timeout_s = MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get()
    created = int(time.time()) if created is None else created
    app = scoring_server.init(model)

    def error_response(error: OpenAIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    async def call_model(function: Callable[..., Any], *arguments: Any) -> Any:
        try:
            return await asyncio.wrap_future(executor.submit(function, *arguments))
        except Exception as error:
            raise error_from_model(error) from error

    async def events(
        chunks: Iterator[dict[str, Any]],
        first: Any,
        chat: ChatRequest,
        context: contextvars.Context,
        deadline: float,
    ) -> AsyncIterator[bytes]:
        usage, last, pending = None, None, None
        try:
            chunk = first
            while chunk is not _END:
                served, chunk_usage = served_chunk(chunk, served_name)
                usage, last = chunk_usage or usage, served
                yield server_sent_event(served)
                pending = executor.submit(context.run, next, chunks, _END)
                waiting = asyncio.wrap_future(pending)
                # MLflow's timeout stops at the status line; the rest of a stream keeps to the
                # same --timeout, counted from the request's arrival, as a whole answer does.
                await asyncio.wait({waiting}, timeout=max(0.0, deadline - time.monotonic()))
                if not waiting.done():
                    # The status line has gone: OpenAI's clients read an error event instead.
                    # The generator is closed (its row given up) once this chunk is made; its
                    # outcome is read then, so that a failure in it is not logged as unread.
                    waiting.add_done_callback(lambda done: done.cancelled() or done.exception())
                    yield server_sent_event(OpenAIError(504, TIMEOUT_MESSAGE).body())
                    return
                try:
                    chunk = waiting.result()
                except Exception as error:
                    yield server_sent_event(error_from_model(error).body())
                    return
                pending = None
            if chat.include_usage and last is not None:
                yield server_sent_event(usage_chunk(last, usage))
            yield DONE_EVENT
        finally:
            executor.submit(_close_after, chunks, pending, context)

    @app.post(CHAT_COMPLETIONS_PATH)
    async def chat_completions(request: Request) -> Response:
        deadline = time.monotonic() + timeout_s
        try:
            body = parse_body(await request.body())
            requested = body.get("model")
            if isinstance(requested, str) and requested != served_name:
                raise unknown_model(requested, served_name)
            chat = chat_request(body, backend.accepted)
            if not chat.stream:
                completion = await call_model(backend.complete, chat.model_request)
                return JSONResponse(served_completion(completion, served_name))
            # Every step of one stream runs in one context, whichever thread runs it: MLflow's
            # `predict_stream` sets a context variable at the first chunk and resets it at the
            # last, which fails in another context ("was created in a different Context").
            context = contextvars.copy_context()
            chunks = await call_model(context.run, backend.stream, chat.model_request)
            # The first chunk is made before answering, so that a request the model refuses
            # (MLflow's stream raises at the first chunk) still gets its status code.
            first = await call_model(context.run, next, chunks, _END)
            return StreamingResponse(
                events(chunks, first, chat, context, deadline), media_type="text/event-stream"
            )
        except OpenAIError as error:
            return error_response(error)

    @app.get(MODELS_PATH)
    async def list_models() -> JSONResponse:
        return JSONResponse(models_list(served_name, created))

    @app.get(MODELS_PATH + "/{model_id:path}")
    async def retrieve_model(model_id: str) -> JSONResponse:
        if model_id != served_name:
            return error_response(unknown_model(model_id, served_name))
        return JSONResponse(model_card(served_name, created))

    @app.exception_handler(HTTPException)
    async def openai_http_errors(request: Request, error: HTTPException) -> Response:
        # An unknown path or method under /v1/ answers as OpenAI would; MLflow's routes keep
        # FastAPI's answer.
        if request.url.path.startswith(_OPENAI_PREFIX):
            return error_response(OpenAIError(error.status_code, str(error.detail)))
        return await http_exception_handler(request, error)

    @app.middleware("http")
    async def openai_timeouts(request: Request, call_next) -> Response:
        # MLflow's timeout middleware answers 504 in plain text; an OpenAI client needs an
        # error object to read. Added after MLflow's, this middleware runs outside it.
        response = await call_next(request)
        if response.status_code == 504 and request.url.path.startswith(_OPENAI_PREFIX):
            return error_response(OpenAIError(504, TIMEOUT_MESSAGE))
        return response

    return app
