"""The SP-NAS Kubeflow pipeline, built from the same config as ``spnas run``.

    python -m pipelines.spnas_pipeline --config configs/demo.yml --output pipelines/spnas_pipeline.yaml

preflight -> stage data -> fine_tune -> serial rounds -> reignition -> parallel rounds -> full train ->
publish -> export (parity gate) -> register (MLflow Model Registry), with an
equal-budget control after each search and after the full train (``general.control``). Search
rounds are unrolled here (KFP v2 has no while loop): rounds = ceil(max_sample /
candidates_per_round), each a ``dsl.ParallelFor`` over the proposed candidates with
``parallelism`` pods at once and ``dsl.Collected`` results into the update step. Reignition and
full train fan out over the ``top_k`` models their step takes from the front (the same choice
``spnas run`` makes). The data set is staged once per run into the run's workspace (KFP >= 2.15;
``--data-volume pvc:NAME`` mounts an existing claim instead, ``none`` lets every pod cache its own
copy) and enters every training task as the stage task's Dataset artifact. A training pod with
several GPUs trains data-parallel across them; ``full_train_nodes > 1`` makes each full-train task
run its training as a Kubeflow Trainer TrainJob on that many nodes (``full_train_gpus_per_node``
GPUs each). Wiring only.
"""

import argparse
import json
import math
import os
from pathlib import Path
from typing import NamedTuple

import yaml

DEFAULT_IMAGE = "ghcr.io/spnas-kfp/spnas:0.1.0"
SECRET = "spnas-s3"   # keys: endpoint, accesskey, secretkey


#: Requests and limits of the light tasks (bookkeeping, plots, reports: no training).
LIGHT_RESOURCES = {"cpu_request": "500m", "cpu_limit": "1", "memory_request": "1Gi", "memory_limit": "2Gi"}
#: Task time limits in seconds (Kubernetes activeDeadlineSeconds per pod): light tasks, one
#: search candidate / reignition / phase control, and the long trainings (fine_tune, full train
#: and its control).
TIMEOUTS = {"light": 1800, "candidate": 24 * 3600, "long": 7 * 24 * 3600}
#: How long Argo keeps retrying a failed task, counted from its first start: long enough for a
#: multi-day training preempted near its end (Argo's default window, 1 h, is shorter than one epoch).
HEAVY_RETRY_WINDOW = "259200s"   # 72 h
LIGHT_RETRY_WINDOW = "3600s"
#: The stage-data task: no GPU, enough memory for the object listing of a COCO-sized data set.
STAGE_RESOURCES = {"cpu_request": "1", "cpu_limit": "2", "memory_request": "2Gi", "memory_limit": "4Gi"}
#: The export task (ONNX and TorchScript tracing, the parity gate, CPU latency): a CPU pod, no GPU,
#: no node selector (compiled constants: inside a dsl.If branch kfp.local cannot resolve pipeline
#: parameters used only in resource requests).
EXPORT_RESOURCES = {"cpu": "4", "memory": "16Gi"}
#: Val images the export's parity gate runs on by default (a pipeline parameter; 0: all): ONNX
#: Runtime, TorchScript and PyTorch each detect every one on CPU, ~1-3 s per COCO image.
GATE_IMAGES = 200
#: Where ``--data-volume pvc:NAME`` mounts the claim in every pod that reads the data set.
PVC_MOUNT_PATH = "/spnas-data"


class SearchOutputs(NamedTuple):
    """The outputs of a search phase (controls on): its Pareto front and its equal-budget control."""
    front: list
    control: dict


class FullTrainOutputs(NamedTuple):
    """The outputs of the full-train phase (controls on): the best model and the final control."""
    best: dict
    controls: dict


