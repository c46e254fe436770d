"""The teacher-forced comparison on the synthetic tiny model: figures, batching, failures, and the
evaluate step logging, reporting and gating them.

The KL divergence follows llama.cpp's ``llama-perplexity --kl-divergence``: KL(base ‖ candidate)
in nats per position, with its mean and percentiles, top-token agreement and the perplexity ratio
(tools/perplexity/README.md in ggml-org/llama.cpp). The tests on the models' own logits run on
torch only and are quick; those that build an ONNX model or run the step are marked slow.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import matplotlib.image
import mlflow
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from llm_packager.choices import ExecutionProvider, OnnxPrecision
from llm_packager.config.specs import EvaluateParameters
from llm_packager.evaluation.metrics import TEACHER_FORCED_METRICS, parse_gate
from llm_packager.evaluation.record import Evaluation
from llm_packager.evaluation.teacher_forcing import (
    REFERENCE_LOG_PROBS_FILE,
    TOKENS_FILE,
    TeacherForcingError,
    compare,
    compare_with_reference,
    corpus_texts,
    logged_model_logits,
    next_token_log_probs,
    onnx_logits,
    tokenize_corpus,
    torch_logits,
    write_reference,
)
from llm_packager.keys import (
    KLD_MEAN_METRIC,
    KLD_P95_METRIC,
    KLD_P99_METRIC,
    PERPLEXITY_METRIC,
    PERPLEXITY_RATIO_METRIC,
    REPORT_ARTIFACT,
    TOP1_AGREEMENT_METRIC,
)
from llm_packager.models.onnx_build import build_onnx_model
from llm_packager.project import PROJECT_DIR

EVAL_SET = PROJECT_DIR / "data" / "eval_set.jsonl"


@pytest.fixture(scope="module")
def corpus(tiny_model_dir) -> list[list[int]]:
    """The real corpus (evaluation set answers and held-out text) in the tiny model's tokens."""
    return tokenize_corpus(tiny_model_dir, corpus_texts(EVAL_SET))


@pytest.fixture(scope="module")
def reference(tiny_model_dir, corpus, tmp_path_factory) -> Path:
    """The tiny model's transformers reference, written as a reference worker writes it."""
    folder = tmp_path_factory.mktemp("reference")
    write_reference(folder, torch_logits(tiny_model_dir), corpus, batch_size=4)
    return folder


def test_the_corpus_is_the_answers_and_the_held_out_text_in_chunks(tiny_model_dir, corpus):
    answers, held_out = corpus_texts(EVAL_SET)
    assert answers.count("\n") == 47  # the 48 reference answers, one a line
    assert len(held_out.split()) > 300
    assert all(1 < len(chunk) <= 256 for chunk in corpus)
    # Nothing lost between chunks: they are the two documents' tokens, cut.
    whole = [tokenize_corpus(tiny_model_dir, [text], chunk_tokens=10**6)[0] for text in
             (answers, held_out)]  # fmt: skip
    assert [token for chunk in corpus for token in chunk] == whole[0] + whole[1]


def test_a_candidate_compared_with_itself_has_no_divergence(tiny_model_dir, reference):
    comparison, chunks = compare_with_reference(reference, torch_logits(tiny_model_dir), 1)
    figures = comparison.figures()
    assert len(comparison.kl_divergences) == sum(len(chunk) - 1 for chunk in chunks)
    # Not exactly 0: the reference is stored in float32, the candidate compared in float64.
    assert figures[KLD_MEAN_METRIC] < 1e-6 and figures[KLD_P99_METRIC] < 1e-6
    assert figures[TOP1_AGREEMENT_METRIC] == 1.0
    assert figures[PERPLEXITY_RATIO_METRIC] == pytest.approx(1.0, abs=1e-6)


def test_the_figures_do_not_depend_on_the_batch_size(tiny_model_dir, reference, tmp_path):
    """Batches of 4 pad the last, shorter chunks on the right; no position may see the pad."""
    perturbed = _perturbed_copy(tiny_model_dir, tmp_path, scale=0.2)
    logits = torch_logits(perturbed)
    one = compare_with_reference(reference, logits, 1)[0]
    four = compare_with_reference(reference, logits, 4)[0]
    assert one.figures()[KLD_MEAN_METRIC] > 1e-4  # a real difference to agree on
    np.testing.assert_allclose(four.kl_divergences, one.kl_divergences, rtol=0, atol=1e-4)
    for metric in TEACHER_FORCED_METRICS:
        assert four.figures()[metric] == pytest.approx(one.figures()[metric], rel=1e-4, abs=1e-4)


