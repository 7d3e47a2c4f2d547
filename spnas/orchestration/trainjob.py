"""A training across several nodes as a Kubeflow Trainer v2 ``TrainJob`` (no kfp here).

The full-train pod of a pipeline run with ``full_train_nodes > 1`` does not train: it writes the
training's call into the run's shared volume, creates a ``TrainJob`` on the ``torch-distributed``
ClusterTrainingRuntime (:func:`build`, from the typed models of ``kubeflow-trainer-api``), waits for
it (:func:`wait`) and reads rank 0's result back from the volume. Every node runs the project's
image with ``torchrun -m spnas.training.launch CALL RESULT`` and mounts the claim the pod finds
mounted at the volume's path in its own spec (:func:`claim_at`; the KFP backend names a run's
workspace claim after the run, an internal this module does not rely on).

Facts this module relies on, read in the sources of Kubeflow Trainer v2.3.0 (the release of the
pinned ``kubeflow-trainer-api==2.3.0``) and torch 2.14.1:

- the API: group ``trainer.kubeflow.org``, version ``v1alpha1``, plural ``trainjobs``; a TrainJob
  finishes with a condition ``Complete`` or ``Failed`` of status ``True`` (``Suspended`` while
  queued or suspended; there is no ``Created`` condition in v2). ``spec.activeDeadlineSeconds``
  (v2.2+) fails a TrainJob with reason ``DeadlineExceeded``;
- the pod-override field is ``spec.runtimePatches`` (v2.2+: one entry per ``manager``, a
  domain-prefixed path); v2.1 called it ``podTemplateOverrides`` and v2.0 ``podSpecOverrides``.
  Env of the ``node`` container may only be set through ``trainer.env``, never through a patch;
- the ``torch-distributed`` runtime has one replicated job and one container, both named
  ``node``; its torch plugin sets ``PET_NNODES`` (numNodes), ``PET_NPROC_PER_NODE``
  (``trainer.numProcPerNode``, else ``auto``), ``PET_NODE_RANK`` (the Job completion index),
  ``PET_MASTER_ADDR`` (``<name>-node-0-0.<name>``) and ``PET_MASTER_PORT`` (29500) in that
  container, and refuses them in ``trainer.env``;
- ``torchrun`` (``torch.distributed.run``) reads every option from ``PET_<OPTION>`` when it is
  not given on the command line (``--nnodes``, ``--nproc-per-node``, ``--node-rank``,
  ``--master-addr``, ``--master-port``; static rendezvous by default), so the bare command
  ``torchrun -m MODULE ...`` joins the job;
- a KFP (2.15 to 2.17) executor container gets its pod's name in ``KFP_POD_NAME`` (its launcher
  reads its own pod the same way when it needs the retry index); Argo labels the pod with its
  workflow's name (``workflows.argoproj.io/workflow``). Reading the pod needs ``get`` on pods.

Nothing here has run against a real Trainer controller (docs/kubeflow.md lists what is unproven).
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..utils import checks
from ..utils.errors import ConfigError, PhaseError

if TYPE_CHECKING:
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

log = logging.getLogger(__name__)

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
PLURAL = "trainjobs"
KIND = "TrainJob"
API_VERSION = f"{GROUP}/{VERSION}"
#: The ClusterTrainingRuntime every multi-node training runs on (installed with Kubeflow Trainer).
RUNTIME = "torch-distributed"
RUNTIME_KIND = "ClusterTrainingRuntime"
#: The torch runtime's replicated job and trainer container (Trainer's ``constants.Node``).
NODE = "node"
#: Who owns this project's entry of ``spec.runtimePatches`` (a domain-prefixed path, as required).
MANAGER = "spnas-kfp.io/pipeline"
#: Prefix of the labels naming the pipeline run, step and model on the TrainJob and its pods.
LABEL_PREFIX = "spnas-kfp.io"
#: The label Argo puts on every pod of a workflow: its name (a KFP run's resource name).
WORKFLOW_LABEL = "workflows.argoproj.io/workflow"
#: Names of the volumes this module adds to the trainer pods.
SHARED_VOLUME = "spnas-shared"
SHM_VOLUME = "dshm"


class TrainJobError(PhaseError):
    """A TrainJob could not be created, watched or read back (API refusal, deleted while
    watched, no result)."""


class TrainJobFailed(TrainJobError):
    """The TrainJob ended with its ``Failed`` condition; ``reason`` and ``message`` are the
    condition's."""

    def __init__(self, name: str, namespace: str, reason: str, message: str):
        self.name, self.namespace, self.reason, self.message = name, namespace, reason, message
        super().__init__(f"TrainJob {namespace}/{name} failed: {reason or 'no reason given'}: "
                         f"{message or 'no message'} (its pods' logs: kubectl -n {namespace} logs "
                         f"-l jobset.sigs.k8s.io/jobset-name={name} --prefix)")


