"""Comparing candidates: metrics, the gate, scoring, the worker, the record and the report.

Owns: metric names, gate rules and verdicts (`metrics`), the evaluation set, scoring, agreement
and `judge` (`scoring`), one model answering the set in its own process (`worker`, run as
``python -m llm_packager.evaluation.worker``), the `evaluation.json` contract that `register` reads
(`record`), the charts and HTML report (`report`), and each candidate's next-token
distributions against the reference's over a fixed corpus (`teacher_forcing`), and the set
answered on Spark, with the chat types of a Spark DataFrame (`spark_engine`).

Public names:
- metrics: QUALITY_METRICS, AGREEMENT_METRICS, TEACHER_FORCED_METRICS, MODEL_METRICS,
  GateThreshold, GateRule, GateError, parse_gate, format_gate, gate_from_config, gate_to_config,
  PASSED, REJECTED, Verdict, quality_drops, apply_gate
- scoring: EvalSetError, EvalExample, resolve_eval_set, file_sha256, load_eval_set,
  normalise_answer, token_f1, score_answer, agreement, candidate_metrics, rank, Judgement, judge
- worker: peak_rss_mib, answer_eval_set, teacher_forced, main
- teacher_forcing: HELD_OUT_TEXT, CHUNK_TOKENS, TOKENS_FILE, REFERENCE_LOG_PROBS_FILE,
  KL_DIVERGENCES, TEACHER_FORCED_SKIPPED, LogitsFunction, TeacherForcingError, corpus_texts,
  tokenize_corpus, torch_logits, onnx_logits, next_token_log_probs, positions, Comparison,
  compare, write_reference, compare_with_reference, logged_model_logits
- record: SCHEMA_VERSION, EvaluationRecordError, CandidateResult, Recommendation,
  Evaluation
- report: RANDOM_WEIGHTS_WARNING, quality_chart, latency_chart, speed_chart, memory_chart,
  kl_divergence_chart, html_report, write_report
- spark_engine: REQUEST_DDL, CHAT_COMPLETION_DDL, LOCAL_ONLY_METRICS, SPARK_NOTE,
  SparkUnavailableError, spark_session, local_only_unmeasured, answer_on_spark

Imports the root modules, `sources` and `models`.
"""
