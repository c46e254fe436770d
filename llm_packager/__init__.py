"""Package small chat LLMs (Phi-3) as MLflow models: the library behind the steps in ``steps/``."""