class TrainJobTimeout(TrainJobError):
    """The TrainJob did not finish within the time allowed; it was deleted."""


# ----------------------------------------------------------------------------- what to create

def check_shape(nodes: Any, gpus_per_node: Any, shared_volume: bool = True) -> tuple[int, int]:
    """``(nodes, gpus_per_node)`` as ints, or :class:`ConfigError`: ``nodes`` >= 1,
    ``gpus_per_node`` >= 0, and a multi-node training (``nodes > 1``) needs GPUs (one torchrun
    process per GPU on each node) and a volume every node mounts (``shared_volume``)."""
    n = checks.integer(nodes, "pipeline parameter full_train_nodes", minimum=1)
    g = checks.integer(gpus_per_node, "pipeline parameter full_train_gpus_per_node", minimum=0)
    if n > 1 and g == 0:
        raise ConfigError(f"pipeline parameters full_train_nodes={n}, full_train_gpus_per_node=0: a full train on "
                          "several nodes runs one process per GPU of each node; set full_train_gpus_per_node >= 1 "
                          "(or full_train_nodes=1 to train in the full-train pod itself)")
    if n > 1 and not shared_volume:
        raise ConfigError(f"pipeline parameter full_train_nodes={n}: the nodes of a TrainJob share the run's "
                          "data and results through a volume, and this pipeline was compiled with "
                          "--data-volume none; recompile with --data-volume workspace or pvc:NAME")
    return n, g


def job_name(run_id: str, step: str, model_id: Any) -> str:
    """The TrainJob's name for one model of one step of one run (``run_id``: the KFP run's id):
    the same on every retry of the task (so a retried task finds its job), an RFC 1035 label
    well under 63 characters (the runtime's pod hostnames ``<name>-node-<i>-0`` must stay
    under 63 too)."""
    digest = hashlib.sha256(f"{run_id}\0{step}\0{model_id}".encode()).hexdigest()[:10]
    slug = re.sub(r"[^a-z0-9]+", "-", f"{step}-{model_id}".lower()).strip("-")[:20].strip("-")
    return f"spnas-{slug}-{digest}" if slug else f"spnas-{digest}"


def _label_value(value: Any) -> str:
    """A Kubernetes label value: at most 63 of ``[A-Za-z0-9._-]``, alphanumeric at both ends."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", str(value))[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", text)


def run_labels(run_id: str, step: str, model_id: Any, workflow: str = "") -> dict[str, str]:
    """The labels naming the pipeline run (its id, as the KFP UI shows it, and its Argo
    workflow when known), step and model; ``kubectl get trainjobs -l spnas-kfp.io/run=<run id>``
    lists a run's jobs."""
    labels = {f"{LABEL_PREFIX}/run": _label_value(run_id), f"{LABEL_PREFIX}/step": _label_value(step),
              f"{LABEL_PREFIX}/model": _label_value(model_id)}
    if workflow:
        labels[f"{LABEL_PREFIX}/workflow"] = _label_value(workflow)
    return labels