def test_a_planted_perturbation_raises_the_divergence_with_its_size(
    tiny_model_dir, reference, tmp_path
):
    figures = [
        compare_with_reference(
            reference, torch_logits(_perturbed_copy(tiny_model_dir, tmp_path / str(scale), scale)),
            4,
        )[0].figures()
        for scale in (0.0, 0.02, 0.2)
    ]  # fmt: skip
    means = [figure[KLD_MEAN_METRIC] for figure in figures]
    assert means[0] < 1e-6 < means[1] < means[2]
    assert figures[2][KLD_P99_METRIC] >= figures[2][KLD_P95_METRIC] > 0
    assert figures[2][TOP1_AGREEMENT_METRIC] < 1.0
    assert figures[2][PERPLEXITY_RATIO_METRIC] != pytest.approx(1.0, abs=1e-6)


def _perturbed_copy(model: Path, destination: Path, scale: float) -> Path:
    """A copy of the model whose every 2-D weight gets seeded noise of ``scale`` times its own
    standard deviation (0: an identical copy)."""
    shutil.copytree(model, destination, dirs_exist_ok=True)
    generator = torch.Generator().manual_seed(7)
    for path in destination.glob("*.safetensors"):
        tensors = load_file(path)
        for name, tensor in tensors.items():
            if tensor.ndim == 2 and scale:
                noise = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
                tensors[name] = tensor + noise * tensor.std() * scale
        save_file(tensors, path, metadata={"format": "pt"})
    return destination


def test_the_figures_are_llama_cpp_s_definitions_on_known_distributions():
    """Two positions over three tokens, with KL(P‖Q), top-1 and perplexities worked by hand."""
    p = np.array([[0.7, 0.2, 0.1], [0.25, 0.5, 0.25]])
    q = np.array([[0.5, 0.3, 0.2], [0.4, 0.4, 0.2]])
    chunks = [[0, 0, 1]]  # the next tokens are 0, then 1
    comparison = compare(np.log(p).astype(np.float32), iter([np.log(q)]), chunks)
    by_hand = [sum(pi * math.log(pi / qi) for pi, qi in zip(row_p, row_q, strict=True))
               for row_p, row_q in zip(p, q, strict=True)]  # fmt: skip
    figures = comparison.figures()
    assert comparison.kl_divergences == pytest.approx(by_hand, rel=1e-6)
    assert figures[KLD_MEAN_METRIC] == pytest.approx(sum(by_hand) / 2, rel=1e-6)
    assert figures[TOP1_AGREEMENT_METRIC] == 0.5  # token 0 both times; then 1 against 0
    candidate_ppl = math.exp(-(math.log(0.5) + math.log(0.4)) / 2)
    reference_ppl = math.exp(-(math.log(0.7) + math.log(0.5)) / 2)
    assert figures[PERPLEXITY_METRIC] == pytest.approx(candidate_ppl, rel=1e-6)
    assert figures[PERPLEXITY_RATIO_METRIC] == pytest.approx(candidate_ppl / reference_ppl, 1e-6)
    # Reversed, KL(Q‖P) differs: the direction is the reference's first.
    reverse = compare(np.log(q).astype(np.float32), iter([np.log(p)]), chunks)
    assert reverse.figures()[KLD_MEAN_METRIC] != pytest.approx(figures[KLD_MEAN_METRIC], rel=0.01)


def test_a_candidate_with_another_vocabulary_is_refused(tiny_model_dir, reference):
    def wider(rows):
        return [np.pad(values, ((0, 0), (0, 1))) for values in torch_logits(tiny_model_dir)(rows)]

    with pytest.raises(TeacherForcingError, match="vocabularies differ"):
        compare_with_reference(reference, wider, 4)


def test_without_the_reference_s_log_probabilities_a_candidate_is_not_compared(tmp_path):
    with pytest.raises(TeacherForcingError, match="left no log-probabilities"):
        compare_with_reference(tmp_path, lambda rows: [], 1)


def test_a_logged_model_without_weights_is_refused(tmp_path):
    (tmp_path / "MLmodel").write_text("flavors: {}\n")
    with pytest.raises(TeacherForcingError, match="neither an ONNX build nor transformers"):
        logged_model_logits(tmp_path)