class TaskStyle:
    """How the tasks of a pipeline are dressed (shared by the SP-NAS and the retraining pipeline):
    ``heavy`` training pods (requests = limits, a long retry window, a time limit, node selector and
    tolerations, a memory-backed /dev/shm), ``light`` bookkeeping pods, and for every task the
    caching option, the time limit of its kind, the pull secret and the object store's secret as
    environment variables."""

    def __init__(self, *, caching: bool, limits: "dict[str, int]", image_pull_secret: "str | None",
                 secret: "str | None", retries: int, retry_backoff: int, shm_size: str, pvc: "str | None"):
        self.caching, self.limits, self.image_pull_secret, self.secret = caching, limits, image_pull_secret, secret
        self.retries, self.retry_backoff, self.shm_size, self.pvc = retries, retry_backoff, shm_size, pvc

    def heavy(self, task, ctx, res, kind="candidate"):
        """Training pods: :meth:`cpu_heavy`'s dress plus the accelerator and the run's node
        selector and tolerations."""
        from kfp import kubernetes
        task.set_accelerator_type(res["accelerator"]).set_accelerator_limit(res["gpus"])
        kubernetes.add_node_selector_json(task, node_selector_json=ctx["node_selector"])
        kubernetes.add_toleration_json(task, toleration_json=ctx["tolerations"])
        return self.cpu_heavy(task, res, kind)

    def cpu_heavy(self, task, res, kind="candidate"):
        """A task that reads the data set and computes (the export; training pods through
        :meth:`heavy`): requests = limits (an OOM stays in its pod), a long retry window, a time
        limit, a memory-backed /dev/shm for the data loaders."""
        from kfp import kubernetes
        task.set_cpu_request(res["cpu"]).set_cpu_limit(res["cpu"])
        task.set_memory_request(res["memory"]).set_memory_limit(res["memory"])
        self.common(task, kind)
        task.set_retry(self.retries, backoff_duration=f"{int(self.retry_backoff)}s", backoff_factor=2.0,
                       backoff_max_duration=HEAVY_RETRY_WINDOW)
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                   size_limit=self.shm_size)
        return self.reads_data(task)

    def stage(self, task):
        """The stage-data task: :data:`STAGE_RESOURCES` (no GPU), the heavy retry policy (a lost
        pod retries) and the candidate time limit; it reads the data set."""
        task.set_cpu_request(STAGE_RESOURCES["cpu_request"]).set_cpu_limit(STAGE_RESOURCES["cpu_limit"])
        task.set_memory_request(STAGE_RESOURCES["memory_request"]).set_memory_limit(STAGE_RESOURCES["memory_limit"])
        self.common(task, "candidate")
        task.set_retry(self.retries, backoff_duration=f"{int(self.retry_backoff)}s", backoff_factor=2.0,
                       backoff_max_duration=HEAVY_RETRY_WINDOW)
        return self.reads_data(task)

    def reads_data(self, task):
        """A task that reads the data set: the claim mounted when the data volume is a PVC (the
        workspace is mounted by the backend for every task that takes its path)."""
        from kfp import kubernetes
        if self.pvc:
            kubernetes.mount_pvc(task, pvc_name=self.pvc, mount_path=PVC_MOUNT_PATH)
        return task

    def light(self, task):
        """Bookkeeping pods: small requests and limits, retries within an hour, a short time limit."""
        task.set_cpu_request(LIGHT_RESOURCES["cpu_request"]).set_cpu_limit(LIGHT_RESOURCES["cpu_limit"])
        task.set_memory_request(LIGHT_RESOURCES["memory_request"]).set_memory_limit(LIGHT_RESOURCES["memory_limit"])
        self.common(task, "light")
        task.set_retry(self.retries, backoff_duration="10s", backoff_factor=2.0,
                       backoff_max_duration=LIGHT_RETRY_WINDOW)
        return task

    def common(self, task, kind):
        from kfp import kubernetes
        task.set_caching_options(self.caching)
        kubernetes.set_timeout(task, int(self.limits[kind]))
        if self.image_pull_secret:
            kubernetes.set_image_pull_secrets(task, [self.image_pull_secret])
        if self.secret:
            kubernetes.use_secret_as_env(task, secret_name=self.secret, secret_key_to_env={
                "endpoint": "SPNAS_S3_ENDPOINT", "accesskey": "AWS_ACCESS_KEY_ID", "secretkey": "AWS_SECRET_ACCESS_KEY"})