@dataclass(frozen=True)
class TrainJobPlan:
    """Everything one TrainJob is made of. ``args`` follow ``command`` in the trainer container
    of every node; ``claim`` is mounted at ``mount_path`` in every node (the same path the
    pipeline's pods use, so the call's paths hold there); ``gpus_per_node`` GPUs of resource
    ``accelerator`` (one process each), ``cpu`` and ``memory`` are each node's requests and
    limits; ``deadline_seconds`` becomes ``spec.activeDeadlineSeconds``."""

    name: str
    namespace: str
    image: str
    nodes: int
    gpus_per_node: int
    claim: str
    mount_path: str
    args: tuple[str, ...]
    command: tuple[str, ...] = ("torchrun",)
    accelerator: str = "nvidia.com/gpu"
    cpu: str = ""
    memory: str = ""
    shm_size: str = "2Gi"
    labels: Mapping[str, str] = field(default_factory=dict)
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: Sequence[Mapping[str, Any]] = ()
    image_pull_secret: str = ""
    deadline_seconds: int | None = None
    runtime: str = RUNTIME

    @property
    def world_size(self) -> int:
        """Processes of the training: one per GPU of every node."""
        return self.nodes * self.gpus_per_node


def build(plan: TrainJobPlan) -> TrainerV1alpha1TrainJob:
    """The TrainJob of ``plan`` as the typed model of ``kubeflow-trainer-api``."""
    from kubeflow_trainer_api import models as m

    def quantity(value: Any) -> m.IoK8sApimachineryPkgApiResourceQuantity:
        return m.IoK8sApimachineryPkgApiResourceQuantity(str(value))

    per_node = {plan.accelerator: quantity(plan.gpus_per_node)} if plan.gpus_per_node else {}
    if plan.cpu:
        per_node["cpu"] = quantity(plan.cpu)
    if plan.memory:
        per_node["memory"] = quantity(plan.memory)
    resources = m.IoK8sApiCoreV1ResourceRequirements(limits=dict(per_node), requests=dict(per_node))
    volumes = [m.IoK8sApiCoreV1Volume(name=SHARED_VOLUME, persistent_volume_claim=(
                   m.IoK8sApiCoreV1PersistentVolumeClaimVolumeSource(claim_name=plan.claim))),
               m.IoK8sApiCoreV1Volume(name=SHM_VOLUME, empty_dir=m.IoK8sApiCoreV1EmptyDirVolumeSource(
                   medium="Memory", size_limit=quantity(plan.shm_size)))]
    mounts = [m.IoK8sApiCoreV1VolumeMount(name=SHARED_VOLUME, mount_path=plan.mount_path),
              m.IoK8sApiCoreV1VolumeMount(name=SHM_VOLUME, mount_path="/dev/shm")]
    pod = m.TrainerV1alpha1PodSpecPatch(
        containers=[m.TrainerV1alpha1ContainerPatch(name=NODE, volume_mounts=mounts)], volumes=volumes,
        node_selector=dict(plan.node_selector) or None,
        tolerations=[m.IoK8sApiCoreV1Toleration.from_dict(dict(t)) for t in plan.tolerations] or None,
        image_pull_secrets=[m.IoK8sApiCoreV1LocalObjectReference(name=plan.image_pull_secret)]
        if plan.image_pull_secret else None)
    labels = dict(plan.labels)
    node_job = m.TrainerV1alpha1ReplicatedJobPatch(name=NODE, template=m.TrainerV1alpha1JobTemplatePatch(
        spec=m.TrainerV1alpha1JobSpecPatch(template=m.TrainerV1alpha1PodTemplatePatch(
            metadata=m.IoK8sApimachineryPkgApisMetaV1ObjectMeta(labels=labels) if labels else None, spec=pod))))
    patch = m.TrainerV1alpha1RuntimePatch(manager=MANAGER, training_runtime_spec=m.TrainerV1alpha1TrainingRuntimeSpecPatch(
        template=m.TrainerV1alpha1JobSetTemplatePatch(spec=m.TrainerV1alpha1JobSetSpecPatch(replicated_jobs=[node_job]))))
    trainer = m.TrainerV1alpha1Trainer(image=plan.image, command=list(plan.command), args=list(plan.args),
                                       num_nodes=plan.nodes, num_proc_per_node=plan.gpus_per_node or None,
                                       resources_per_node=resources)
    spec = m.TrainerV1alpha1TrainJobSpec(
        runtime_ref=m.TrainerV1alpha1RuntimeRef(name=plan.runtime, kind=RUNTIME_KIND, api_group=GROUP),
        trainer=trainer, runtime_patches=[patch], active_deadline_seconds=plan.deadline_seconds)
    return m.TrainerV1alpha1TrainJob(
        api_version=API_VERSION, kind=KIND, spec=spec,
        metadata=m.IoK8sApimachineryPkgApisMetaV1ObjectMeta(name=plan.name, namespace=plan.namespace,
                                                             labels=labels or None))


