"""Step parameters declared once: parsing, canonical text, MLproject and config derived from it."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import pytest
import yaml

from llm_packager.choices import GateDirection, OnnxPrecision
from llm_packager.config.parameters import (
    as_mlflow_parameters,
    config_schema_fields,
    fields_of,
    format_key_values,
    mlproject_entry_point,
    parameter,
    parse_arguments,
)
from llm_packager.config.specs import (
    ENTRY_POINTS,
    EvaluateParameters,
    FetchModelParameters,
    LogOnnxParameters,
)
from llm_packager.evaluation.metrics import GateRule
from llm_packager.generate import (
    CONFIGURATION_DOC,
    render_mlproject,
    render_parameter_tables,
    stale_files,
)
from llm_packager.project import PROJECT_DIR


def test_an_int_typed_as_text_gives_the_same_canonical_parameter():
    typed = as_mlflow_parameters(FetchModelParameters(num_hidden_layers=3))
    parsed = as_mlflow_parameters(
        parse_arguments(FetchModelParameters, ["--num-hidden-layers", "03"])
    )
    assert typed == parsed
    assert parsed["num_hidden_layers"] == "3"


def test_floats_and_booleans_have_one_canonical_text():
    one = parse_arguments(LogOnnxParameters, ["--fetch-model-run-id", "r", "--temperature", "1",
                                              "--do-sample", "TRUE"])  # fmt: skip
    other = LogOnnxParameters(fetch_model_run_id="r", temperature=1.0, do_sample=True)
    assert as_mlflow_parameters(one) == as_mlflow_parameters(other)
    # MLflow logs a model_config's Python booleans as True/False: the parameter says the same.
    assert as_mlflow_parameters(other)["do_sample"] == "True"
    assert as_mlflow_parameters(other)["temperature"] == "1.0"


def test_structured_parameters_round_trip_through_their_text():
    request = EvaluateParameters(
        candidate_run_ids=("a", "b"),
        gate=(
            GateRule("latency_p95_s", 30.0, GateDirection.lower),
            GateRule("exact_match", 0.5, GateDirection.higher),
        ),
    )
    text = as_mlflow_parameters(request)
    assert text["candidate_run_ids"] == "a,b"
    assert text["gate"] == "exact_match>=0.5,latency_p95_s<=30"
    argv = [f"--{name.replace('_', '-')}={value}" for name, value in text.items()]
    assert as_mlflow_parameters(parse_arguments(EvaluateParameters, argv)) == text
    onnx = LogOnnxParameters(fetch_model_run_id="r", extra_options={"b": "2", "a": "1"})
    assert as_mlflow_parameters(onnx)["extra_options"] == "a=1,b=2"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num-hidden-layers", "three"], "argument --num-hidden-layers: expected an integer, "
                                           "got 'three'"),
        (["--source", "ftp"], "argument --source: 'ftp' is not one of hub, local, gguf or "
                              "synthetic"),
        (["--allow-unpinned-revision", "yes"], "argument --allow-unpinned-revision: expected true "
                                               "or false, got 'yes'"),
        (["--colour", "red"], "unrecognized arguments: --colour red"),
    ],
)  # fmt: skip
def test_bad_arguments_are_refused_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        parse_arguments(FetchModelParameters, argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_a_required_parameter_is_required(capsys):
    with pytest.raises(SystemExit):
        parse_arguments(LogOnnxParameters, [])
    assert "the following arguments are required: --fetch-model-run-id" in capsys.readouterr().err


def test_bad_builder_options_and_gates_are_named(capsys):
    with pytest.raises(SystemExit):
        parse_arguments(LogOnnxParameters, ["--fetch-model-run-id", "r", "--extra-options", "x"])
    assert "argument --extra-options: 'x' is not key=value" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_arguments(EvaluateParameters, ["--candidate-run-ids", "r", "--gate", "speed>=3"])
    assert "gate rule 'speed>=3': unknown metric 'speed'" in capsys.readouterr().err


def test_mlproject_declares_exactly_the_specs():
    declared = yaml.safe_load((PROJECT_DIR / "MLproject").read_text())["entry_points"]
    assert set(declared) == set(ENTRY_POINTS)
    for entry_point, step in ENTRY_POINTS.items():
        parameters = declared[entry_point]["parameters"]
        assert list(parameters) == [field.name for field in fields_of(step.parameters)]
        assert all(spec["type"] in {"string", "int", "float"} for spec in parameters.values())
        assert (
            declared[entry_point]["command"]
            == (mlproject_entry_point(entry_point, step.parameters)["command"])
        )


def test_generated_files_are_up_to_date():
    assert stale_files() == [], "run `python -m llm_packager.generate`"


def test_every_entry_point_has_one_generated_table_in_the_configuration_page():
    # A step without a marker block would silently have no table: generate only fills blocks.
    page = (PROJECT_DIR / CONFIGURATION_DOC).read_text()
    tables = re.findall(r"<!-- generated: parameters of (\w+) -->", page)
    assert sorted(tables) == sorted(ENTRY_POINTS)


def test_a_new_spec_field_reaches_mlproject_and_the_docs_table_with_no_other_edit(monkeypatch):
    @dataclass(frozen=True, kw_only=True)
    class Extended(LogOnnxParameters):
        kv_cache_bits: int = parameter("bits per KV cache entry", 16)

    monkeypatch.setitem(
        ENTRY_POINTS, "log_onnx", dataclasses.replace(ENTRY_POINTS["log_onnx"], parameters=Extended)
    )
    assert "      kv_cache_bits: {type: int, default: 16}" in render_mlproject()
    assert "--kv-cache-bits {kv_cache_bits}" in " ".join(render_mlproject().split())
    tables = render_parameter_tables((PROJECT_DIR / CONFIGURATION_DOC).read_text())
    assert "| `onnx.kv_cache_bits` | int | `16` | bits per KV cache entry |" in tables
    assert parse_arguments(Extended, ["--fetch-model-run-id", "r"]).kv_cache_bits == 16
    assert ("kv_cache_bits", int) in [(name, kind) for name, kind, _ in
                                      config_schema_fields(Extended)]  # fmt: skip
    assert Extended(fetch_model_run_id="r").precision == OnnxPrecision.int4


def test_a_builder_option_whose_value_holds_commas_reaches_the_step_whole():
    # conf/onnx/search.yaml's kquant_mixed8: main wrote it comma-joined, and the step once split
    # it into a second "pair", mixed_layers:int8, and refused it.
    options = {"algo_config": "k_quant",
               "matmul_mixed_precision": "last_matmul:int8,mixed_layers:int8"}  # fmt: skip
    written = format_key_values(options)
    parsed = parse_arguments(LogOnnxParameters,
                             ["--fetch-model-run-id", "r", "--extra-options", written])  # fmt: skip
    assert parsed.extra_options == options


def test_a_part_without_equals_that_is_no_group_type_pair_is_still_refused(capsys):
    with pytest.raises(SystemExit):
        parse_arguments(LogOnnxParameters, ["--fetch-model-run-id", "r", "--extra-options",
                                            "accuracy_level=4,block_size"])  # fmt: skip
    assert "'block_size' is not key=value" in capsys.readouterr().err
