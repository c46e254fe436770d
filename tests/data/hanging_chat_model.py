"""A chat model that never becomes ready: the evaluate step's hung-model case.

Its load hangs, as a model stuck in a native call or on a lock would; it is logged from code
(``python_model=<this file>``), so nothing is pickled.
"""

import threading

import mlflow


class HangingChatModel(mlflow.pyfunc.PythonModel):
    """Waits for ever while loading; predict is never reached."""

    def load_context(self, context) -> None:
        threading.Event().wait()

    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        return model_input


mlflow.models.set_model(HangingChatModel())