def manifest(plan: TrainJobPlan) -> dict[str, Any]:
    """The TrainJob of ``plan`` as the API server receives it (the typed model serialised with
    the API's field names, unset fields left out)."""
    return build(plan).to_dict()


# ----------------------------------------------------------------------------- the API

def custom_objects_api() -> Any:
    """A ``kubernetes.client.CustomObjectsApi`` authenticated as the pod's service account."""
    from kubernetes import client, config
    try:
        config.load_incluster_config()
    except config.ConfigException as exc:
        raise TrainJobError(f"cannot reach the Kubernetes API from here ({exc}): a TrainJob is created from a "
                            "pod of the cluster") from None
    return client.CustomObjectsApi()


def core_v1_api() -> Any:
    """A ``kubernetes.client.CoreV1Api`` authenticated as the pod's service account."""
    custom_objects_api()  # loads the in-cluster configuration, or says why it cannot
    from kubernetes import client
    return client.CoreV1Api()


def this_pod(core_api: Any, namespace: str, name: str | None = None) -> Any:
    """This pod's object (``V1Pod``): ``name``, else ``$KFP_POD_NAME``, else the host name (a
    pod's host name is its name)."""
    name = name or os.environ.get("KFP_POD_NAME") or socket.gethostname()
    try:
        return core_api.read_namespaced_pod(name, namespace)
    except Exception as exc:
        status = _status(exc)
        hint = " (the pipeline's service account needs get on pods: see docs/kubeflow.md)" if status == 403 else ""
        raise TrainJobError(f"reading this pod {namespace}/{name} to find the run's shared volume failed: "
                            f"{status or type(exc).__name__} {getattr(exc, 'reason', '') or exc}{hint}") from None


def claim_at(pod: Any, mount_path: str) -> str:
    """The persistent volume claim mounted at ``mount_path`` in ``pod`` (a ``V1Pod``): where the
    KFP backend mounted the run's workspace, or the ``--data-volume pvc:NAME`` claim."""
    want = str(mount_path).rstrip("/") or "/"
    names = {m.name for c in pod.spec.containers or [] for m in c.volume_mounts or []
             if (m.mount_path.rstrip("/") or "/") == want}
    for volume in pod.spec.volumes or []:
        if volume.name in names and volume.persistent_volume_claim is not None:
            return str(volume.persistent_volume_claim.claim_name)
    raise TrainJobError(f"no persistent volume claim is mounted at {mount_path} in pod {pod.metadata.name}: the "
                        "nodes of a TrainJob share the run's data and results through it")


def workflow_of(pod: Any) -> str:
    """The name of the Argo workflow (the KFP run's resource name) ``pod`` belongs to; "" when
    it has no such label."""
    return str((pod.metadata.labels or {}).get(WORKFLOW_LABEL, ""))


def _status(exc: BaseException) -> int | None:
    """The HTTP status of a ``kubernetes`` ApiException (None for any other error)."""
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) else None


