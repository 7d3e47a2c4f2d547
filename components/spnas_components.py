"""Kubeflow Pipelines components of SP-NAS: typed interfaces, each body one library call.

``build_components(image)`` turns the functions below into KFP components running on ``image``
(``install_kfp_package=False``: the image has kfp). The logic lives in
:mod:`spnas.orchestration.pods` and is tested without kfp. Large data never travels as an
artifact: data sets, parents' weights and results are URIs (``s3://``/``minio://``, or paths
under kfp.local) that the library fetches and caches; the data set enters once, as the Dataset
artifact of ``stage_data`` (its root and version in the metadata, staged in the run's workspace
when there is one), and every training task takes it with the workspace path. A candidate's
failure (its training crashed, was killed or ran too long included) comes back as data, so one
bad candidate cannot fail a ParallelFor. A training pod given several GPUs trains data-parallel
across them; with ``full_train_nodes > 1`` the full-train task runs its training as a Kubeflow
Trainer TrainJob on that many nodes. Importing this module imports no torch.
"""
from types import SimpleNamespace
from typing import Optional

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

DEFAULT_IMAGE = "ghcr.io/spnas-kfp/spnas:0.1.0"


def prepare(config: str, seed: int, candidate_epochs: int, full_epochs: int, full_train_nodes: int = 1,
            full_train_gpus_per_node: int = 0, shared_volume: bool = True) -> str:
    """Validate the run config with this run's parameters, before any pod trains.

    Args:
        config: the run config (Vega-style YAML/JSON text embedded at compile time).
        seed: the run's seed (-1 keeps the config's).
        candidate_epochs: epochs of every search candidate (-1 keeps the config's).
        full_epochs: epochs of the full train (-1 keeps the config's).
        full_train_nodes: nodes of the full train (more than 1: a Kubeflow Trainer TrainJob).
        full_train_gpus_per_node: GPUs of each node of a multi-node full train (>= 1 when
            full_train_nodes > 1).
        shared_volume: whether the pipeline stages the data on a volume every pod mounts
            (compiled in; a multi-node full train needs one).

    Returns the config overrides as a JSON list of ``key=value``.
    """
    import json

    from spnas.orchestration import pods
    return json.dumps(pods.prepare(config, seed, candidate_epochs, full_epochs, full_train_nodes,
                                   full_train_gpus_per_node, shared_volume))


def preflight(config: str, overrides: str, data_uri: str, run_uri: str, expected: str) -> str:
    """Refuse in seconds a run that cannot succeed, before any pod trains: the image's spnas
    version, the config's shape against the compiled DAG, the data set's COCO layout, a writable
    results prefix.

    Args:
        config: the run config text.
        overrides: JSON list of config overrides (from prepare).
        data_uri: the detection data set (COCO layout).
        run_uri: this run's prefix (a marker is written there and deleted).
        expected: what the pipeline was compiled for (spnas version and DAG shape, JSON).

    Returns what was checked (JSON text).
    """
    import json

    from spnas.orchestration import pods
    return json.dumps(pods.preflight(config, overrides, data_uri, run_uri, expected))


def run_prefix(results_uri: str, job_id: str) -> str:
    """Where this run publishes its files.

    Args:
        results_uri: the results prefix (``s3://bucket/prefix`` or ``minio://...``); empty: the
            cluster default ``minio://mlpipeline/private/<namespace>/spnas``, a prefix multi-user
            KFP lets the run's profile write.
        job_id: the pipeline job id (one folder per run).
    """
    from spnas.orchestration import pods
    return pods.run_prefix(results_uri, job_id)


def stage_data(config: str, overrides: str, data_uri: str, workspace: str, run_uri: str,
               dataset: Output[Dataset]):
    """Stage the detection data set once for the whole run and record its version.

    Args:
        config: the run config text.
        overrides: JSON list of config overrides (from prepare).
        data_uri: the detection data set (COCO layout).
        workspace: the run's workspace path ("" without one: every pod caches on its own).
        run_uri: this run's prefix (the manifest is published under ``data/``).

    The Dataset artifact holds the summary; its metadata: root, version (hash of every object's
    key and ETag), objects, bytes, manifest URI, staged folder, objects downloaded.
    """
    from spnas.orchestration import pods
    pods.stage_data_task(config, overrides, data_uri, workspace, run_uri, dataset)


