"""The cluster half of distributed training, without a cluster: the Kubeflow Trainer TrainJob a
multi-node full train creates (typed models, serialised, checked field by field), its creation
and wait loop against a fake ``CustomObjectsApi`` and recorded status sequences (an injected
clock: nothing sleeps), the pods' data-parallel wiring (``nproc`` = the pod's GPUs), the
multi-node full-train task end to end with a fake controller, and the compiled pipeline's new
parameters."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import DEMO, ROOT
from kubernetes.client.exceptions import ApiException

from spnas.orchestration import pods
from spnas.orchestration import trainjob as tj
from spnas.utils.errors import ConfigError

RUN = "3f1c9a52-7d0e-4c1b-9a57-0b8d6f2e4a11"  # a KFP run's id
WORKFLOW = "spnas-x7k2p"  # its resource name (the Argo workflow's)
CLAIM = f"{WORKFLOW}-kfp-workspace"
CALL, RESULT = "/kfp-workspace/spnas/trainjobs/fully_train/7/call.json", "/kfp-workspace/spnas/trainjobs/fully_train/7/result.json"


def _plan(**over) -> tj.TrainJobPlan:
    """The TrainJob of a 2 nodes x 4 GPUs full train of model 7 in namespace team-a."""
    fields = dict(name=tj.job_name(RUN, "fully_train", 7), namespace="team-a", image="registry.example.com/ml/spnas:0.1.0",
                  nodes=2, gpus_per_node=4, claim=CLAIM, mount_path="/kfp-workspace",
                  args=("-m", "spnas.training.launch", CALL, RESULT), accelerator="nvidia.com/gpu", cpu="16",
                  memory="64Gi", shm_size="8Gi", labels=tj.run_labels(RUN, "fully_train", 7, WORKFLOW),
                  node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                  tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                  image_pull_secret="regcred", deadline_seconds=604200)
    return tj.TrainJobPlan(**{**fields, **over})


# ----------------------------------------------------------------------------- the TrainJob

def test_the_trainjob_for_2_nodes_of_4_gpus_field_by_field():
    """What the API server receives: the typed models of kubeflow-trainer-api 2.3.0 serialised
    with the API's field names; runtimePatches is the pod-override field of that release."""
    import kubeflow_trainer_api
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob
    assert kubeflow_trainer_api.__version__ == "2.3.0"
    plan = _plan()
    typed = tj.build(plan)
    assert isinstance(typed, TrainerV1alpha1TrainJob)
    body = tj.manifest(plan)
    name = plan.name
    labels = {"spnas-kfp.io/run": RUN, "spnas-kfp.io/step": "fully_train", "spnas-kfp.io/model": "7",
              "spnas-kfp.io/workflow": WORKFLOW}
    assert set(body) == {"apiVersion", "kind", "metadata", "spec"}
    assert (body["apiVersion"], body["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    assert body["metadata"] == {"name": name, "namespace": "team-a", "labels": labels}
    spec = body["spec"]
    assert set(spec) == {"runtimeRef", "trainer", "runtimePatches", "activeDeadlineSeconds"}
    assert spec["runtimeRef"] == {"name": "torch-distributed", "kind": "ClusterTrainingRuntime",
                                  "apiGroup": "trainer.kubeflow.org"}
    assert spec["activeDeadlineSeconds"] == 604200
    per_node = {"nvidia.com/gpu": "4", "cpu": "16", "memory": "64Gi"}
    assert spec["trainer"] == {"image": "registry.example.com/ml/spnas:0.1.0", "command": ["torchrun"],
                               "args": ["-m", "spnas.training.launch", CALL, RESULT], "numNodes": 2,
                               "numProcPerNode": 4, "resourcesPerNode": {"limits": per_node, "requests": per_node}}
    assert "env" not in spec["trainer"]  # torchrun's PET_* come from the runtime; the trainer may not set them
    [patch] = spec["runtimePatches"]
    assert patch["manager"] == "spnas-kfp.io/pipeline" and set(patch) == {"manager", "trainingRuntimeSpec"}
    [job] = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert job["name"] == "node" and set(job["template"]) == {"spec"}
    pod = job["template"]["spec"]["template"]
    assert pod["metadata"] == {"labels": labels}
    assert pod["spec"] == {
        "containers": [{"name": "node", "volumeMounts": [{"name": "spnas-shared", "mountPath": "/kfp-workspace"},
                                                         {"name": "dshm", "mountPath": "/dev/shm"}]}],
        "volumes": [{"name": "spnas-shared", "persistentVolumeClaim": {"claimName": CLAIM}},
                    {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}],
        "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "imagePullSecrets": [{"name": "regcred"}]}
    # every field is one the models define: parsed back and serialised again, nothing is lost
    assert TrainerV1alpha1TrainJob.from_dict(body).to_dict() == body
    assert json.loads(json.dumps(body)) == body
    text = json.dumps(body)
    assert "podTemplateOverrides" not in text and "podSpecOverrides" not in text
    assert plan.world_size == 8


def test_a_plan_without_optional_settings_leaves_them_out():
    body = tj.manifest(_plan(node_selector={}, tolerations=(), image_pull_secret="", deadline_seconds=None, cpu="",
                             memory="", labels={}))
    assert "activeDeadlineSeconds" not in body["spec"] and "labels" not in body["metadata"]
    assert body["spec"]["trainer"]["resourcesPerNode"] == {"limits": {"nvidia.com/gpu": "4"},
                                                           "requests": {"nvidia.com/gpu": "4"}}
    pod = body["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert set(pod["template"]["spec"]["template"]) == {"spec"}
    assert set(pod["template"]["spec"]["template"]["spec"]) == {"containers", "volumes"}


def test_names_and_labels():
    import re
    a = tj.job_name(RUN, "fully_train", 7)
    assert a == tj.job_name(RUN, "fully_train", 7)  # a retried task finds its job
    assert re.fullmatch(r"spnas-fully-train-7-[0-9a-f]{10}", a)
    others = {tj.job_name(RUN, "fully_train", 8), tj.job_name("spnas-other", "fully_train", 7),
              tj.job_name(RUN, "full", 7)}
    assert len(others | {a}) == 4
    long = tj.job_name("r" * 200, "A_Very_Long Step Name!" * 5, "x" * 90)
    assert len(long) <= 63 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", long), long
    assert len(f"{long}-node-0-0") <= 63  # the runtime's pod hostnames
    assert tj.run_labels("run:1/" + "z" * 80, "fully train", "-7-") == {
        "spnas-kfp.io/run": "run-1-" + "z" * 57, "spnas-kfp.io/step": "fully-train", "spnas-kfp.io/model": "7"}
    assert "spnas-kfp.io/workflow" not in tj.run_labels(RUN, "fully_train", 7)


def _pod(mount_path="/kfp-workspace", claim=CLAIM, labels=None):
    """A KFP executor pod as the API returns it: the workspace claim mounted in its main container."""
    from kubernetes import client as k
    return k.V1Pod(
        metadata=k.V1ObjectMeta(name="spnas-x7k2p-system-container-impl-1234", namespace="team-a",
                                labels={"workflows.argoproj.io/workflow": WORKFLOW} if labels is None else labels),
        spec=k.V1PodSpec(
            containers=[k.V1Container(name="main", volume_mounts=[
                k.V1VolumeMount(name="dshm", mount_path="/dev/shm"),
                k.V1VolumeMount(name="kfp-workspace", mount_path=mount_path)])],
            volumes=[k.V1Volume(name="dshm", empty_dir=k.V1EmptyDirVolumeSource(medium="Memory")),
                     k.V1Volume(name="kfp-workspace",
                                persistent_volume_claim=k.V1PersistentVolumeClaimVolumeSource(claim_name=claim))]))


class FakeCore:
    """A ``CoreV1Api`` that answers ``read_namespaced_pod`` with one pod (or an error)."""

    def __init__(self, pod):
        self.pod, self.calls = pod, []

    def read_namespaced_pod(self, name, namespace):
        self.calls.append((name, namespace))
        if isinstance(self.pod, BaseException):
            raise self.pod
        return self.pod


def test_the_shared_volumes_claim_and_the_workflow_come_from_the_pods_own_spec(monkeypatch):
    """The claim a TrainJob mounts is the one this pod has at the workspace's path (the KFP
    workspace, or a --data-volume claim), read from its own pod object ($KFP_POD_NAME)."""
    monkeypatch.setenv("KFP_POD_NAME", "spnas-x7k2p-system-container-impl-1234")
    core = FakeCore(_pod())
    pod = tj.this_pod(core, "team-a")
    assert core.calls == [("spnas-x7k2p-system-container-impl-1234", "team-a")]
    assert tj.claim_at(pod, "/kfp-workspace") == tj.claim_at(pod, "/kfp-workspace/") == CLAIM
    assert tj.workflow_of(pod) == WORKFLOW and tj.workflow_of(_pod(labels={})) == ""
    assert tj.claim_at(_pod("/spnas-data", "coco-data"), "/spnas-data") == "coco-data"
    with pytest.raises(tj.TrainJobError, match=r"no persistent volume claim is mounted at /elsewhere in pod spnas-x7k2p"):
        tj.claim_at(pod, "/elsewhere")
    with pytest.raises(tj.TrainJobError, match=r"/dev/shm"):
        tj.claim_at(pod, "/dev/shm")  # mounted, but no claim
    with pytest.raises(tj.TrainJobError, match=r"reading this pod team-a/p to find the run's shared volume failed: 403 Forbidden \(the pipeline's "
                                               r"service account needs get on pods"):
        tj.this_pod(FakeCore(ApiException(status=403, reason="Forbidden")), "team-a", "p")


@pytest.mark.parametrize("nodes, gpus, shared, message", [
    (2, 0, True, r"full_train_nodes=2, full_train_gpus_per_node=0: a full train on several nodes runs one process "
                 r"per GPU of each node; set full_train_gpus_per_node >= 1"),
    (0, 4, True, r"pipeline parameter full_train_nodes: must be an integer >= 1, got 0"),
    (2, -1, True, r"pipeline parameter full_train_gpus_per_node: must be an integer >= 0, got -1"),
    (3, 8, False, r"full_train_nodes=3: the nodes of a TrainJob share .* --data-volume none"),
])
def test_a_multi_node_full_train_without_gpus_or_a_shared_volume_is_refused(nodes, gpus, shared, message):
    with pytest.raises(ConfigError, match=message):
        tj.check_shape(nodes, gpus, shared)


def test_valid_shapes():
    assert tj.check_shape(1, 0) == (1, 0)
    assert tj.check_shape(1, 0, shared_volume=False) == (1, 0)
    assert tj.check_shape(2.0, 4.0) == (2, 4)  # KFP structs deliver numbers as floats
    assert tj.check_shape(4, 8) == (4, 8)


# ----------------------------------------------------------------------------- the API and the wait loop

def _cond(kind, reason="", message="", status="True"):
    return {"type": kind, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": "2026-12-03T10:00:00Z"}


def _obj(*conditions, jobs=None):
    status = {}
    if conditions:
        status["conditions"] = list(conditions)
    if jobs:
        status["jobsStatus"] = jobs
    return {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
            "metadata": {"name": "job", "namespace": "team-a"}, "status": status}


CREATED = _obj()  # Trainer v2 sets no condition until the job finishes or is suspended
RUNNING = _obj(jobs=[{"name": "node", "active": 2, "ready": 2, "succeeded": 0, "failed": 0, "suspended": 0}])
SUSPENDED = _obj(_cond("Suspended", "Suspended", "TrainJob is suspended"))
RESUMED = _obj(_cond("Suspended", "Resumed", "TrainJob is resumed", status="False"))
COMPLETE = _obj(_cond("Complete", "JobSetCompleted", "jobset completed successfully"),
                jobs=[{"name": "node", "active": 0, "ready": 0, "succeeded": 2, "failed": 0, "suspended": 0}])
FAILED = _obj(_cond("Failed", "FailedJobs", "ReplicatedJob node has failed (exit code 137, OOMKilled)"))


class FakeApi:
    """A ``CustomObjectsApi`` that records every call and answers ``get`` from a recorded
    sequence of objects (the last one repeats); an exception in the sequence is raised."""

    def __init__(self, sequence=(), create_error=None, delete_error=None):
        self.sequence, self.create_error, self.delete_error = list(sequence), create_error, delete_error
        self.calls = []

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.calls.append(("create", group, version, namespace, plural, body["metadata"]["name"]))
        self.body = body
        if self.create_error is not None:
            error, self.create_error = self.create_error, None
            raise error
        return body

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.calls.append(("get", group, version, namespace, plural, name))
        item = self.sequence.pop(0) if len(self.sequence) > 1 else self.sequence[0]
        if isinstance(item, BaseException):
            raise item
        return item

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, propagation_policy=None):
        self.calls.append(("delete", group, version, namespace, plural, name, propagation_policy))
        if self.delete_error is not None:
            raise self.delete_error

    def verbs(self):
        return [c[0] for c in self.calls]


class Clock:
    """A clock that only moves when the code under test sleeps."""

    def __init__(self):
        self.now, self.sleeps = 1000.0, []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


def test_creation_goes_to_the_namespace_with_the_serialised_trainjob():
    api, plan = FakeApi([COMPLETE]), _plan()
    tj.create(api, tj.manifest(plan))
    assert api.calls == [("create", "trainer.kubeflow.org", "v1alpha1", "team-a", "trainjobs", plan.name)]
    assert api.body == tj.manifest(plan)


@pytest.mark.parametrize("sequence, sleeps", [
    ([CREATED, RUNNING, RUNNING, COMPLETE], [30, 30, 30]),
    ([SUSPENDED, RESUMED, RUNNING, COMPLETE], [30, 30, 30]),  # queued by Kueue, then admitted
    ([CREATED, ApiException(status=503, reason="Service Unavailable"), COMPLETE], [30, 30]),  # an API hiccup
])
def test_the_wait_loop_returns_the_completed_job(sequence, sleeps):
    api, clock = FakeApi(sequence), Clock()
    done = tj.wait(api, "job", "team-a", timeout=3600, poll=30, clock=clock, sleep=clock.sleep)
    assert tj.job_state(done).phase == "Complete" and done is COMPLETE
    assert clock.sleeps == sleeps and api.verbs() == ["get"] * len(sequence)


def test_a_failed_job_surfaces_its_reason_and_message_and_is_kept_for_its_logs():
    api, clock = FakeApi([CREATED, RUNNING, FAILED]), Clock()
    with pytest.raises(tj.TrainJobFailed) as info:
        tj.run(api, _plan(), timeout=3600, poll=30, clock=clock, sleep=clock.sleep)
    err = info.value
    assert (err.reason, err.message) == ("FailedJobs", "ReplicatedJob node has failed (exit code 137, OOMKilled)")
    name = _plan().name
    assert str(err) == (f"TrainJob team-a/{name} failed: FailedJobs: ReplicatedJob node has failed (exit code 137, "
                        f"OOMKilled) (its pods' logs: kubectl -n team-a logs -l jobset.sigs.k8s.io/jobset-name={name} "
                        "--prefix)")
    assert api.verbs() == ["create", "get", "get", "get"]  # no delete
    assert clock.sleeps == [30, 30]


def test_a_job_that_never_finishes_times_out_and_is_deleted():
    api, clock = FakeApi([CREATED, RUNNING]), Clock()
    with pytest.raises(tj.TrainJobTimeout, match=r"did not finish within 100 s \(last seen: Pending\)"):
        tj.run(api, _plan(), timeout=100, poll=30, clock=clock, sleep=clock.sleep)
    assert clock.sleeps == [30, 30, 30, 10] and clock.now == 1100.0
    assert api.verbs() == ["create"] + ["get"] * 5 + ["delete"]
    assert api.calls[-1] == ("delete", "trainer.kubeflow.org", "v1alpha1", "team-a", "trainjobs", _plan().name,
                             "Background")


def test_a_completed_job_is_deleted_and_a_stopped_watcher_deletes_its_job():
    api, clock = FakeApi([RUNNING, COMPLETE]), Clock()
    assert tj.run(api, _plan(), timeout=3600, poll=30, clock=clock, sleep=clock.sleep) is COMPLETE
    assert api.verbs() == ["create", "get", "get", "delete"]

    def stopped(_seconds):
        raise KeyboardInterrupt  # SIGTERM, turned into SystemExit by the pod, goes the same way
    api = FakeApi([RUNNING])
    with pytest.raises(KeyboardInterrupt):
        tj.run(api, _plan(), timeout=3600, poll=30, clock=clock, sleep=stopped)
    assert api.verbs() == ["create", "get", "delete"]


def test_a_vanished_job_or_an_api_down_for_long_are_typed_errors_and_the_job_is_left():
    api, clock = FakeApi([RUNNING, ApiException(status=404, reason="Not Found")]), Clock()
    with pytest.raises(tj.TrainJobError, match=r"TrainJob team-a/job disappeared while it was watched"):
        tj.wait(api, "job", "team-a", timeout=3600, clock=clock, sleep=clock.sleep)
    api = FakeApi([ApiException(status=500, reason="Internal Server Error")])
    with pytest.raises(tj.TrainJobError, match=r"watching TrainJob team-a/job: the API server answered 500 Internal"):
        tj.wait(api, "job", "team-a", timeout=10 ** 6, poll=30, max_errors=3, clock=clock, sleep=clock.sleep)
    assert api.verbs() == ["get"] * 3


def test_a_retried_task_adopts_a_running_job_and_replaces_a_failed_one():
    conflict = ApiException(status=409, reason="Conflict")
    api, clock = FakeApi([RUNNING], create_error=conflict), Clock()
    assert tj.create(api, tj.manifest(_plan()), clock=clock, sleep=clock.sleep) is RUNNING
    assert api.verbs() == ["create", "get"]
    gone = ApiException(status=404, reason="Not Found")
    api = FakeApi([FAILED, FAILED, gone], create_error=ApiException(status=409, reason="Conflict"))
    tj.create(api, tj.manifest(_plan()), poll=2, clock=clock, sleep=clock.sleep)
    assert api.verbs() == ["create", "get", "delete", "get", "get", "create"]


@pytest.mark.parametrize("status, reason, hint", [
    (403, "Forbidden", "the pipeline's service account needs create/get/delete on trainjobs.trainer.kubeflow.org"),
    (404, "Not Found", "is Kubeflow Trainer v2 installed, with its TrainJob CRD?"),
    (422, "Unprocessable Entity", ""),
])
def test_a_refused_creation_is_a_typed_error_naming_the_job(status, reason, hint):
    api = FakeApi([CREATED], create_error=ApiException(status=status, reason=reason))
    with pytest.raises(tj.TrainJobError) as info:
        tj.create(api, tj.manifest(_plan()))
    assert str(info.value).startswith(f"creating TrainJob team-a/{_plan().name}: the API server answered {status} {reason}")
    assert hint in str(info.value)


# ----------------------------------------------------------------------------- pods: data-parallel wiring

@pytest.fixture(scope="module")
def config_text():
    return DEMO.read_text()


def _item(run_uri, **rec):
    return {"id": 7, "desc": {"backbone": {"code": "1-2-2-2"}}, "weights": "", "parent": 3, "lineage_iters": 40,
            **rec, "run_uri": run_uri, "overrides": "[]"}


def _fake_training(out, arch_id, calls, kwargs, **perf_extra):
    """What a phase function leaves behind: the model's files in ``out``; its record."""
    calls.append(kwargs)
    out = Path(out)
    (out / f"desc_{arch_id}.json").write_text(json.dumps({"backbone": {"code": "1-2-2-2"}}))
    (out / f"performance_{arch_id}.json").write_text(json.dumps({"mAP": 50.0, **perf_extra}))
    (out / f"model_{arch_id}.pth").write_bytes(b"weights")
    return {"id": arch_id, "status": "ok", "metrics": {"mAP": 50.0}, "desc": {}, "weights": str(out / f"model_{arch_id}.pth"),
            "lineage_iters": 100, "iters": 60}


@pytest.mark.parametrize("gpus, nproc", [(0, 1), (1, 1), (4, 4), (8.0, 8)])
def test_every_pod_training_runs_one_process_per_gpu(config_text, tmp_path, monkeypatch, gpus, nproc):
    """fine_tune, a candidate, the full train, both controls and reignition pass ``nproc`` = the pod's GPUs
    (1 for 0 or 1 GPU) to their phase function."""
    import spnas.search
    from spnas.orchestration import phases, steps
    calls = []

    def fine_tune(step, data, out, **kw):
        rec = _fake_training(out, 0, calls, kw)
        (Path(out) / "output.csv").write_text("x\n")
        return {"record": rec}

    def train_candidate(cand, step, data, out, **kw):
        return _fake_training(out, cand["id"], calls, kw)

    def full_train(models, step, data, out, **kw):
        return [_fake_training(out, models[0]["id"], calls, kw)]

    def control(name, desc, weights, trainers, data, out, **kw):
        return {**_fake_training(out, "control_0", calls, kw), "generations": 1}

    def reignition(models, step, out, **kw):
        return [_fake_training(out, models[0]["id"], calls, kw)]
    for name, fn in [("fine_tune", fine_tune), ("train_candidate", train_candidate), ("full_train", full_train),
                     ("control", control), ("reignition", reignition), ("measure_costs", lambda rec, *a: dict(rec))]:
        monkeypatch.setattr(phases, name, fn)
    monkeypatch.setattr(spnas.search, "records", lambda state: [])
    monkeypatch.setattr(steps, "phase_control_plan", lambda recs, objectives=(): {"seed": {"desc": {}, "weights": "w", "id": 0},
                                                                   "generations": 1, "best": {"id": 5}, "iters": 60})
    run = str(tmp_path / "run")
    pods.fine_tune(config_text, "fine_tune", "/data", run, str(tmp_path / "ft.pth"), gpus=gpus)
    pods.train_candidate_here(config_text, "serial", _item(run), "/data", str(tmp_path / "c.pth"),
                              nproc=pods.ddp_processes(gpus))
    pods.full_train_one(config_text, "fully_train", _item(run), "/data", str(tmp_path / "f.pth"), gpus=gpus)
    pods.phase_control(config_text, "serial", {"records": []}, "/data", run, str(tmp_path / "pc.pth"), gpus=gpus)
    seed = {"id": 0, "desc": {"backbone": {"code": "1-2-2-2"}, "neck": {"code": [0, 0, 0, 0]}}, "weights": "w", "parent": None}
    pods.final_control(config_text, "fully_train", [seed], {"desc": {}, "lineage_iters": 100}, "/data", run,
                       str(tmp_path / "fc.pth"), gpus=gpus)
    pods.reignite_one(config_text, "reignition", _item(run), "/data", str(tmp_path / "r.pth"), gpus=gpus)
    assert [c["nproc"] for c in calls] == [nproc] * 6


def test_a_candidate_pod_hands_its_gpu_count_to_its_training_child(config_text, tmp_path, monkeypatch):
    from spnas.orchestration import child
    sent = []
    monkeypatch.setattr(child, "run_isolated", lambda fn, kwargs, **kw: sent.append((fn, kwargs)) or {"id": 7})
    pods.train_candidate(config_text, "serial", _item(str(tmp_path)), "/data", str(tmp_path / "m"), gpus=4)
    assert sent[0][0] == "train_candidate_here" and sent[0][1]["nproc"] == 4


def _artifacts(tmp_path, name):
    from kfp.dsl import Metrics, Model
    return (Model(name="model", uri=str(tmp_path / "art" / name / "model"), metadata={}),
            Metrics(name="metrics", uri=str(tmp_path / "art" / name / "metrics"), metadata={}))


def test_the_model_artifact_records_the_world_size_beside_the_pods_resources(config_text, tmp_path, monkeypatch):
    from kfp.dsl import Dataset

    from spnas.orchestration import phases
    calls = []
    monkeypatch.setattr(phases, "full_train", lambda models, step, data, out, **kw: [
        _fake_training(out, models[0]["id"], calls, kw)])
    dataset = Dataset(name="dataset", uri=str(tmp_path / "dataset"), metadata={"root": "/data", "version": "v" * 16})
    model, metrics = _artifacts(tmp_path, "one-pod")
    res = {"accelerator": "nvidia.com/gpu", "gpus": 4, "cpu": "32", "memory": "128G"}
    pods.full_train_task(config_text, "fully_train", _item(str(tmp_path / "run")), dataset, "", model, metrics, res)
    assert calls[0]["nproc"] == 4
    assert model.metadata["resources"] == res and model.metadata["world_size"] == 4
    assert "trainjob" not in model.metadata


# ----------------------------------------------------------------------------- the multi-node full train

class FakeController(FakeApi):
    """The Trainer controller and rank 0, faked: creating the TrainJob "trains" it (rank 0's
    files and result written where the call says), then it reads Complete."""

    def __init__(self):
        super().__init__([COMPLETE])
        self.trained = 0

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        out = super().create_namespaced_custom_object(group, version, namespace, plural, body)
        call_path, result_path = body["spec"]["trainer"]["args"][-2:]
        call = json.loads(Path(call_path).read_text())
        self.call = call
        out_dir, arch_id = Path(call["out_dir"]), call["arch_id"]
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"desc_{arch_id}.json").write_text(json.dumps({"backbone": {"code": "1-2-2-2"}, "num_classes": 4}))
        (out_dir / f"performance_{arch_id}.json").write_text("{}")
        (out_dir / f"model_{arch_id}.pth").write_bytes(b"trained on 8 GPUs")
        (out_dir / f"train_{arch_id}").mkdir(exist_ok=True)
        perf = {"mAP": 61.0, "AP50": 90.0, "params": 2_390_000, "gflops": 0.24, "iters": 500, "images": 8000,
                "train_seconds": 321.0, "world_size": 8, "global_batch": 32}
        Path(result_path).write_text(json.dumps(perf))
        self.trained += 1
        return out


def test_a_multi_node_full_train_creates_a_trainjob_and_reads_rank_0s_result(config_text, tmp_path, monkeypatch):
    """The full-train task with full_train_nodes=2: the call, the data and the initial weights
    are put on the run's workspace, the TrainJob mounts that workspace's claim at the same path
    and runs torchrun on the call; rank 0's result becomes the record and the Model artifact, as
    the single-pod full train makes them; a retried task reads the result back and creates
    nothing."""
    from kfp.dsl import Dataset
    workspace, run = tmp_path / "kfp-workspace", tmp_path / "results" / RUN
    data = workspace / "data"  # a data set on the shared volume (a URI would be read from its staged copy)
    for sub in ("annotations", "train2017", "val2017"):
        (data / sub).mkdir(parents=True)
    parent = tmp_path / "parent.pth"
    parent.write_bytes(b"parent weights")
    ns = tmp_path / "namespace"
    ns.write_text("team-a\n")
    monkeypatch.setattr(pods, "NAMESPACE_FILE", str(ns))
    api, core = FakeController(), FakeCore(_pod(str(workspace)))
    monkeypatch.setattr(tj, "custom_objects_api", lambda: api)
    monkeypatch.setattr(tj, "core_v1_api", lambda: core)
    dataset = Dataset(name="dataset", uri=str(tmp_path / "dataset"), metadata={"root": str(data), "version": "v" * 16})
    res = {"accelerator": "nvidia.com/gpu", "gpus": 0, "cpu": "16", "memory": "64Gi"}
    cluster = {"image": "registry.example.com/ml/spnas:0.1.0", "shm_size": "8Gi", "image_pull_secret": "",
               "time_limit": 604200, "node_selector": {}, "tolerations": []}
    item = _item(str(run), weights=str(parent))
    model, metrics = _artifacts(tmp_path, "multi")
    rec = pods.full_train_task(config_text, "fully_train", item, dataset, str(workspace), model, metrics, res,
                               nodes=2, gpus_per_node=4, cluster=cluster)

    name = tj.job_name(RUN, "fully_train", 7)
    assert api.verbs() == ["create", "get", "delete"]  # created, Complete at the first look, deleted
    spec = api.body["spec"]
    assert spec["trainer"]["numNodes"] == 2 and spec["trainer"]["numProcPerNode"] == 4
    assert spec["trainer"]["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": "4", "cpu": "16", "memory": "64Gi"}
    job_dir = workspace / "spnas" / "trainjobs" / "fully_train" / "7"
    assert spec["trainer"]["command"] == ["torchrun"]
    assert spec["trainer"]["args"] == ["-m", "spnas.training.launch", str(job_dir / "call.json"), str(job_dir / "result.json")]
    pod = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert pod["template"]["spec"]["volumes"][0] == {"name": "spnas-shared", "persistentVolumeClaim": {"claimName": CLAIM}}
    assert pod["template"]["spec"]["containers"][0]["volumeMounts"][0] == {"name": "spnas-shared",
                                                                           "mountPath": str(workspace)}
    assert api.body["metadata"] == {"name": name, "namespace": "team-a", "labels": {
        "spnas-kfp.io/run": RUN, "spnas-kfp.io/step": "fully_train", "spnas-kfp.io/model": "7",
        "spnas-kfp.io/workflow": WORKFLOW}}
    assert spec["activeDeadlineSeconds"] == 604200
    # the call every rank reads: all on the shared volume
    call = api.call
    assert call["out_dir"] == str(job_dir / "out") and call["arch_id"] == 7 and call["resume"] is True
    assert call["data"]["root"] == str(data) and call["init"] == str(job_dir / "init.pth")
    assert (job_dir / "init.pth").read_bytes() == b"parent weights"
    assert call["desc"] == item["desc"]
    # rank 0's result as the single-pod full train's record
    assert rec["id"] == 7 and rec["status"] == "ok" and rec["parent"] == 7 and rec["phase"] == "fully_train"
    assert rec["metrics"]["mAP"] == 61.0 and rec["params"] == 2_390_000 and rec["iters"] == 500
    assert rec["seconds"] == 321.0 and rec["lineage_iters"] == 40 + 500
    assert rec["weights"] == model.uri and Path(model.path).read_bytes() == b"trained on 8 GPUs"
    assert model.metadata["world_size"] == 8 and model.metadata["resources"] == res
    assert model.metadata["trainjob"] == {"trainjob": f"team-a/{name}", "nodes": 2, "gpus_per_node": 4}
    assert model.metadata["status"] == "ok" and model.metadata["data_version"] == "v" * 16
    assert json.loads((run / "fully_train" / "desc_7.json").read_text())["num_classes"] == 4  # published
    assert not (job_dir / "out" / "train_7").exists()  # the checkpoints go once the result is read

    # the task retried after the job completed: the result is read back, no second TrainJob
    model2, metrics2 = _artifacts(tmp_path, "retried")
    again = pods.full_train_task(config_text, "fully_train", item, dataset, str(workspace), model2, metrics2, res,
                                 nodes=2, gpus_per_node=4, cluster=cluster)
    assert api.trained == 1 and again == rec | {"weights": model2.uri}


def test_a_multi_node_full_train_refuses_data_off_the_shared_volume(config_text, tmp_path, monkeypatch):
    from kfp.dsl import Dataset
    ns = tmp_path / "namespace"
    ns.write_text("team-a\n")
    monkeypatch.setattr(pods, "NAMESPACE_FILE", str(ns))
    dataset = Dataset(name="dataset", uri=str(tmp_path / "dataset"), metadata={"root": str(tmp_path / "elsewhere")})
    model, metrics = _artifacts(tmp_path, "off")
    with pytest.raises(tj.TrainJobError, match=r"the data set .*elsewhere is not on the run's shared volume"):
        pods.full_train_task(config_text, "fully_train", _item(str(tmp_path / "run")), dataset, str(tmp_path / "ws"),
                             model, metrics, {"gpus": 0}, nodes=2, gpus_per_node=4, cluster={})


# ----------------------------------------------------------------------------- the compiled pipeline

def _compiled():
    return list(yaml.safe_load_all((ROOT / "pipelines" / "spnas_pipeline.yaml").read_text()))


def test_the_compiled_pipeline_has_the_full_train_shape_parameters():
    from pipelines.spnas_pipeline import TIMEOUTS, candidate_time_limit
    spec = _compiled()[0]
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["full_train_nodes"] == {"defaultValue": 1.0, "isOptional": True, "parameterType": "NUMBER_INTEGER"}
    assert params["full_train_gpus_per_node"] == {"defaultValue": 0.0, "isOptional": True,
                                                  "parameterType": "NUMBER_INTEGER"}
    prepare = spec["root"]["dag"]["tasks"]["prepare"]["inputs"]["parameters"]
    assert prepare["full_train_nodes"] == {"componentInputParameter": "full_train_nodes"}
    assert prepare["full_train_gpus_per_node"] == {"componentInputParameter": "full_train_gpus_per_node"}
    assert prepare["shared_volume"] == {"runtimeValue": {"constant": True}}
    [task] = [t for c in spec["components"].values() if "dag" in c for t in c["dag"]["tasks"].values()
              if t["componentRef"]["name"] == "comp-full-train"]
    inputs = task["inputs"]["parameters"]
    assert inputs["full_train_nodes"] == {"componentInputParameter": "pipelinechannel--full_train_nodes"}
    assert inputs["node_selector"] == {"componentInputParameter": "pipelinechannel--node_selector"}
    assert json.loads(inputs["trainjob"]["runtimeValue"]["constant"]) == {
        "image": "ghcr.io/spnas-kfp/spnas:0.1.0", "image_pull_secret": "", "shm_size": "2Gi",
        "time_limit": candidate_time_limit(TIMEOUTS["long"])}
    assert "{{$.pipeline_job_resource_name}}" not in json.dumps(spec)  # kfp.local cannot resolve it


def test_a_multi_node_default_without_gpus_is_refused_at_compile_time_and_any_run_at_its_first_task():
    from components.spnas_components import prepare  # the component's function, as its pod runs it
    from pipelines.spnas_pipeline import build_pipeline
    with pytest.raises(SystemExit, match=r"--full-train-nodes 2 --full-train-gpus-per-node 0: pipeline parameters "
                                         r"full_train_nodes=2, full_train_gpus_per_node=0"):
        build_pipeline(DEMO, full_train_nodes=2, full_train_gpus_per_node=0)
    with pytest.raises(SystemExit, match=r"--data-volume none"):
        build_pipeline(DEMO, full_train_nodes=2, full_train_gpus_per_node=4, data_volume="none")
    text = DEMO.read_text()
    with pytest.raises(ConfigError, match=r"full_train_nodes=4, full_train_gpus_per_node=0"):
        prepare(config=text, seed=0, candidate_epochs=-1, full_epochs=-1, full_train_nodes=4,
                            full_train_gpus_per_node=0)
    assert json.loads(prepare(config=text, seed=0, candidate_epochs=-1, full_epochs=-1, full_train_nodes=4,
                                          full_train_gpus_per_node=8)) == ["general.seed=0"]