def _refused(exc: BaseException, what: str, name: str, namespace: str) -> TrainJobError:
    """The error for an API call that failed with ``exc``, with a hint for the usual causes."""
    status = _status(exc)
    if status is None:
        return TrainJobError(f"{what} TrainJob {namespace}/{name}: the API server could not be reached "
                             f"({type(exc).__name__}: {exc})")
    hint = {403: " (the pipeline's service account needs create/get/delete on trainjobs.trainer.kubeflow.org: "
                 "see docs/kubeflow.md)",
            404: " (is Kubeflow Trainer v2 installed, with its TrainJob CRD?)"}.get(status, "")
    reason = getattr(exc, "reason", None) or type(exc).__name__
    return TrainJobError(f"{what} TrainJob {namespace}/{name}: the API server answered {status} {reason}{hint}")


@dataclass(frozen=True)
class JobState:
    """Where a TrainJob stands: ``phase`` ``Complete``, ``Failed``, ``Suspended`` or
    ``Pending`` (no terminal condition yet), with the deciding condition's reason and message,
    and a short summary of its child jobs."""

    phase: str
    reason: str = ""
    message: str = ""
    jobs: str = ""


def job_state(obj: Mapping[str, Any]) -> JobState:
    """The state of a TrainJob object as the API returns it: a ``Failed`` condition of status
    ``True`` wins over ``Complete``; ``Suspended`` ``True`` is reported; anything else is
    ``Pending``. Read defensively (a newer controller may add fields)."""
    status = obj.get("status") or {}
    conds = {c.get("type"): c for c in status.get("conditions") or [] if isinstance(c, Mapping)}
    jobs = ", ".join(f"{j.get('name')}: {j.get('active', 0)} active, {j.get('ready', 0)} ready, "
                     f"{j.get('succeeded', 0)} succeeded, {j.get('failed', 0)} failed"
                     for j in status.get("jobsStatus") or [] if isinstance(j, Mapping))
    for phase in ("Failed", "Complete", "Suspended"):
        c = conds.get(phase)
        if c is not None and str(c.get("status")) == "True":
            return JobState(phase, str(c.get("reason") or ""), str(c.get("message") or ""), jobs)
    return JobState("Pending", jobs=jobs)