def fine_tune(config: str, step: str, dataset: Input[Dataset], workspace: str, run_uri: str, overrides: str,
              model: Output[Model], metrics: Output[Metrics], accelerator_type: str = "nvidia.com/gpu",
              gpus_per_task: int = 0, cpu_per_task: str = "", memory_per_task: str = "") -> list[dict]:
    """The seed detector, converted from torchvision when configured, fine-tuned
    (data-parallel across the pod's GPUs when it has more than one).

    Args:
        config: the run config text.
        step: the fine_tune step's name.
        dataset: the run's data set (from stage_data).
        workspace: the run's workspace path ("" without one).
        run_uri: this run's prefix.
        overrides: JSON list of config overrides (from prepare).
        accelerator_type, gpus_per_task, cpu_per_task, memory_per_task: the pod's own requests,
            recorded with the model (one training process per GPU).

    Returns ``[seed record]``: the serial search's seeds.
    """
    from spnas.orchestration import pods
    return pods.fine_tune_task(config, step, dataset, workspace, run_uri, overrides, model, metrics,
                               {"accelerator": accelerator_type, "gpus": gpus_per_task,
                                "cpu": cpu_per_task, "memory": memory_per_task})


def search_init(config: str, step: str, seeds: list[dict], run_uri: str, overrides: str, dataset: Input[Dataset],
                workspace: str) -> str:
    """Start a serial (SpNasS) or parallel (SpNasP) search from seed records.

    Args:
        config: the run config text.
        step: the search step's name.
        seeds: the previous phase's records (weights by URI).
        run_uri: this run's prefix.
        overrides: JSON list of config overrides.
        dataset: the run's data set (from stage_data); a serial seed derived for another code
            of the search space is evaluated on it.
        workspace: the run's workspace path ("" without one).

    Returns the search state's URI (stored under the run's prefix: the state grows with every
    candidate, so tasks pass it by reference).
    """
    from spnas.orchestration import pods
    return pods.search_init_task(config, step, seeds, run_uri, overrides, dataset, workspace)


def propose(state: str, k: int, run_uri: str, step: str) -> str:
    """One round: the new state and its candidates (each names its parent's weights by URI).

    Args:
        state: the search state's URI.
        k: candidates in this round.
        run_uri: this run's prefix (the proposal is stored under it).
        step: the search step's name.

    Returns the proposal's URI.
    """
    from spnas.orchestration import pods
    return pods.propose(state, k, run_uri, step)


def candidates(proposal: str, run_uri: str, overrides: str) -> list[dict]:
    """The proposal's candidates for the round's ParallelFor, each carrying the run's prefix and
    overrides (so the loop body needs no other task's output).

    Args:
        proposal: propose's output.
        run_uri: this run's prefix.
        overrides: JSON list of config overrides.
    """
    from spnas.orchestration import pods
    return pods.candidates(proposal, run_uri, overrides)


def train_candidate(config: str, step: str, candidate: dict, dataset: Input[Dataset], workspace: str,
                    time_limit: int, accelerator_type: str, gpus_per_task: int, cpu_per_task: str,
                    memory_per_task: str, model: Output[Model], metrics: Output[Metrics]) -> dict:
    """Inherit the parent's weights, train, evaluate, in a child process; a failure (a crash or
    kill of the training, a time limit included) is returned, never raised.

    Args:
        config: the run config text.
        step: the search step's name.
        candidate: one candidate of the round.
        dataset: the run's data set (from stage_data).
        workspace: the run's workspace path ("" without one).
        time_limit: seconds the training may take (0: no limit) before it is a failed candidate.
        accelerator_type, gpus_per_task, cpu_per_task, memory_per_task: the pod's own requests,
            recorded with the model (one training process per GPU).
    """
    from spnas.orchestration import pods
    return pods.train_candidate_task(config, step, candidate, dataset, workspace, model, metrics,
                                     {"accelerator": accelerator_type, "gpus": gpus_per_task,
                                      "cpu": cpu_per_task, "memory": memory_per_task}, time_limit)


