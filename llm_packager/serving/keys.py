"""Keys the served ONNX model reads, logged with it so that the logging step and the model spell
each key once: the step imports them from here, and the model reads them from its own copy.

``ONNX_ARTIFACT_KEY`` names the artifact that holds the ONNX folder; the rest are the keys of the
``model_config`` the step writes and ``OnnxChatModel.load_context`` reads.
"""

ONNX_ARTIFACT_KEY = "onnx_model"

# model_config keys: what the model is called in its answers, and its generation defaults.
MODEL_NAME_KEY = "model_name"
MAX_NEW_TOKENS_KEY = "max_new_tokens"
DO_SAMPLE_KEY = "do_sample"
TEMPERATURE_KEY = "temperature"
TOP_P_KEY = "top_p"
MAX_TOKENS_CAP_KEY = "max_tokens_cap"
# model_config keys: how the decode loop batches and how many threads a decoder step uses.
BATCHING_KEY = "batching"
MAX_BATCH_SIZE_KEY = "max_batch_size"
MAX_QUEUED_REQUESTS_KEY = "max_queued_requests"
BATCH_WAIT_MS_KEY = "batch_wait_ms"
INTRA_OP_NUM_THREADS_KEY = "intra_op_num_threads"