def create(api: Any, body: Mapping[str, Any], *, gone_timeout: float = 120.0, poll: float = 2.0,
           clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Create the TrainJob ``body`` in its namespace; returns the object the API returned. One
    of that name already there (a retried task) is adopted while it runs or after it completed;
    a failed one (kept for its logs) is deleted and created anew, so a retry trains again (from
    the checkpoints the failed one left on the shared volume)."""
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    try:
        obj = api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, dict(body))
        log.info("created TrainJob %s/%s (%s nodes on %s)", namespace, name, body["spec"]["trainer"].get("numNodes"),
                 body["spec"]["runtimeRef"]["name"])
        return obj
    except Exception as exc:
        if _status(exc) != 409:
            raise _refused(exc, "creating", name, namespace) from None
    existing = _get(api, name, namespace)
    state = job_state(existing or {})
    if existing is not None and state.phase != "Failed":
        log.info("TrainJob %s/%s exists already (%s): an earlier attempt of this task created it; watching it",
                 namespace, name, state.phase)
        return existing
    if existing is not None:
        log.info("TrainJob %s/%s of an earlier attempt failed (%s: %s); deleting it and creating it again",
                 namespace, name, state.reason, state.message)
        delete(api, name, namespace)
        deadline = clock() + gone_timeout
        while _get(api, name, namespace) is not None:
            if clock() >= deadline:
                raise TrainJobError(f"TrainJob {namespace}/{name} of an earlier attempt was still there "
                                    f"{gone_timeout:g} s after it was deleted")
            sleep(poll)
    try:
        return api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, dict(body))
    except Exception as exc:
        raise _refused(exc, "creating", name, namespace) from None


def _get(api: Any, name: str, namespace: str) -> dict[str, Any] | None:
    """The TrainJob object, None when there is none of that name."""
    try:
        return api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except Exception as exc:
        if _status(exc) == 404:
            return None
        raise _refused(exc, "reading", name, namespace) from None


def delete(api: Any, name: str, namespace: str) -> bool:
    """Delete the TrainJob (its JobSet and pods go with it, in the background); False when it
    was already gone."""
    try:
        api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                            propagation_policy="Background")
    except Exception as exc:
        if _status(exc) == 404:
            return False
        raise _refused(exc, "deleting", name, namespace) from None
    log.info("deleted TrainJob %s/%s", namespace, name)
    return True


def wait(api: Any, name: str, namespace: str, *, timeout: float, poll: float = 30.0, max_errors: int = 20,
         clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Poll the TrainJob every ``poll`` seconds until it finishes: returns the object once it is
    ``Complete``; raises :class:`TrainJobFailed` (the condition's reason and message) once it is
    ``Failed``, :class:`TrainJobTimeout` after ``timeout`` seconds, :class:`TrainJobError` when it
    disappears or the API fails ``max_errors`` times in a row (a hiccup is retried). Leaves the
    job as it is: :func:`run` decides what to delete."""
    start = clock()
    last, errors = None, 0
    while True:
        try:
            obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except Exception as exc:  # a hiccup of the API server is retried; a vanished job is not
            if _status(exc) == 404:
                raise TrainJobError(f"TrainJob {namespace}/{name} disappeared while it was watched (deleted by "
                                    "someone else?)") from None
            errors += 1
            log.warning("reading TrainJob %s/%s failed (%s: %s; %d in a row)", namespace, name, type(exc).__name__,
                        exc, errors)
            if errors >= max_errors:
                raise _refused(exc, "watching", name, namespace) from None
        else:
            errors = 0
            state = job_state(obj)
            if state != last:
                log.info("TrainJob %s/%s after %.0f s: %s%s%s", namespace, name, clock() - start, state.phase,
                         f" ({state.reason}: {state.message})" if state.reason or state.message else "",
                         f"; {state.jobs}" if state.jobs else "")
                last = state
            if state.phase == "Complete":
                return obj
            if state.phase == "Failed":
                raise TrainJobFailed(name, namespace, state.reason, state.message)
        elapsed = clock() - start
        if elapsed >= timeout:
            raise TrainJobTimeout(f"TrainJob {namespace}/{name} did not finish within {timeout:g} s "
                                  f"(last seen: {last.phase if last else 'unreadable'})")
        sleep(max(0.0, min(poll, timeout - elapsed)))


def run(api: Any, plan: TrainJobPlan, *, timeout: float, poll: float = 30.0,
        clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Create the TrainJob of ``plan`` and wait for it (:func:`create`, :func:`wait`).

    What is left behind: a ``Complete`` job is deleted (its result is on the shared volume);
    a ``Failed`` one is kept, so its pods' logs and events can be read (the error says how; a
    retry of the task replaces it); a job past ``timeout``, or whose watcher is stopped
    (SIGTERM of the pod turned into ``SystemExit``, ``KeyboardInterrupt``), is deleted so it
    frees its GPUs. When the API cannot be read the job is left running: a retried task adopts
    it. Returns the completed object."""
    create(api, manifest(plan), clock=clock, sleep=sleep)
    try:
        done = wait(api, plan.name, plan.namespace, timeout=timeout, poll=poll, clock=clock, sleep=sleep)
    except TrainJobTimeout:
        _delete_quietly(api, plan)
        raise
    except (KeyboardInterrupt, SystemExit):
        log.warning("stopped while watching TrainJob %s/%s: deleting it", plan.namespace, plan.name)
        _delete_quietly(api, plan)
        raise
    _delete_quietly(api, plan)
    return done


def _delete_quietly(api: Any, plan: TrainJobPlan) -> None:
    try:
        delete(api, plan.name, plan.namespace)
    except TrainJobError as exc:
        log.warning("%s: leaving it to be deleted by hand", exc)


__all__ = ["GROUP", "VERSION", "PLURAL", "KIND", "API_VERSION", "RUNTIME", "NODE", "MANAGER", "TrainJobError",
           "TrainJobFailed", "TrainJobTimeout", "TrainJobPlan", "JobState", "check_shape", "job_name", "run_labels",
           "build", "manifest", "custom_objects_api", "core_v1_api", "this_pod", "claim_at", "workflow_of",
           "job_state", "create", "delete", "wait", "run"]