def update(proposal: str, results: list[dict], step: str, run_uri: str) -> str:
    """Record a round's results in the search state (a round whose candidates all failed stops).

    Args:
        proposal: propose's output (the proposal's URI).
        results: the round's training results.
        step: the search step's name.
        run_uri: this run's prefix (the new state is stored under it).

    Returns the new state's URI.
    """
    from spnas.orchestration import pods
    return pods.update(proposal, results, step, run_uri)


def search_front(state: str, run_uri: str, step: str, plot: Output[HTML]) -> list[dict]:
    """Publish state, output.csv and the Pareto plot; return the Pareto front.

    Args:
        state: the final search state's URI.
        run_uri: this run's prefix.
        step: the search step's name.
    """
    from spnas.orchestration import pods
    return pods.search_front(state, run_uri, step, plot.path)


def choose(config: str, step: str, front: list[dict], run_uri: str, overrides: str) -> list[dict]:
    """The models a reignition or full train takes from the front (top_k by mAP), as loop items.

    Args:
        config: the run config text.
        step: the reignition or full train step's name.
        front: the search's Pareto front.
        run_uri: this run's prefix.
        overrides: JSON list of config overrides.
    """
    from spnas.orchestration import pods
    return pods.choose(config, step, front, run_uri, overrides)


def reignite(config: str, step: str, item: dict, dataset: Input[Dataset], workspace: str, accelerator_type: str,
             gpus_per_task: int, cpu_per_task: str, memory_per_task: str, model: Output[Model]) -> dict:
    """Re-train one model's backbone as a classifier and put it back.

    Args:
        config: the run config text.
        step: the reignition step's name.
        item: one chosen model (from choose).
        dataset: the run's data set (from stage_data).
        workspace: the run's workspace path ("" without one).
        accelerator_type, gpus_per_task, cpu_per_task, memory_per_task: the pod's own requests,
            recorded with the model.
    """
    from spnas.orchestration import pods
    return pods.reignite_task(config, step, item, dataset, workspace, model,
                              {"accelerator": accelerator_type, "gpus": gpus_per_task,
                               "cpu": cpu_per_task, "memory": memory_per_task})


def collect(records: list[dict], run_uri: str, step: str) -> list[dict]:
    """The records of a fanned-out phase, with its output.csv published.

    Args:
        records: the loop's records.
        run_uri: this run's prefix.
        step: the step's name.
    """
    from spnas.orchestration import pods
    return pods.collect(records, run_uri, step)


def full_train(config: str, step: str, item: dict, dataset: Input[Dataset], workspace: str, accelerator_type: str,
               gpus_per_task: int, cpu_per_task: str, memory_per_task: str, model: Output[Model],
               metrics: Output[Metrics], full_train_nodes: int = 1, full_train_gpus_per_node: int = 0,
               trainjob: str = "{}",
               node_selector: Optional[dict] = None,  # noqa: UP045 (kfp parses no `X | None` annotation)
               tolerations: Optional[list] = None) -> dict:  # noqa: UP045
    """Train one chosen model with the full schedule: in this pod (data-parallel across its GPUs
    when it has more than one), or with full_train_nodes > 1 as a Kubeflow Trainer TrainJob on
    that many nodes, created and watched by this pod, its result read back from the workspace.

    Args:
        config: the run config text.
        step: the full train step's name.
        item: one chosen model (from choose).
        dataset: the run's data set (from stage_data).
        workspace: the run's workspace path ("" without one); a TrainJob's nodes mount it too.
        accelerator_type, gpus_per_task, cpu_per_task, memory_per_task: the pod's own requests,
            recorded with the model; the cpu and memory of each TrainJob node.
        full_train_nodes: nodes of the training (1: this pod trains).
        full_train_gpus_per_node: GPUs of each TrainJob node, one process each.
        trainjob: the TrainJob's compiled-in settings (JSON: image, shm_size, image_pull_secret,
            time_limit).
        node_selector, tolerations: where the TrainJob's nodes may run.
    """
    import json

    from spnas.orchestration import pods
    cluster = {**json.loads(trainjob or "{}"), "node_selector": node_selector or {}, "tolerations": tolerations or []}
    return pods.full_train_task(config, step, item, dataset, workspace, model, metrics,
                                {"accelerator": accelerator_type, "gpus": gpus_per_task,
                                 "cpu": cpu_per_task, "memory": memory_per_task},
                                full_train_nodes, full_train_gpus_per_node, cluster)