def candidate_time_limit(pod_seconds: int) -> int:
    """The time limit of a candidate's training child: the candidate pod's own limit less a
    margin (a tenth, at most 10 minutes), so the child is stopped and recorded as a failed
    candidate before Kubernetes kills the pod (which would fail the round)."""
    return int(pod_seconds - min(600, pod_seconds // 10))


def data_volume_path(data_volume: str) -> str:
    """The path every data-reading task gets as ``workspace`` for ``--data-volume``:
    ``workspace`` (the run's KFP workspace), ``pvc:NAME`` (an existing claim, mounted at
    :data:`PVC_MOUNT_PATH`) or ``none`` (no shared folder: "")."""
    from kfp import dsl
    if data_volume == "workspace":
        return dsl.WORKSPACE_PATH_PLACEHOLDER
    if data_volume.startswith("pvc:") and data_volume[4:].strip():
        return PVC_MOUNT_PATH
    if data_volume == "none":
        return ""
    raise SystemExit(f"--data-volume {data_volume!r}: expected workspace, pvc:<claim name> or none")


def check_image(image: str, require_digest: bool) -> str:
    """``image``, refused when ``require_digest`` and it is not pinned by ``@sha256:`` digest (a
    mutable tag can change under a scheduled retraining)."""
    if require_digest and "@sha256:" not in image:
        raise SystemExit(f"--image {image!r} is not pinned by digest (name@sha256:...); "
                         "pass the digest or drop --require-digest")
    return image


def build_pipeline(config_path: "str | Path", image: str = DEFAULT_IMAGE, parallelism: int = 4,
                   retries: int = 2, secret: "str | None" = SECRET, caching: bool = False,
                   timeouts: "dict[str, int] | None" = None, shm_size: str = "2Gi",
                   image_pull_secret: "str | None" = None, require_digest: bool = False,
                   data_volume: str = "workspace", workspace_size: str = "100Gi",
                   workspace_storage_class: "str | None" = None, retry_backoff: int = 60,
                   full_train_nodes: int = 1, full_train_gpus_per_node: int = 0):
    """Return the ``@dsl.pipeline`` function for ``config_path`` (read now, embedded as text),
    every component running on ``image``.

    Every task gets requests and limits, a retry policy (heavy tasks: first retry after
    ``retry_backoff`` seconds, doubling, within a 72 h window) and a time
    limit (``timeouts`` overrides :data:`TIMEOUTS` per kind); training pods mount a memory-backed
    ``/dev/shm`` of ``shm_size`` and take the run's node selector and tolerations. The data set
    is staged once into ``data_volume`` (:func:`data_volume_path`): a run workspace of
    ``workspace_size`` (ReadWriteMany, ``workspace_storage_class`` or the cluster's default), an
    existing claim, or none. ``full_train_nodes`` and ``full_train_gpus_per_node`` are the
    defaults of the pipeline parameters of those names, refused here when a run could not use
    them (several nodes need GPUs and a shared data volume); every run's values are checked again
    by its first task."""
    from kfp import dsl
    from kfp.dsl import Dataset, Input

    from components.spnas_components import build_components
    from spnas.config import load_config
    from spnas.orchestration.pods import compiled_contract
    from spnas.orchestration.trainjob import check_shape
    from spnas.utils.errors import ConfigError
    try:
        check_shape(full_train_nodes, full_train_gpus_per_node, data_volume != "none")
    except ConfigError as exc:
        raise SystemExit(f"--full-train-nodes {full_train_nodes} --full-train-gpus-per-node "
                         f"{full_train_gpus_per_node}: {exc}") from None
    c = build_components(check_image(image, require_digest))
    limits = {**TIMEOUTS, **(timeouts or {})}
    workspace = data_volume_path(data_volume)
    pvc = data_volume[4:].strip() if data_volume.startswith("pvc:") else None

    raw = yaml.safe_load(Path(config_path).read_text())
    cfg = load_config(raw, workdir="/tmp/spnas")
    # one line of JSON (valid YAML): kfp writes parameter defaults into a comment header,
    # where a multi-line default would break the compiled file
    text = json.dumps(raw, sort_keys=True)
    roles = {s.role: s for s in cfg.steps}
    for needed in ("fine_tune", "serial", "parallel", "full_train"):
        if needed not in roles:
            raise SystemExit(f"{config_path}: the pipeline needs a {needed} step; steps are {[s.role for s in cfg.steps]}")
    # data_uri has no default (the config's data_root is a path on the compiling machine) and an
    # empty results_uri means the namespace's private prefix (pods.run_prefix)

    style = TaskStyle(caching=caching, limits=limits, image_pull_secret=image_pull_secret, secret=secret,
                      retries=retries, retry_backoff=retry_backoff, shm_size=shm_size, pvc=pvc)
    heavy, light, reads_data = style.heavy, style.light, style.reads_data

    def resource_inputs(res):
        """The resource parameters as inputs too: a task inside a ParallelFor resolves pipeline
        parameters used in its resource requests only when it takes them as inputs (kfp.local)."""
        return {"accelerator_type": res["accelerator"], "gpus_per_task": res["gpus"],
                "cpu_per_task": res["cpu"], "memory_per_task": res["memory"]}

    # Each phase is a nested pipeline (a root task named after it, its rounds inside). A phase's
    # inputs are the run's values it needs; every one of them is a parameter or the Dataset
    # artifact (inside a ParallelFor kfp.local resolves another task's parameter output to the
    # loop item, so the loop bodies read only the phase's inputs and the item).

    def phase_ctx(config, run_uri, overrides, dataset, accelerator_type, gpus_per_task, cpu_per_task,
                  memory_per_task, node_selector, tolerations):
        return {"config": config, "run_uri": run_uri, "overrides": overrides,
                "data": {"dataset": dataset, "workspace": workspace},
                "node_selector": node_selector, "tolerations": tolerations,
                "res": {"cpu": cpu_per_task, "memory": memory_per_task, "accelerator": accelerator_type,
                        "gpus": gpus_per_task}}

    def fan_out(step, front, component, ctx, loop_name, kind, extra=None):
        """The step's top-k models of ``front``, one ``component`` pod each (``parallelism`` at once;
        ``extra``: more inputs of ``component``)."""
        chosen = light(c.choose(config=ctx["config"], step=step.name, front=front, run_uri=ctx["run_uri"],
                                overrides=ctx["overrides"]))
        chosen.set_display_name(f"{step.name}: choose models")
        with dsl.ParallelFor(chosen.output, parallelism=parallelism, name=loop_name) as item:
            task = heavy(component(config=ctx["config"], step=step.name, item=item, **ctx["data"],
                                   **resource_inputs(ctx["res"]), **(extra or {})), ctx, ctx["res"], kind=kind)
            task.set_display_name(step.name)
        return dsl.Collected(task.outputs["Output"])

    def search_phase(step):
        """The nested pipeline of a serial or parallel search: start, the unrolled rounds
        (propose, candidates, a ParallelFor of training pods, update; in the serial search the
        plateau reignition), the Pareto front and the phase's equal-budget control. Outputs
        ``front`` (and ``control`` when controls are on)."""
        n = step.search["max_sample"]
        k = step.search.get("candidates_per_round", 4)

        def search(config: str, seeds: list, run_uri: str, overrides: str, dataset: Input[Dataset],
                   accelerator_type: str, gpus_per_task: int, cpu_per_task: str, memory_per_task: str,
                   node_selector: dict, tolerations: list):
            ctx = phase_ctx(config, run_uri, overrides, dataset, accelerator_type, gpus_per_task, cpu_per_task,
                            memory_per_task, node_selector, tolerations)
            init = reads_data(light(c.search_init(config=config, step=step.name, seeds=seeds, run_uri=run_uri,
                                                  overrides=overrides, **ctx["data"])))
            init.set_display_name(f"{step.name}: start")
            state = init.output
            for r in range(math.ceil(n / k)):
                prop = light(c.propose(state=state, k=k, run_uri=run_uri, step=step.name))
                prop.set_display_name(f"{step.name} round {r}: propose")
                items = light(c.candidates(proposal=prop.output, run_uri=run_uri, overrides=overrides))
                items.set_display_name(f"{step.name} round {r}: candidates")
                with dsl.ParallelFor(items.output, parallelism=parallelism, name=f"{step.name}-round-{r}") as cand:
                    train = heavy(c.train_candidate(config=config, step=step.name, candidate=cand,
                                                    time_limit=candidate_time_limit(limits["candidate"]),
                                                    **ctx["data"], **resource_inputs(ctx["res"])), ctx, ctx["res"])
                    train.set_display_name(f"{step.name} round {r}: train candidate")
                upd = light(c.update(proposal=prop.output, results=dsl.Collected(train.outputs["Output"]),
                                     step=step.name, run_uri=run_uri))
                upd.set_display_name(f"{step.name} round {r}: update")
                state = upd.output
                if step.role == "serial" and step.search.get("reignition_patience") and r + 1 < math.ceil(n / k):
                    re_ = heavy(c.reignite_if_plateau(config=config, step=step.name, state=state, **ctx["data"],
                                                      run_uri=run_uri, overrides=overrides,
                                                      **resource_inputs(ctx["res"])), ctx, ctx["res"])
                    re_.set_display_name(f"{step.name} round {r}: reignite if the front stopped improving")
                    state = re_.outputs["Output"]
            front = light(c.search_front(state=state, run_uri=run_uri, step=step.name))
            front.set_display_name(f"{step.name}: Pareto front")
            if not cfg.control:
                return front.outputs["Output"]
            ctrl = heavy(c.phase_control(config=config, step=step.name, state=state, **ctx["data"], run_uri=run_uri,
                                         overrides=overrides, **resource_inputs(ctx["res"])), ctx, ctx["res"])
            ctrl.set_display_name(f"{step.name}: equal-budget control")
            return SearchOutputs(front=front.outputs["Output"], control=ctrl.outputs["Output"])

        # the phase's outputs: the front, and the control when controls are on
        search.__annotations__["return"] = SearchOutputs if cfg.control else list
        return dsl.pipeline(search, name=f"{step.name}-search", pipeline_config=pipeline_config,
                            description=f"SP-NAS {step.role} search ({step.name}): {math.ceil(n / k)} rounds of "
                                        f"{k} candidates")

    def reignition_phase(step):
        """The nested pipeline of the reignition step: its top-k models of the serial front, one
        pod each; outputs their records (the parallel search's seeds)."""
        def reignition(config: str, front: list, run_uri: str, overrides: str, dataset: Input[Dataset],
                       accelerator_type: str, gpus_per_task: int, cpu_per_task: str, memory_per_task: str,
                       node_selector: dict, tolerations: list) -> list:
            ctx = phase_ctx(config, run_uri, overrides, dataset, accelerator_type, gpus_per_task, cpu_per_task,
                            memory_per_task, node_selector, tolerations)
            done = light(c.collect(records=fan_out(step, front, c.reignite, ctx, "reignition", "candidate"),
                                   run_uri=run_uri, step=step.name))
            done.set_display_name(f"{step.name}: collect")
            return done.output
        return dsl.pipeline(reignition, name="reignition", pipeline_config=pipeline_config,
                            description=f"SP-NAS reignition ({step.name}): the serial front's top {step.top_k}")

    def full_train_phase(step):
        """The nested pipeline of the full train: its top-k models of the parallel front with the
        full schedule, the best of them and (controls on) the run's equal-budget control. Outputs
        ``best`` and ``controls``."""
        def full_train(config: str, front: list, fine_tuned: list, run_uri: str, overrides: str,
                       dataset: Input[Dataset], accelerator_type: str, full_train_gpus: int, full_train_cpu: str,
                       full_train_memory: str, node_selector: dict, tolerations: list, full_train_nodes: int,
                       full_train_gpus_per_node: int):
            ctx = phase_ctx(config, run_uri, overrides, dataset, accelerator_type, full_train_gpus, full_train_cpu,
                            full_train_memory, node_selector, tolerations)
            # with full_train_nodes > 1 each full-train pod creates and watches a TrainJob instead
            multi_node = {"full_train_nodes": full_train_nodes, "full_train_gpus_per_node": full_train_gpus_per_node,
                          "trainjob": trainjob_settings, "node_selector": node_selector, "tolerations": tolerations}
            best = light(c.finish(config=config, records=fan_out(step, front, c.full_train, ctx, "full-train", "long",
                                                                 multi_node),
                                  run_uri=run_uri, step=step.name, overrides=overrides))
            best.set_display_name("full train: best model")
            if not cfg.control:
                return best.output
            final = heavy(c.final_control(config=config, step=step.name, fine_tuned=fine_tuned, best=best.output,
                                          **ctx["data"], run_uri=run_uri, overrides=overrides,
                                          **resource_inputs(ctx["res"])), ctx, ctx["res"], kind="long")
            final.set_display_name("full train: equal-budget control")
            return FullTrainOutputs(best=best.output, controls=final.outputs["Output"])

        # the phase's outputs: the best model, and the final control when controls are on
        full_train.__annotations__["return"] = FullTrainOutputs if cfg.control else dict
        return dsl.pipeline(full_train, name="full-train", pipeline_config=pipeline_config,
                            description=f"SP-NAS full train ({step.name}): the parallel front's top {step.top_k}")

    contract = compiled_contract(Path(config_path).read_text())
    # what a multi-node full train's TrainJob is made of besides the run's parameters: the image
    # of every node, /dev/shm, the pull secret and its deadline (the full-train pod's time limit
    # less a margin); the shared volume's claim is the one the full-train pod finds mounted
    trainjob_settings = json.dumps({"image": image, "shm_size": shm_size, "image_pull_secret": image_pull_secret or "",
                                    "time_limit": candidate_time_limit(limits["long"])}, sort_keys=True)
    pipeline_config = None
    if data_volume == "workspace":
        patch = {"accessModes": ["ReadWriteMany"]}  # candidate pods on several nodes read it at once
        if workspace_storage_class:
            patch["storageClassName"] = workspace_storage_class
        pipeline_config = dsl.PipelineConfig(workspace=dsl.WorkspaceConfig(
            size=workspace_size, kubernetes=dsl.KubernetesWorkspaceConfig(pvcSpecPatch=patch)))
    serial_search, parallel_search = search_phase(roles["serial"]), search_phase(roles["parallel"])
    reignition = reignition_phase(roles["reignition"]) if "reignition" in roles and roles["reignition"].top_k != 0 \
        else None
    full_train = full_train_phase(roles["full_train"])

    @dsl.pipeline(name="spnas", description="SP-NAS: serial-to-parallel detection backbone search "
                  f"(config {Path(config_path).name})", pipeline_config=pipeline_config)
    def spnas_pipeline(data_uri: str, results_uri: str = "",
                       seed: int = cfg.seed, candidate_epochs: int = -1, full_epochs: int = -1,
                       accelerator_type: str = "nvidia.com/gpu", gpus_per_task: int = 0,
                       cpu_per_task: str = "2", memory_per_task: str = "8G",
                       full_train_gpus: int = 0, full_train_cpu: str = "4", full_train_memory: str = "16G",
                       full_train_nodes: int = full_train_nodes, full_train_gpus_per_node: int = full_train_gpus_per_node,
                       node_selector: dict = {}, tolerations: list = [],  # noqa: B006 (kfp pipeline defaults)
                       model_name: str = "spnas", registry_uri: str = "", gate_images: int = GATE_IMAGES,
                       config: str = text):
        prep = light(c.prepare(config=config, seed=seed, candidate_epochs=candidate_epochs, full_epochs=full_epochs,
                               full_train_nodes=full_train_nodes, full_train_gpus_per_node=full_train_gpus_per_node,
                               shared_volume=data_volume != "none"))
        prep.set_display_name("validate config")
        prefix = light(c.run_prefix(results_uri=results_uri, job_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER))
        prefix.set_display_name("run prefix")
        pre = light(c.preflight(config=config, overrides=prep.output, data_uri=data_uri, run_uri=prefix.output,
                                expected=contract))
        pre.set_display_name("preflight: image, config shape, data set, results prefix")
        # a refusal is deterministic and storage hiccups are retried inside the task: one retry
        # at once covers a lost pod without repeating a refusal for minutes
        pre.set_retry(1, backoff_duration="0s", backoff_max_duration=LIGHT_RETRY_WINDOW)
        stage = c.stage_data(config=config, overrides=prep.output, data_uri=data_uri, workspace=workspace,
                             run_uri=prefix.output)
        style.stage(stage).set_display_name("stage data set (once per run)").after(pre)
        run = {"config": config, "run_uri": prefix.output, "overrides": prep.output, "dataset": stage.output,
               "node_selector": node_selector, "tolerations": tolerations}
        per_task = {"accelerator_type": accelerator_type, "gpus_per_task": gpus_per_task,
                    "cpu_per_task": cpu_per_task, "memory_per_task": memory_per_task}
        full = {"cpu": full_train_cpu, "memory": full_train_memory, "accelerator": accelerator_type,
                "gpus": full_train_gpus}
        root = {"node_selector": node_selector, "tolerations": tolerations}
        ft = heavy(c.fine_tune(config=config, step=roles["fine_tune"].name, dataset=stage.output, workspace=workspace,
                               run_uri=prefix.output, overrides=prep.output, **resource_inputs(full)), root, full,
                   kind="long")
        ft.set_display_name("fine_tune")
        serial = serial_search(seeds=ft.outputs["Output"], **run, **per_task)
        serial.set_display_name("serial search")
        serial_front = serial.outputs["front"] if cfg.control else serial.output
        seeds = serial_front
        if reignition is not None:
            re_ = reignition(front=serial_front, **run, **per_task)
            re_.set_display_name("reignition")
            seeds = re_.output
        parallel = parallel_search(seeds=seeds, **run, **per_task)
        parallel.set_display_name("parallel search")
        parallel_front = parallel.outputs["front"] if cfg.control else parallel.output
        trained = full_train(front=parallel_front, fine_tuned=ft.outputs["Output"], **run,
                             accelerator_type=accelerator_type, full_train_gpus=full_train_gpus,
                             full_train_cpu=full_train_cpu, full_train_memory=full_train_memory,
                             full_train_nodes=full_train_nodes, full_train_gpus_per_node=full_train_gpus_per_node)
        trained.set_display_name("full train")
        best = trained.outputs["best"] if cfg.control else trained.output
        controls = trained.outputs["controls"] if cfg.control else {}
        pub = light(c.publish(config=config, serial_front=serial_front, parallel_front=parallel_front, best=best,
                              controls=controls,
                              serial_control=serial.outputs["control"] if cfg.control else {},
                              parallel_control=parallel.outputs["control"] if cfg.control else {},
                              run_uri=prefix.output, overrides=prep.output))
        pub.set_display_name("publish report")
        # the tail: the run's result exported behind the parity gate, then registered (the
        # champion when the model has none, else the challenger; skipped without a registry)
        exp = style.cpu_heavy(c.export_model(config=config, step=roles["full_train"].name, record=best, controls=controls,
                                   weights=pub.outputs["Output"], dataset=stage.output, workspace=workspace,
                                   run_uri=prefix.output, name=model_name, overrides=prep.output,
                                   gate_images=gate_images), EXPORT_RESOURCES)
        exp.set_display_name("export + parity gate")
        reg = light(c.register_model(export=exp.outputs["Output"], model_name=model_name, registry_uri=registry_uri))
        reg.set_display_name("register model")

    return spnas_pipeline


#: Largest compiled pipeline accepted. Argo keeps a whole workflow in one Kubernetes object
#: (etcd's limit: 1.5 MiB) and the KFP backend's workflow repeats each task's spec for its
#: driver, so the compiled file must stay well below that. A conservative estimate, not
#: measured on a cluster: see docs/kubeflow.md for the sizes by max_sample.
MAX_SPEC_BYTES = 700 * 1024


def compile_pipeline(config_path: "str | Path", output: "str | Path", image: str = DEFAULT_IMAGE,
                     parallelism: int = 4, max_spec_bytes: int = MAX_SPEC_BYTES, **options) -> Path:
    """Compile the pipeline of ``config_path`` to ``output``; ``options`` go to :func:`build_pipeline`.
    A pipeline larger than ``max_spec_bytes`` is refused (and not written), naming the rounds
    that made it large and the config keys to change."""
    import tempfile

    from kfp import compiler

    from spnas.config import load_config
    func = build_pipeline(config_path, image=image, parallelism=parallelism, **options)
    with tempfile.TemporaryDirectory(prefix="spnas-compile-") as tmp:
        staged = Path(tmp) / "pipeline.yaml"
        compiler.Compiler().compile(func, str(staged))
        size = staged.stat().st_size
        if size > max_spec_bytes:
            cfg = load_config(yaml.safe_load(Path(config_path).read_text()), workdir=tmp)
            rounds = [f"{s.name}: max_sample {s.search['max_sample']} / candidates_per_round "
                      f"{s.search.get('candidates_per_round', 4)} = "
                      f"{math.ceil(s.search['max_sample'] / s.search.get('candidates_per_round', 4))} rounds"
                      for s in cfg.steps if s.role in ("serial", "parallel")]
            raise SystemExit(f"{config_path}: the compiled pipeline would be {size:,} bytes, over the safe "
                             f"{max_spec_bytes:,} (Argo keeps a workflow in one Kubernetes object): every round is "
                             f"unrolled ({'; '.join(rounds)}). Raise candidates_per_round (more candidates per "
                             "round, fewer rounds) or lower max_sample.")
        Path(output).write_bytes(staged.read_bytes())
    return Path(output)


def add_compile_args(ap: argparse.ArgumentParser, output: str) -> None:
    """The command-line options every pipeline's compiler takes (this one's and the retraining
    pipeline's): config, output, image, pull secret, /dev/shm, data volume, retries, workspace,
    time limits."""
    ap.add_argument("--config", default="configs/demo.yml")
    ap.add_argument("--output", default=output)
    ap.add_argument("--image", default=os.environ.get("IMAGE", DEFAULT_IMAGE), help="component (and serving) image")
    ap.add_argument("--require-digest", action="store_true", help="refuse an image not pinned by @sha256: digest")
    ap.add_argument("--image-pull-secret", default=None, help="secret for a private registry (in the profile namespace)")
    ap.add_argument("--shm-size", default="2Gi", help="size limit of each training pod's memory-backed /dev/shm")
    ap.add_argument("--data-volume", default="workspace", metavar="workspace|pvc:NAME|none",
                    help="where the data set is staged once per run: the run's KFP workspace (backend >= 2.15, "
                         "default), an existing ReadWriteMany claim, or none (every pod caches its own copy)")
    ap.add_argument("--retry-backoff", type=int, default=60, metavar="SECONDS",
                    help="wait before a failed training task's first retry (doubling after; default 60)")
    ap.add_argument("--workspace-size", default="100Gi", help="size of the run's workspace (the data set and its cache)")
    ap.add_argument("--workspace-storage-class", default=None,
                    help="storage class of the workspace claim (ReadWriteMany; default: the cluster's)")
    for kind, seconds in TIMEOUTS.items():
        ap.add_argument(f"--timeout-{kind}", type=int, default=seconds, metavar="SECONDS",
                        help=f"time limit of a {kind} task (default {seconds})")


def compile_options(args: argparse.Namespace) -> dict:
    """The keyword options of :func:`add_compile_args`' values (time limits checked)."""
    timeouts = {kind: getattr(args, f"timeout_{kind}") for kind in TIMEOUTS}
    bad = [f"--timeout-{k} {v}" for k, v in timeouts.items() if v < 60]
    if bad:
        raise SystemExit(f"{', '.join(bad)}: a time limit must be at least 60 seconds")
    return {"timeouts": timeouts, "shm_size": args.shm_size, "image_pull_secret": args.image_pull_secret,
            "require_digest": args.require_digest, "data_volume": args.data_volume,
            "workspace_size": args.workspace_size, "workspace_storage_class": args.workspace_storage_class,
            "retry_backoff": args.retry_backoff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_compile_args(ap, "pipelines/spnas_pipeline.yaml")
    ap.add_argument("--parallelism", type=int, default=4, help="candidate pods per round at once")
    ap.add_argument("--full-train-nodes", type=int, default=1, metavar="N",
                    help="default of the full_train_nodes parameter (more than 1: each full train runs as a Kubeflow "
                         "Trainer TrainJob on N nodes; default 1)")
    ap.add_argument("--full-train-gpus-per-node", type=int, default=0, metavar="G",
                    help="default of the full_train_gpus_per_node parameter (GPUs of each TrainJob node; default 0)")
    ap.add_argument("--max-spec-bytes", type=int, default=MAX_SPEC_BYTES,
                    help=f"refuse a compiled pipeline larger than this (default {MAX_SPEC_BYTES})")
    args = ap.parse_args()
    print(compile_pipeline(args.config, args.output, args.image, args.parallelism, args.max_spec_bytes,
                           full_train_nodes=args.full_train_nodes, full_train_gpus_per_node=args.full_train_gpus_per_node,
                           **compile_options(args)))


if __name__ == "__main__":
    main()
