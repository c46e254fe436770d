"""Warnings from our dependencies that we cannot fix, silenced narrowly, each with its reason.

Only messages listed here are dropped, and only from the logger that emits them; every other
warning still shows. Each entry says why it is harmless and where it comes from, so it can be
removed once the dependency changes.
"""

from __future__ import annotations

import logging

# (logger, message prefix, why it is harmless)
SILENCED_LOG_MESSAGES = (
    (
        "transformers.tokenization_utils_tokenizers",
        "Ignoring clean_up_tokenization_spaces=True for BPE tokenizer",
        # MLflow's llm/v1/chat decoding passes clean_up_tokenization_spaces=True
        # (mlflow/transformers/llm_inference_utils.py); transformers 5 rightly ignores it for a
        # byte-level BPE, which is what we want, and warns on every model load.
        "MLflow asks for a clean-up that transformers correctly skips for BPE tokenizers",
    ),
)


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self._prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self._prefixes)


def silence_known_warnings() -> None:
    """Install the filters of `SILENCED_LOG_MESSAGES` (idempotent)."""
    for logger_name, prefix, _ in SILENCED_LOG_MESSAGES:
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, _DropMessages) and prefix in f._prefixes for f in logger.filters):
            logger.addFilter(_DropMessages((prefix,)))
