"""Submitting and scheduling: parameters typed by the compiled pipeline, 6-field cron."""
import pytest

from pipelines import submit


def test_parameters_are_typed_by_the_compiled_pipeline():
    types = submit.pipeline_parameters()
    assert types["seed"] == "NUMBER_INTEGER" and types["data_uri"] == "STRING"
    got = submit.parse_params(["seed=7", "data_uri=minio://datasets/coco", "gpus_per_task=1", "memory_per_task=32G"])
    assert got == {"seed": 7, "data_uri": "minio://datasets/coco", "gpus_per_task": 1, "memory_per_task": "32G"}


@pytest.mark.parametrize("items, message", [
    (["sed=1"], "'sed' is not a pipeline parameter"),
    (["seed=one"], "seed='one' is not a number_integer"),
    (["seed"], "must look like name=value"),
])
def test_bad_parameters(items, message):
    with pytest.raises(SystemExit, match=message):
        submit.parse_params(items)


def test_cron_has_six_fields_and_endpoint_is_required(monkeypatch):
    assert submit.check_cron("0 0 2 * * *") == "0 0 2 * * *"
    with pytest.raises(SystemExit, match="must have 6 fields"):
        submit.check_cron("0 2 * * *")
    monkeypatch.delenv("KFP_ENDPOINT", raising=False)
    with pytest.raises(SystemExit, match="KFP_ENDPOINT is not set"):
        submit.client()
