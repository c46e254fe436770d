"""`python -m llm_packager.endpoint -m models:/<name>@champion`: serve a chat model to OpenAI's
clients on /v1/chat/completions and /v1/models (beside MLflow's /invocations)."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os

DEFAULT_PORT = 8000
# Model calls at once. Keep it above what the model admits (the ONNX model: onnx.max_batch_size
# rows plus onnx.max_queued_requests waiting) so that the model's own 503 answers an overflow,
# rather than requests waiting for a thread.
DEFAULT_THREADS = 128
# Seconds to the whole answer, streamed or not, from the request's arrival.
DEFAULT_TIMEOUT_S = 300


def served_name_of(model_uri: str) -> str:
    """The model's id for clients: a registry URI without its scheme (``name@champion``)."""
    return model_uri.removeprefix("models:/")


def parser() -> argparse.ArgumentParser:
    """The command line's options."""
    parse = argparse.ArgumentParser(prog="python -m llm_packager.endpoint", description=__doc__)
    parse.add_argument(
        "-m",
        "--model-uri",
        required=True,
        help="the model to serve, e.g. models:/tiny-random-phi3-chat@champion",
    )
    parse.add_argument("--host", default="127.0.0.1")
    parse.add_argument("--port", type=int, default=DEFAULT_PORT)
    parse.add_argument(
        "--served-model-name",
        default=None,
        help="the model's id for clients (default: the URI without models:/)",
    )
    parse.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        help="model calls at once (default %(default)s)",
    )
    parse.add_argument(
        "--timeout",
        type=int,
        default=DEFAULT_TIMEOUT_S,
        help="seconds to a whole answer, streamed or not (default %(default)s)",
    )
    return parse


def main(argv: list[str] | None = None) -> None:
    """Load the model, then serve it until interrupted."""
    arguments = parser().parse_args(argv)
    import mlflow
    import uvicorn
    from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT

    from .app import build_app

    # MLflow's scoring server reads its timeout when the app is built.
    os.environ[MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.name] = str(arguments.timeout)
    model = mlflow.pyfunc.load_model(arguments.model_uri)
    executor = concurrent.futures.ThreadPoolExecutor(arguments.threads, "model-call")
    name = arguments.served_model_name or served_name_of(arguments.model_uri)
    app = build_app(model, name, executor)

    async def serve() -> None:
        # MLflow's /invocations runs on the loop's default executor: give it the same threads.
        asyncio.get_running_loop().set_default_executor(executor)
        config = uvicorn.Config(app, host=arguments.host, port=arguments.port, log_level="info")
        await uvicorn.Server(config).serve()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