def finish(config: str, records: list[dict], run_uri: str, step: str, overrides: str) -> dict:
    """The run's result: the best fully trained model by the run's quality (output.csv published).

    Args:
        config: the run config text (its objectives name the run's quality).
        records: the full trains' records.
        run_uri: this run's prefix.
        step: the full train step's name.
        overrides: the run's config overrides (JSON list).
    """
    from spnas.orchestration import pods
    return pods.finish(config, records, run_uri, step, overrides)


def reignite_if_plateau(config: str, step: str, state: str, dataset: Input[Dataset], workspace: str, run_uri: str,
                        overrides: str, accelerator_type: str, gpus_per_task: int, cpu_per_task: str,
                        memory_per_task: str, models: Output[Model]) -> str:
    """After a serial round: reignite the front when its best mAP stopped improving
    (``reignition_patience`` rounds, at most ``max_reignitions`` times); else pass the state on.

    Args:
        config: the run config text.
        step: the serial step's name.
        state: the search state's URI after the round's update.
        dataset: the run's data set (from stage_data).
        workspace: the run's workspace path ("" without one).
        run_uri: this run's prefix.
        overrides: JSON list of config overrides.
        accelerator_type, gpus_per_task, cpu_per_task, memory_per_task: the pod's own requests.

    Returns the state's URI; ``models`` holds the reignited models' weights (metadata
    ``reignited``: their ids and URIs; empty when the front was still improving).
    """
    from spnas.orchestration import pods
    return pods.reignite_if_plateau_task(config, step, state, dataset, workspace, run_uri, overrides, models)


def phase_control(config: str, step: str, state: str, dataset: Input[Dataset], workspace: str, run_uri: str,
                  overrides: str, accelerator_type: str, gpus_per_task: int, cpu_per_task: str, memory_per_task: str,
                  model: Output[Model], metrics: Output[Metrics]) -> dict:
    """A search phase's equal-budget control: the phase's starting model trained as many times
    with the step's schedule as the phase's best candidate was along its lineage.

    Args:
        config: the run config text.
        step: the search step's name.
        state: the search's final state (URI).
        dataset: the run's data set (from stage_data).
        workspace: the run's workspace path ("" without one).
        run_uri: this run's prefix.
        overrides: JSON list of config overrides.
        accelerator_type, gpus_per_task, cpu_per_task, memory_per_task: the pod's own requests
            (one training process per GPU).
    """
    from spnas.orchestration import pods
    return pods.phase_control_task(config, step, state, dataset, workspace, run_uri, overrides, model, metrics,
                                   {"accelerator": accelerator_type, "gpus": gpus_per_task,
                                    "cpu": cpu_per_task, "memory": memory_per_task})


