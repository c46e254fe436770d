"""Registered model names and aliases: Unity Catalog's three-level names, reserved aliases."""

from __future__ import annotations

import pytest

from llm_packager.config.compose import ConfigError, compose_config
from llm_packager.config.specs import RegisterParameters
from llm_packager.models.registry import (
    RegistryNameError,
    check_alias,
    check_registered_model_name,
    is_unity_catalog,
)
from steps.register import register


@pytest.mark.parametrize(
    ("registry_uri", "expected"),
    [("databricks-uc", True), ("databricks-uc://prod", True), ("databricks", False),
     ("", False), ("http://127.0.0.1:5000", False)],
)  # fmt: skip
def test_unity_catalog_is_recognised_by_its_registry_uri(registry_uri, expected):
    assert is_unity_catalog(registry_uri) is expected


@pytest.mark.parametrize("name", ["main.default.phi3_chat", "ml.Models.tiny_random_phi3_chat_2"])
def test_three_level_names_are_accepted_by_unity_catalog(name):
    check_registered_model_name(name, "databricks-uc")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("phi3-chat", "Unity Catalog needs a three-level name catalog.schema.model; got "
                      "'phi3-chat'. Set register.registered_model_name, e.g. "
                      "main.default.phi3_chat"),
        ("default.phi3_chat", "got 'default.phi3_chat'"),
        ("a.b.c.d", "got 'a.b.c.d'"),
        ("main..phi3", "got 'main..phi3'"),
        ("main.default.phi3-chat", "'phi3-chat' in 'main.default.phi3-chat' may hold only "
                                   "letters, digits and underscores in Unity Catalog; e.g. "
                                   "'phi3_chat'"),
        ("main.my schema.phi3", "'my schema' in 'main.my schema.phi3'"),
        ("  ", "The registered model name must not be empty"),
    ],
)  # fmt: skip
def test_names_unity_catalog_refuses_are_refused_with_the_fix(name, message):
    with pytest.raises(RegistryNameError) as refused:
        check_registered_model_name(name, "databricks-uc")
    assert message in str(refused.value)


def test_other_registries_take_plain_and_dotted_names():
    check_registered_model_name("phi3-mini-4k-instruct-chat", "")
    check_registered_model_name("team.phi3-chat", "http://127.0.0.1:5000")


@pytest.mark.parametrize("alias", ["champion", "challenger", "prod-2", "v1beta", "_staging"])
def test_ordinary_aliases_are_accepted(alias):
    check_alias(alias)


@pytest.mark.parametrize(
    ("alias", "message"),
    [("latest", "Alias 'latest' is reserved"), ("LATEST", "Alias 'LATEST' is reserved"),
     ("v2", "Alias 'v2' is reserved"), ("", "Alias '' may hold only"),
     ("my alias", "Alias 'my alias' may hold only letters, digits, '_' and '-'")],
)  # fmt: skip
def test_reserved_and_malformed_aliases_are_refused(alias, message):
    with pytest.raises(RegistryNameError, match=message):
        check_alias(alias)


def test_unity_catalog_config_derives_a_valid_three_level_name():
    register_config = compose_config("phi3-mini-4k-instruct", "register=unity-catalog").register
    assert register_config.registry_uri == "databricks-uc"
    assert register_config.registered_model_name == "main.default.phi3_mini_4k_instruct_chat"
    check_registered_model_name(register_config.registered_model_name, "databricks-uc")


def test_a_bad_unity_catalog_name_fails_when_the_config_is_composed():
    with pytest.raises(ConfigError, match="register: Unity Catalog needs a three-level name"):
        compose_config(
            "tiny-random-phi3",
            "register=unity-catalog register.registered_model_name=tiny-chat",
        )


def test_the_register_step_refuses_a_bad_name_before_touching_the_registry(local_tracking):
    request = RegisterParameters(
        evaluate_run_id="no-such-run",
        registered_model_name="main.default.tiny-chat",
        registry_uri="databricks-uc",
    )
    with pytest.raises(RegistryNameError) as refused:
        register(request, run_id="unused")
    assert "'tiny-chat' in 'main.default.tiny-chat'" in str(refused.value)


def _version(number: int, *, source: str, run_id: str, model_id: str | None = None):
    from mlflow.entities.model_registry import ModelVersion

    return ModelVersion(name="main.default.m", version=str(number), creation_timestamp=0,
                        source=source, run_id=run_id, model_id=model_id)  # fmt: skip


def test_an_existing_version_is_found_in_unity_catalog_shaped_results():
    from llm_packager.models.registry import existing_version

    # What Unity Catalog's search_model_versions returns: no model_id, and a storage path as the
    # source, so neither identifies the logged model; the run that logged it does.
    versions = [
        _version(1, source="dbfs:/databricks/mlflow-tracking/1/aaa/artifacts", run_id="aaa"),
        _version(2, source="dbfs:/databricks/mlflow-tracking/1/bbb/artifacts", run_id="bbb"),
    ]
    found = existing_version(versions, "models:/m-0123456789abcdef0123456789abcdef", "bbb")
    assert found.version == "2"
    assert existing_version(versions, "models:/m-0123456789abcdef0123456789abcdef", "ccc") is None


def test_the_oldest_of_duplicate_versions_is_the_one_reused():
    from llm_packager.models.registry import existing_version

    uri = "models:/m-0123456789abcdef0123456789abcdef"
    versions = [_version(5, source=uri, run_id="r"), _version(3, source=uri, run_id="r")]
    assert existing_version(versions, uri, "r").version == "3"
    by_id = [_version(7, source="s3://bucket/x", run_id="other",
                      model_id="m-0123456789abcdef0123456789abcdef")]  # fmt: skip
    assert existing_version(by_id, uri, "r").version == "7"


@pytest.mark.parametrize(
    ("error_code", "status", "unsupported"),
    [
        ("ENDPOINT_NOT_FOUND", 404, True),  # a 404 without an MLflow body (the Azure double's)
        ("NOT_IMPLEMENTED", 501, True),
        ("BAD_REQUEST", 405, True),  # the path is routed, the method is not
        ("RESOURCE_DOES_NOT_EXIST", 404, False),  # the model or alias is missing: aliases exist
        ("PERMISSION_DENIED", 403, False),  # a refused write is told as itself
        ("INVALID_PARAMETER_VALUE", 400, False),
    ],
)
def test_only_an_answer_without_an_alias_endpoint_turns_aliases_into_version_tags(
    error_code, status, unsupported
):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import ErrorCode

    from llm_packager.models.registry import aliases_unsupported

    error = MlflowException("refused", error_code=ErrorCode.Value(error_code))
    error.get_http_status_code = lambda: status  # as MLflow's REST client reports the answer
    assert aliases_unsupported(error) is unsupported
