"""What the serving tests share: loading the model, chat requests, reading streams."""

from __future__ import annotations

from pathlib import Path

import mlflow

# The tiny model's context is 512 tokens; this cap lets an answer run long enough for others to
# arrive, fail or be cancelled while it is generated.
LONG_TOKENS = 400
REPETITION_PENALTY = 1.3


def genai_config_of(model_dir: Path) -> Path:
    (config,) = model_dir.glob("artifacts/**/genai_config.json")
    return config


def load(model_dir: Path, **config):
    """The unwrapped chat model, loaded with ``config`` over its logged model_config."""
    return mlflow.pyfunc.load_model(str(model_dir), model_config=config).unwrap_python_model()


def chat(content: str, **options) -> dict:
    return {"messages": [{"role": "user", "content": content}], **options}


def streamed_text(chunks) -> dict[int, str]:
    """Each choice's concatenated content."""
    contents: dict[int, str] = {}
    for chunk in chunks:
        (choice,) = chunk["choices"]
        text = choice["delta"].get("content", "")
        contents[choice["index"]] = contents.get(choice["index"], "") + text
    return contents