def final_control(config: str, step: str, fine_tuned: list[dict], best: dict, dataset: Input[Dataset],
                  workspace: str, run_uri: str, overrides: str, accelerator_type: str, gpus_per_task: int,
                  cpu_per_task: str, memory_per_task: str, model: Output[Model], metrics: Output[Metrics]) -> dict:
    """The run's equal-budget control: the fine-tuned seed trained from the same weights as long as
    the searched model's lineage (the full train's schedule stretched); both measured for latency
    and memory.

    Args:
        config: the run config text.
        step: the full train step's name.
        fine_tuned: fine_tune's output (the seed record).
        best: the best fully trained model.
        dataset: the run's data set (from stage_data).
        workspace: the run's workspace path ("" without one).
        run_uri: this run's prefix.
        overrides: JSON list of config overrides.
        accelerator_type, gpus_per_task, cpu_per_task, memory_per_task: the pod's own requests
            (one training process per GPU).

    Returns ``{"searched": ..., "control": ...}``.
    """
    from spnas.orchestration import pods
    return pods.final_control_task(config, step, fine_tuned, best, dataset, workspace, run_uri, overrides, model,
                                   metrics,
                                   {"accelerator": accelerator_type, "gpus": gpus_per_task,
                                    "cpu": cpu_per_task, "memory": memory_per_task})


def publish(config: str, serial_front: list[dict], parallel_front: list[dict], best: dict, controls: dict,
            serial_control: dict, parallel_control: dict, run_uri: str, overrides: str, report: Output[Markdown]) -> str:
    """The run's Markdown report and control.json: the result, the searched model beside its
    equal-budget control, and the fronts of both searches.

    Args:
        config: the run config text.
        serial_front: the serial search's front.
        parallel_front: the parallel search's front.
        best: the best fully trained model.
        controls: final_control's output ({} when controls are off).
        serial_control, parallel_control: the search phases' controls ({} when off).
        run_uri: this run's prefix.
        overrides: JSON list of config overrides.

    Returns the URI of the run's result (the searched model, or its control when that wins), copied to
    ``<run>/model_final.pth``: the one weight file under the run's prefix (every other lives in its Model).
    """
    from spnas.orchestration import pods
    return pods.report(config, serial_front, parallel_front, best, controls or None,
                       {"serial": serial_control, "parallel": parallel_control}, run_uri, report.path, overrides)


# ----------------------------------------------------------------------------- shipping and retraining

def export_model(config: str, step: str, record: dict, controls: dict, weights: str, dataset: Input[Dataset],
                 workspace: str, run_uri: str, name: str, overrides: str, gate_images: int,
                 parity: Output[Metrics]) -> dict:
    """Export a trained model (ONNX and TorchScript, labels, model card) to ``<run>/export/``
    behind the parity gate: ONNX Runtime and TorchScript against PyTorch on the data set's val
    images. A failed gate fails this task (the folder and its parity.json are still published).

    Args:
        config: the run config text.
        step: the step whose data settings read the data set (the full train's).
        record: the model's record (its description): the full train's best.
        controls: final_control's output ({}: none); when the run's control.json says the
            control won, the control is exported instead (the run's result).
        weights: the result's weights (URI or path).
        dataset: the run's data set (from stage_data).
        workspace: the run's workspace path ("" without one).
        run_uri: this run's prefix.
        name: the model's name (registry and serving).
        overrides: JSON list of config overrides.
        gate_images: val images the parity gate runs on (0: all).

    Returns the export's summary (export_uri, weights, passed, mAP, params, GFLOPs, latency, parity figures).
    """
    from spnas.orchestration import ship
    return ship.export_task(config, step, record, controls, weights, dataset, workspace, run_uri, name, overrides,
                            gate_images, parity)


def register_model(export: dict, model_name: str, registry_uri: str, note: Output[Markdown]) -> dict:
    """Register the export in the MLflow Model Registry: the champion when the model has none,
    else the challenger. Without a registry (registry_uri empty and no MLFLOW_TRACKING_URI)
    nothing is registered and the note says so.

    Args:
        export: export_model's summary.
        model_name: the registered model's name.
        registry_uri: the MLflow tracking URI ("" = the pod's MLFLOW_TRACKING_URI).
    """
    from spnas.orchestration import ship
    return ship.register_task(export, model_name, registry_uri, note)


