"""Comparing candidates: metrics, the gate, scoring, the worker, the record and the report.

Owns: metric names, gate rules and verdicts (`metrics`), the evaluation set, scoring, agreement
and `judge` (`scoring`), one model answering the set in its own process (`worker`, run as
``python -m llm_packager.evaluation.worker``), the `evaluation.json` contract that `register` reads
(`record`), and the charts and HTML report (`report`).

Public names:
- metrics: QUALITY_METRICS, AGREEMENT_METRICS, MODEL_METRICS, GateThreshold, GateRule, GateError,
  parse_gate, format_gate, gate_from_config, gate_to_config, PASSED, REJECTED, Verdict,
  quality_drops, apply_gate
- scoring: EvalSetError, EvalExample, resolve_eval_set, file_sha256, load_eval_set,
  normalise_answer, token_f1, score_answer, agreement, candidate_metrics, rank, Judgement, judge
- worker: peak_rss_mib, answer_eval_set, main
- record: SCHEMA_VERSION, EvaluationRecordError, CandidateResult, Recommendation,
  Evaluation
- report: RANDOM_WEIGHTS_WARNING, quality_chart, latency_chart, speed_chart, memory_chart,
  html_report, write_report

Imports the root modules, `sources` and `models`.
"""
