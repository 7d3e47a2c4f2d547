"""Submitting and scheduling: parameters typed by the compiled pipeline, 6-field cron; on a
multi-user Kubeflow: namespace, credentials (never printed), the backend floor, no catch-up."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import kfp
import kfp.client
import pytest
import yaml

from pipelines import submit


def test_parameters_are_typed_by_the_compiled_pipeline():
    types = submit.pipeline_parameters()
    assert types["seed"] == "NUMBER_INTEGER" and types["data_uri"] == "STRING"
    got = submit.parse_params(["seed=7", "data_uri=minio://datasets/coco", "gpus_per_task=1", "memory_per_task=32G"])
    assert got == {"seed": 7, "data_uri": "minio://datasets/coco", "gpus_per_task": 1, "memory_per_task": "32G"}
    # the full train's shape: nodes and GPUs per node are integers
    assert submit.parse_params(["full_train_nodes=2", "full_train_gpus_per_node=8"]) == {
        "full_train_nodes": 2, "full_train_gpus_per_node": 8}


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


# --- multi-user Kubeflow: namespace, credentials, backend floor, catch-up -------------------------
# A fake kfp.Client records its constructor's kwargs and every call; its healthz answers what the
# test sets, shaped like the real replies (the API server's main.go, ml-pipeline-ui's healthz.ts).

TOKEN = "tok-3f9a-never-print-me"
ENDPOINT = "http://kfp.test:8080"
DATA = ["--param", "data_uri=minio://datasets/coco"]  # the one parameter without a default
API_2_17_3 = {"commit_sha": "abc", "tag_name": "2.17.3", "multi_user": True, "pipeline_store": "database"}
API_2_14_RELEASE = {"commit_sha": "unknown", "tag_name": "unknown", "multi_user": True, "pipeline_store": "database"}
API_2_5_RELEASE = {"commit_sha": "unknown", "tag_name": "unknown", "multi_user": True}
UI_2_5_0 = {"buildDate": "", "frontendCommitHash": "", "frontendTagName": "", "apiServerReady": True,
            "apiServerCommitHash": "abc", "apiServerTagName": "2.5.0", "apiServerMultiUser": True, "multi_user": True}


class Recorder:
    def __init__(self):
        self.inits: list[dict] = []
        self.calls: list[tuple] = []
        self.healthz: object = json.dumps(API_2_17_3).encode()

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """kfp.Client replaced by a recorder; KFP_ENDPOINT set, no token, no namespace, no token file."""
    rec = Recorder()

    class FakeClient:
        def __init__(self, **kwargs):
            rec.inits.append(kwargs)
            self.healthzs = SimpleNamespace(healthz_service_get_healthz=self._healthz)

        def _healthz(self, **kwargs):
            rec.calls.append(("healthz", (), kwargs))
            if isinstance(rec.healthz, Exception):
                raise rec.healthz
            return SimpleNamespace(data=rec.healthz)

        def create_run_from_pipeline_package(self, *args, **kwargs):
            rec.calls.append(("create_run_from_pipeline_package", args, kwargs))
            return SimpleNamespace(run_id="run-1")

        def create_experiment(self, *args, **kwargs):
            rec.calls.append(("create_experiment", args, kwargs))
            return SimpleNamespace(experiment_id="exp-1")

        def create_recurring_run(self, *args, **kwargs):
            rec.calls.append(("create_recurring_run", args, kwargs))
            return SimpleNamespace(recurring_run_id="rr-1")

        def upload_pipeline(self, *args, **kwargs):
            rec.calls.append(("upload_pipeline", args, kwargs))
            return SimpleNamespace(pipeline_id="p-1")

        def list_pipelines(self, *args, **kwargs):
            rec.calls.append(("list_pipelines", args, kwargs))
            return SimpleNamespace(pipelines=[SimpleNamespace(pipeline_id="p-1")])

        def upload_pipeline_version(self, *args, **kwargs):
            rec.calls.append(("upload_pipeline_version", args, kwargs))
            return SimpleNamespace(pipeline_version_id="v-1")

    monkeypatch.setattr(kfp, "Client", FakeClient)
    monkeypatch.setenv("KFP_ENDPOINT", ENDPOINT)
    for var in ("KFP_TOKEN", "KFP_NAMESPACE", submit.SA_TOKEN_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(submit, "SA_TOKEN_PATH", tmp_path / "no-such-token")
    return rec


def test_namespace_and_token_reach_the_client_and_the_run(fake):
    submit.main(["run", *DATA, "--namespace", "team-a", "--token", TOKEN, "--param", "seed=3", "--param", "cpu_per_task=8"])
    assert fake.inits == [{"host": ENDPOINT, "namespace": "team-a", "existing_token": TOKEN}]
    assert fake.names() == ["healthz", "create_run_from_pipeline_package"]
    _, args, kwargs = fake.calls[1]
    assert args == (str(submit.PACKAGE),)
    assert kwargs == {"arguments": {"data_uri": "minio://datasets/coco", "seed": 3, "cpu_per_task": "8"},
                      "experiment_name": "spnas",
                      "namespace": "team-a", "enable_caching": False}


def test_namespace_and_token_from_the_environment_and_flags_win(fake, monkeypatch):
    monkeypatch.setenv("KFP_NAMESPACE", "team-env")
    monkeypatch.setenv("KFP_TOKEN", TOKEN)
    submit.main(["run", *DATA])
    submit.main(["run", *DATA, "--namespace", "team-flag", "--token", "other-token"])
    assert fake.inits == [{"host": ENDPOINT, "namespace": "team-env", "existing_token": TOKEN},
                          {"host": ENDPOINT, "namespace": "team-flag", "existing_token": "other-token"}]
    assert [c[2]["namespace"] for c in fake.calls if c[0] == "create_run_from_pipeline_package"] == ["team-env", "team-flag"]


def test_without_namespace_or_credentials_the_client_gets_only_the_host(fake):
    submit.main(["run", *DATA])
    assert fake.inits == [{"host": ENDPOINT}]
    assert fake.calls[1][2]["namespace"] is None


def test_in_cluster_the_service_account_token_file_is_used(fake, monkeypatch, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("sa-token-from-file\n")
    monkeypatch.setattr(submit, "SA_TOKEN_PATH", token_file)
    submit.main(["run", *DATA, "--namespace", "team-a"])
    (init,) = fake.inits
    assert sorted(init) == ["credentials", "host", "namespace"]
    creds = init["credentials"]
    assert isinstance(creds, kfp.client.ServiceAccountTokenVolumeCredentials)
    config = SimpleNamespace(api_key={})
    creds.refresh_api_key_hook(config)  # what the client does before each request
    assert config.api_key == {"authorization": "sa-token-from-file"}

    other = tmp_path / "projected"
    other.write_text("sa-token-from-env-path")
    monkeypatch.setenv(submit.SA_TOKEN_ENV, str(other))  # kfp's own override of the path
    submit.main(["run", *DATA])
    fake.inits[1]["credentials"].refresh_api_key_hook(config)
    assert config.api_key == {"authorization": "sa-token-from-env-path"}

    submit.main(["run", *DATA, "--token", TOKEN])  # an explicit token wins over the file
    assert fake.inits[2] == {"host": ENDPOINT, "existing_token": TOKEN}


def test_service_account_token_location_is_kfps():
    assert submit.SA_TOKEN_ENV == kfp.client.KF_PIPELINES_SA_TOKEN_ENV
    assert str(submit.SA_TOKEN_PATH) == kfp.client.KF_PIPELINES_SA_TOKEN_PATH


@pytest.mark.parametrize("cmd", [["run", *DATA], ["schedule", *DATA], ["upload"], ["upload", "--version", "v2"]])
@pytest.mark.parametrize("reply, found", [
    (dict(API_2_17_3, tag_name="2.5.0"), "KFP backend 2.5.0 is too old"),
    (UI_2_5_0, "KFP backend 2.5.0 is too old"),                       # through the ml-pipeline-ui port-forward
    (API_2_5_RELEASE, "reports version 'unknown' and its healthz lacks pipeline_store"),  # 2.0-2.5 release images
])
def test_an_old_backend_is_refused_before_anything_is_created(fake, cmd, reply, found):
    fake.healthz = json.dumps(reply).encode()
    with pytest.raises(SystemExit) as exc:
        submit.main([*cmd, "--namespace", "team-a"])
    message = str(exc.value)
    assert found in message and ">= 2.14.0" in message and "dsl.Collected" in message
    assert "--skip-version-check" in message
    assert fake.names() == ["healthz"]


@pytest.mark.parametrize("reply", [
    dict(API_2_17_3, tag_name="2.14.0"), API_2_17_3, dict(API_2_17_3, tag_name="v2.16.1"),
    dict(UI_2_5_0, apiServerTagName="2.14.0"),
    API_2_14_RELEASE,                                         # 2.14/2.15 release images: tag unknown, pipeline_store
    {"apiServerReady": True, "apiServerTagName": "unknown", "multi_user": True, "pipelineStore": "database"},
])
def test_a_recent_backend_passes(fake, reply):
    fake.healthz = json.dumps(reply).encode()
    submit.main(["run", *DATA])
    assert fake.names() == ["healthz", "create_run_from_pipeline_package"]
    assert fake.calls[0][2] == {"_preload_content": False, "_request_timeout": submit.HEALTHZ_TIMEOUT_S}


class FakeApiException(Exception):
    status, reason = 404, "Not Found"


@pytest.mark.parametrize("reply, reason", [
    (FakeApiException("a body"), "healthz request failed: HTTP 404 Not Found"),
    (ConnectionError("refused"), "healthz request failed: ConnectionError"),
    (b"<html>Sign in</html>", "its healthz reply is not JSON (an auth proxy's login page?)"),
    (b"{}", "its healthz reply has no tag_name: not one of a KFP API server or ml-pipeline-ui"),
    (b'{"multi_user": true}', "its healthz reply has no tag_name: not one of a KFP API server or ml-pipeline-ui"),
    (json.dumps({"apiServerReady": False, "buildDate": ""}).encode(), "ml-pipeline-ui answered but could not reach the API server"),
])
def test_an_unreadable_version_warns_and_continues(fake, caplog, reply, reason):
    fake.healthz = reply
    with caplog.at_level("WARNING", logger="pipelines.submit"):
        submit.main(["run", *DATA])
    assert fake.names() == ["healthz", "create_run_from_pipeline_package"]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(f"could not read the KFP backend version ({reason}); continuing without the check")
    assert "needs backend >= 2.14.0 because the pipeline fans in with dsl.Collected" in warning


def test_skip_version_check_skips_the_request(fake, caplog):
    fake.healthz = json.dumps(UI_2_5_0).encode()
    with caplog.at_level("WARNING", logger="pipelines.submit"):
        submit.main(["run", *DATA, "--skip-version-check"])
    assert fake.names() == ["create_run_from_pipeline_package"]
    assert any("--skip-version-check" in r.getMessage() for r in caplog.records)


def test_parse_version():
    assert submit.parse_version("2.14.0") == (2, 14, 0)
    assert submit.parse_version("v2.16.1") == (2, 16, 1)
    assert submit.parse_version("2.14.0-rc.1") == (2, 14, 0)
    assert submit.parse_version("unknown") is None
    assert submit.parse_version("") is None
    assert submit.parse_version(None) is None


def test_schedule_does_not_catch_up_unless_asked(fake):
    submit.main(["schedule", *DATA, "--namespace", "team-a", "--param", "seed=1"])
    submit.main(["schedule", *DATA, "--namespace", "team-a", "--catchup", "--cron", "0 30 1 * * *"])
    assert fake.names() == ["healthz", "create_experiment", "create_recurring_run"] * 2
    assert fake.calls[1][1:] == (("spnas",), {"namespace": "team-a"})
    common = {"experiment_id": "exp-1", "job_name": "spnas-retrain", "pipeline_package_path": str(submit.RETRAIN_PACKAGE),
              "max_concurrency": 1, "enable_caching": False}
    data = {"data_uri": "minio://datasets/coco"}
    assert fake.calls[2][2] == {**common, "cron_expression": "0 0 2 * * *", "params": {**data, "seed": 1},
                                "no_catchup": True}
    assert fake.calls[5][2] == {**common, "cron_expression": "0 30 1 * * *", "params": data, "no_catchup": False}


def test_schedule_schedules_the_retraining_pipeline_and_refuses_the_search(fake):
    """The NAS pipeline runs on demand: scheduling it is refused before any request unless
    --allow-search; the retraining pipeline is the default package of schedule (and run's is the
    NAS pipeline)."""
    assert submit.pipeline_name(submit.RETRAIN_PACKAGE) == "spnas-retrain"
    assert submit.pipeline_name(submit.PACKAGE) == submit.SEARCH_PIPELINE
    assert submit.build_parser().parse_args(["schedule"]).package == submit.RETRAIN_PACKAGE
    assert submit.build_parser().parse_args(["run"]).package == submit.PACKAGE
    with pytest.raises(SystemExit, match=r"--package .*spnas_pipeline.yaml: the SP-NAS search pipeline runs on "
                                         r"demand \(make run\); schedule the retraining pipeline"):
        submit.main(["schedule", *DATA, "--package", str(submit.PACKAGE)])
    assert fake.names() == []
    submit.main(["schedule", *DATA, "--package", str(submit.PACKAGE), "--allow-search"])
    assert fake.names() == ["healthz", "create_experiment", "create_recurring_run"]
    assert fake.calls[2][2]["pipeline_package_path"] == str(submit.PACKAGE)
    # the retraining pipeline's own parameters are typed from its compiled file
    submit.main(["schedule", *DATA, "--param", "margin=0.5", "--param", "model_name=detector"])
    assert fake.calls[-1][2]["params"] == {"data_uri": "minio://datasets/coco", "margin": 0.5, "model_name": "detector"}
    with pytest.raises(SystemExit, match="'gpus_per_task' is not a pipeline parameter"):
        submit.main(["schedule", *DATA, "--param", "gpus_per_task=1"])


def test_upload_goes_to_the_namespace(fake):
    submit.main(["upload", "--namespace", "team-a"])
    submit.main(["upload", "--namespace", "team-a", "--version", "v2"])
    assert fake.names() == ["healthz", "upload_pipeline", "healthz", "list_pipelines", "upload_pipeline_version"]
    assert fake.calls[1][1:] == ((str(submit.PACKAGE),), {"pipeline_name": "spnas", "namespace": "team-a"})
    listed = fake.calls[3][2]
    assert listed["namespace"] == "team-a" and json.loads(listed["filter"])["predicates"] == [
        {"operation": "EQUALS", "key": "display_name", "stringValue": "spnas"}]
    assert fake.calls[4][1:] == ((str(submit.PACKAGE),), {"pipeline_version_name": "v2", "pipeline_id": "p-1"})


def test_the_token_never_reaches_the_output(fake, monkeypatch, capsys, caplog):
    caplog.set_level("DEBUG")
    submit.main(["run", *DATA, "--token", TOKEN])                              # success
    fake.healthz = FakeApiException("401 " + TOKEN)                     # a reply that would echo it
    submit.main(["schedule", *DATA, "--token", TOKEN])
    fake.healthz = json.dumps(UI_2_5_0).encode()
    with pytest.raises(SystemExit) as refused:
        submit.main(["run", *DATA, "--token", TOKEN])
    with pytest.raises(SystemExit) as misplaced:                        # the token given as a --param by mistake
        submit.main(["run", *DATA, "--token", TOKEN, "--param", TOKEN])
    assert str(misplaced.value) == "--param '***' must look like name=value"
    monkeypatch.setenv("KFP_TOKEN", TOKEN)
    with pytest.raises(SystemExit):
        submit.main(["run", "--help"])
    out, err = capsys.readouterr()
    assert "bearer token from --token" in caplog.text                   # the log says which credentials, not what
    for text in (out, err, caplog.text, str(refused.value), str(misplaced.value)):
        assert TOKEN not in text


@pytest.mark.filterwarnings("ignore:This client only works:FutureWarning")
def test_a_real_client_sends_the_token_and_reads_the_version(monkeypatch, tmp_path):
    """kfp.Client itself (not the fake) against a local HTTP server: the healthz request carries the
    bearer token (given, then from the service-account file) and its tag_name is what is judged."""
    seen: list[str | None] = []
    status = {"code": 200}

    class Healthz(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            ok = self.path == "/apis/v2beta1/healthz" and status["code"] == 200
            body = json.dumps(dict(API_2_17_3, tag_name="2.5.0") if ok else {"error": "no"}).encode()
            self.send_response(200 if ok else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Healthz)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("KFP_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        c = submit.client("team-a", submit.Auth("--token", token=TOKEN))
        assert submit.read_healthz(c)["tag_name"] == "2.5.0"
        with pytest.raises(SystemExit, match="KFP backend 2.5.0 is too old"):
            submit.check_backend(c)
        token_file = tmp_path / "token"
        token_file.write_text("sa-token")
        submit.read_healthz(submit.client("team-a", submit.Auth("service account", token_path=token_file)))
        status["code"] = 404  # the real ApiException carries the status the warning names
        with pytest.raises(submit.BackendUnreadable, match="^healthz request failed: HTTP 404 Not Found$"):
            submit.read_healthz(c)
    finally:
        server.shutdown()
        server.server_close()
    assert seen == [f"Bearer {TOKEN}", f"Bearer {TOKEN}", "Bearer sa-token", f"Bearer {TOKEN}"]


def test_boolean_double_list_and_struct_parameters(tmp_path):
    package = tmp_path / "p.yaml"
    package.write_text(yaml.safe_dump({"root": {"inputDefinitions": {"parameters": {
        k: {"parameterType": t} for k, t in
        {"flag": "BOOLEAN", "lr": "NUMBER_DOUBLE", "xs": "LIST", "cfg": "STRUCT", "name": "STRING"}.items()}}}}))
    got = submit.parse_params(["flag=True", "lr=0.5", "xs=[1, 2]", 'cfg={"a": 1}', "name=true"], package)
    assert got == {"flag": True, "lr": 0.5, "xs": [1, 2], "cfg": {"a": 1}, "name": "true"}
    assert type(got["flag"]) is bool and type(got["lr"]) is float and type(got["name"]) is str
    assert submit.parse_params(["flag=false"], package) == {"flag": False}
    for bad, kind in [("flag=yes", "boolean"), ("xs={}", "list"), ("cfg=[1]", "struct"), ("cfg={", "struct")]:
        with pytest.raises(SystemExit, match=f"is not a {kind}"):
            submit.parse_params([bad], package)


def test_a_run_or_schedule_without_the_data_set_is_refused_before_any_request(fake):
    """data_uri has no default in the compiled pipeline: submit names it before it talks to the
    server (which would refuse the run only after the fact); upload needs no parameters."""
    assert submit.required_parameters() == ["data_uri"]
    for cmd in ("run", "schedule"):
        with pytest.raises(SystemExit, match=r"^pipeline parameter data_uri required: --param data_uri=\.\.\. "
                                             r"\(the data set's s3:// or minio:// URI\)$"):
            submit.main([cmd, "--param", "seed=1"])
    assert fake.calls == [] and fake.inits == []
    submit.main(["upload"])
    assert fake.names() == ["healthz", "upload_pipeline"]


def test_a_multi_node_full_train_without_gpus_is_refused_before_any_request(fake):
    """full_train_nodes > 1 needs full_train_gpus_per_node >= 1 (the compiled default is 0):
    submit says so before it talks to the server."""
    for cmd in (["run"], ["schedule", "--package", str(submit.PACKAGE), "--allow-search"]):
        with pytest.raises(SystemExit, match=r"full_train_nodes=2, full_train_gpus_per_node=0: a full train on "
                                             r"several nodes runs one process per GPU"):
            submit.main([*cmd, "--param", "data_uri=s3://b/d", "--param", "full_train_nodes=2"])
    assert fake.calls == [] and fake.inits == []
    submit.main(["run", "--param", "data_uri=s3://b/d", "--param", "full_train_nodes=2",
                 "--param", "full_train_gpus_per_node=4"])
    assert "create_run_from_pipeline_package" in fake.names()