def retrain_preflight(config: str, overrides: str, data_uri: str, run_uri: str, expected: str, model_name: str,
                      registry_uri: str) -> dict:
    """Refuse in seconds a retraining that cannot succeed: preflight's checks, then the registry
    (reachable, the model has a champion).

    Args:
        config: the run config text.
        overrides: JSON list of config overrides (from prepare).
        data_uri: the new data set (COCO layout).
        run_uri: this run's prefix.
        expected: what the pipeline was compiled for (JSON).
        model_name: the registered model.
        registry_uri: the MLflow tracking URI ("" = MLFLOW_TRACKING_URI).
    """
    from spnas.orchestration import ship
    return ship.retrain_preflight(config, overrides, data_uri, run_uri, expected, model_name, registry_uri)


def fetch_champion(model_name: str, run_uri: str, overrides: str, registry_uri: str) -> dict:
    """The registered champion as a record to train from (its weights copied under the run).

    Args:
        model_name: the registered model.
        run_uri: this run's prefix.
        overrides: JSON list of config overrides.
        registry_uri: the MLflow tracking URI ("" = MLFLOW_TRACKING_URI).
    """
    from spnas.orchestration import ship
    return ship.fetch_champion(model_name, run_uri, overrides, registry_uri)


def evaluate_model(config: str, step: str, record: dict, dataset: Input[Dataset], workspace: str, role: str,
                   overrides: str, metrics: Output[Metrics]) -> dict:
    """COCO metrics of a model on the data set's validation split.

    Args:
        config: the run config text.
        step: the step whose data settings read the data set.
        record: the model's record (description and weights).
        dataset: the run's data set (from stage_data).
        workspace: the run's workspace path ("" without one).
        role: "champion" or "challenger" (shown with the metrics).
        overrides: JSON list of config overrides.
    """
    from spnas.orchestration import ship
    return ship.evaluate_task(config, step, record, dataset, workspace, role, overrides, metrics)


def decide(champion: dict, challenger: dict, margin: float, run_uri: str, verdict: Output[Markdown]) -> str:
    """Promote when the challenger beats the champion by at least margin points on the same split
    (box mAP; mIoU for a semantic segmentation model).

    Args:
        champion: evaluate_model's result for the champion.
        challenger: evaluate_model's result for the challenger.
        margin: the mAP (or mIoU) points the challenger must gain.
        run_uri: this run's prefix (verdict.json is written there).

    Returns "promote" or "keep".
    """
    from spnas.orchestration import ship
    return ship.decide_task(champion, challenger, margin, run_uri, verdict)


def promote(export: dict, model_name: str, run_uri: str, image: str, registry_uri: str,
            release: Output[Markdown]) -> dict:
    """Release the winning challenger: its KServe InferenceService manifest beside the export,
    a new registered version, and the champion alias moved to it.

    Args:
        export: export_model's summary.
        model_name: the registered model.
        run_uri: this run's prefix (its verdict.json).
        image: the image the InferenceService runs (`spnas serve`).
        registry_uri: the MLflow tracking URI ("" = MLFLOW_TRACKING_URI).
    """
    from spnas.orchestration import ship
    return ship.promote_task(export, model_name, run_uri, image, registry_uri, release)


def keep_champion(model_name: str, run_uri: str, registry_uri: str, note: Output[Markdown]) -> dict:
    """Record that the champion stays (both figures); the registry is left unchanged.

    Args:
        model_name: the registered model.
        run_uri: this run's prefix (its verdict.json).
        registry_uri: the MLflow tracking URI ("" = MLFLOW_TRACKING_URI).
    """
    from spnas.orchestration import ship
    return ship.keep_task(model_name, run_uri, registry_uri, note)


_FUNCTIONS = (prepare, preflight, run_prefix, stage_data, fine_tune, search_init, propose, candidates, train_candidate, update,
              search_front, choose, reignite, collect, full_train, finish, reignite_if_plateau, phase_control, final_control,
              publish, export_model, register_model, retrain_preflight, fetch_champion, evaluate_model, decide, promote,
              keep_champion)


def build_components(image: str = DEFAULT_IMAGE) -> SimpleNamespace:
    """Every component, built for ``image``: ``c = build_components(image); c.fine_tune(...)``."""
    return SimpleNamespace(**{f.__name__: dsl.component(f, base_image=image, install_kfp_package=False)
                              for f in _FUNCTIONS})