def test_a_transformers_model_logged_as_run_artifacts_is_found_a_folder_deep(
    tiny_model_dir, reference, tmp_path
):
    """mlflow.transformers keeps the weights in model/ and the tokenizer in components/tokenizer
    beside MLmodel; a run-artifact model downloads one folder deeper than a LoggedModel."""
    logged = tmp_path / "chat_model"
    shutil.copytree(tiny_model_dir, logged / "model")
    shutil.copytree(tiny_model_dir, logged / "components" / "tokenizer")
    (logged / "MLmodel").write_text("flavors: {transformers: {}}\n")
    logits, tokenizer = logged_model_logits(tmp_path)
    assert tokenizer == logged / "components" / "tokenizer"
    assert compare_with_reference(reference, logits, 4)[0].figures()[KLD_MEAN_METRIC] < 1e-6


def test_the_reference_s_own_figures_come_from_the_file_it_leaves(reference, corpus):
    assert json.loads((reference / TOKENS_FILE).read_text()) == corpus
    stored = np.load(reference / REFERENCE_LOG_PROBS_FILE)
    assert stored.shape[0] == sum(len(chunk) - 1 for chunk in corpus)
    # Each row is a distribution: its probabilities sum to 1.
    np.testing.assert_allclose(np.exp(stored.astype(np.float64)).sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_the_onnx_graph_s_logits_are_the_reference_s_at_every_batch_size(
    tiny_model_dir, reference, corpus, tmp_path
):
    """The builder's fp32 graph, read by onnxruntime with an empty cache, gives every position's
    logits: against torch its KL is rounding only; int4 is measurably further, and both agree
    between batch sizes 1 and 4 (right padding through GroupQueryAttention)."""
    figures = {}
    for precision in (OnnxPrecision.fp32, OnnxPrecision.int4):
        folder = build_onnx_model(
            tiny_model_dir, tmp_path / precision.value, precision=precision,
            execution_provider=ExecutionProvider.cpu, extra_options={},
            log_path=tmp_path / f"{precision.value}.log",
        )  # fmt: skip
        logits = onnx_logits(folder)
        one, four = (compare_with_reference(reference, logits, size)[0] for size in (1, 4))
        np.testing.assert_allclose(four.kl_divergences, one.kl_divergences, rtol=0, atol=1e-4)
        figures[precision] = one.figures()
        assert len(next(next_token_log_probs(logits, corpus[:1], 1))) == len(corpus[0]) - 1
    assert figures[OnnxPrecision.fp32][KLD_MEAN_METRIC] < 1e-6
    assert figures[OnnxPrecision.fp32][TOP1_AGREEMENT_METRIC] == 1.0
    assert figures[OnnxPrecision.int4][KLD_MEAN_METRIC] > 10 * figures[OnnxPrecision.fp32][
        KLD_MEAN_METRIC]  # fmt: skip


@pytest.mark.slow
def test_evaluate_logs_reports_and_gates_the_teacher_forced_figures(
    logged_models_tracking, tmp_path
):
    client, runs = logged_models_tracking
    # A gate on the figures alone: the reference (KL 0) passes, the int4 ONNX model does not
    # pass a KL bound set below what it measures.
    request = EvaluateParameters(
        candidate_run_ids=(runs["log_transformers"], runs["log_onnx"]), limit=2, max_tokens=4,
        ttft_requests=1, gate=parse_gate("kld_mean<=1e-9,top1_agreement>=0.5"),
    )  # fmt: skip
    from steps.evaluate import evaluate

    with mlflow.start_run(experiment_id=runs["experiment_id"]) as run:
        evaluation = evaluate(request, run.info.run_id)
    logged = client.get_run(run.info.run_id).data.metrics
    reference, onnx = evaluation.candidate("transformers"), evaluation.candidate("onnx")
    assert Evaluation.load(run.info.run_id) == evaluation
    for candidate in (reference, onnx):
        for metric in TEACHER_FORCED_METRICS:
            assert logged[f"{candidate.name}.{metric}"] == candidate.metrics[metric]
    assert reference.metrics[KLD_MEAN_METRIC] == 0.0
    assert reference.metrics[TOP1_AGREEMENT_METRIC] == 1.0
    assert reference.metrics[PERPLEXITY_RATIO_METRIC] == 1.0
    assert reference.verdict.passed
    assert onnx.metrics[KLD_MEAN_METRIC] > 1e-9
    assert not onnx.verdict.passed
    assert any(reason.startswith("kld_mean ") for reason in onnx.verdict.reasons)

    folder = Path(mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/",
                                                      dst_path=str(tmp_path)))  # fmt: skip
    height, width, _ = matplotlib.image.imread(folder / "charts" / "kl_divergence.png").shape
    assert height > 300 and width > 500
    report = (folder / REPORT_ARTIFACT).read_text()
    assert "<h2>Teacher-forced against the reference</h2>" in report
    assert f"<tr><td>onnx</td><td>{onnx.metrics[KLD_MEAN_METRIC]:.4g}</td>" in report
