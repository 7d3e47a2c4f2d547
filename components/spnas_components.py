"""Kubeflow Pipelines components of SP-NAS: typed interfaces, each body one library call.

Every component runs on this project's image (``SPNAS_IMAGE`` at compile time) with
``install_kfp_package=False``; the logic lives in :mod:`spnas.remote` and is tested without
kfp. Large data never travels as an artifact: datasets, parents' weights and results are
URIs (``s3://``/``minio://``, or paths under kfp.local) that the library fetches and caches.
A candidate's failure comes back as data, so one bad candidate cannot fail a ParallelFor.
"""

import os
from typing import List, NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Markdown, Metrics, Model, Output

IMAGE = os.environ.get("SPNAS_IMAGE", "ghcr.io/spnas-kfp/spnas:0.1.0")


def _component(func):
    return dsl.component(func, base_image=IMAGE, install_kfp_package=False)


@_component
def fine_tune(config: str, step: str, data_uri: str, run_uri: str, overrides: str,
              model: Output[Model], metrics: Output[Metrics]) -> List[dict]:
    """SPEC 2.1: the seed detector, converted from torchvision when configured, fine-tuned.
    Returns ``[seed record]``: the serial search's seeds."""
    from spnas import remote
    rec = remote.fine_tune(config, step, data_uri, run_uri, model.path, overrides)
    model.metadata.update({"desc": rec["desc"], "uri": rec["weights"], "id": rec["id"]})
    for key, value in rec["metrics"].items():
        if isinstance(value, (int, float)):
            metrics.log_metric(key, value)
    return [rec]


@_component
def search_init(config: str, step: str, seeds: List[dict], run_uri: str, overrides: str) -> str:
    """Start a serial (SpNasS) or parallel (SpNasP) search from seed records."""
    from spnas import remote
    return remote.search_init(config, step, seeds, run_uri, overrides)


@_component
def propose(state: str, k: int) -> str:
    """One round: the new state and its candidates (each names its parent's weights by URI)."""
    from spnas import remote
    return remote.propose(state, k)


@_component
def candidates(proposal: str, run_uri: str, overrides: str) -> List[dict]:
    """The proposal's candidates for the round's ParallelFor, each carrying the run's prefix and
    overrides (so the loop body needs no other task's output)."""
    from spnas import remote
    return remote.candidates(proposal, run_uri, overrides)


@_component
def train_candidate(config: str, step: str, candidate: dict, data_uri: str, accelerator_type: str,
                    gpus_per_task: int, cpu_per_task: str, memory_per_task: str,
                    model: Output[Model], metrics: Output[Metrics]) -> dict:
    """Inherit the parent's weights, train, evaluate; a failure is returned, never raised.
    The resource arguments are the pod's own requests, recorded with the model."""
    from spnas import remote
    result = remote.train_candidate(config, step, candidate, data_uri, candidate["run_uri"], model.path,
                                    candidate["overrides"])
    model.metadata.update({"id": result["id"], "status": result["status"], "uri": result.get("weights") or "",
                           "desc": candidate.get("desc", {}), "error": result.get("error") or "",
                           "resources": {"accelerator": accelerator_type, "gpus": gpus_per_task,
                                         "cpu": cpu_per_task, "memory": memory_per_task}})
    if result["status"] != "ok":
        import os
        os.makedirs(os.path.dirname(model.path), exist_ok=True)
        with open(model.path, "w") as fh:  # the launcher uploads every declared output
            fh.write(f"candidate failed: {result.get('error')}\n")
    for key, value in (result.get("metrics") or {}).items():
        if isinstance(value, (int, float)):
            metrics.log_metric(key, value)
    return result


@_component
def update(proposal: str, results: List[dict]) -> str:
    """Record a round's results in the search state."""
    from spnas import remote
    return remote.update(proposal, results)


@_component
def search_front(state: str, run_uri: str, step: str, plot: Output[HTML]) -> List[dict]:
    """Publish state, output.csv and the Pareto plot; return the Pareto front."""
    import base64
    import json
    import tempfile
    from pathlib import Path
    from spnas import remote
    from spnas.plot import pareto_plot
    from spnas.search import front, records
    fr = remote.search_front(state, run_uri, step)
    with tempfile.TemporaryDirectory() as tmp:
        st = remote.plain(json.loads(state))
        png = pareto_plot(records(st), [r["id"] for r in front(st)], Path(tmp) / "pareto.png", step)
        data = base64.b64encode(png.read_bytes()).decode()
    with open(plot.path, "w") as fh:
        fh.write(f"<html><body><h2>{step}: Pareto front {[r['id'] for r in fr]}</h2>"
                 f"<img src='data:image/png;base64,{data}'/></body></html>")
    return fr


@_component
def reignition(config: str, step: str, front: List[dict], data_uri: str, run_uri: str,
               overrides: str) -> List[dict]:
    """SPEC 2.3: re-train the front's backbones as classifiers."""
    from spnas import remote
    return remote.reignition(config, step, front, data_uri, run_uri, overrides)


@_component
def full_train(config: str, step: str, front: List[dict], data_uri: str, run_uri: str, overrides: str,
               model: Output[Model], metrics: Output[Metrics]) -> dict:
    """SPEC 2.5: the best parallel candidate trained with the full schedule: the final model."""
    from spnas import remote
    rec = remote.full_train(config, step, front, data_uri, run_uri, model.path, overrides)
    model.metadata.update({"desc": rec["desc"], "uri": rec["weights"], "id": rec["id"]})
    for key, value in rec["metrics"].items():
        if isinstance(value, (int, float)):
            metrics.log_metric(key, value)
    return rec


@_component
def publish(serial_front: List[dict], parallel_front: List[dict], best: dict, report: Output[Markdown]) -> str:
    """A Markdown report of the run: the best model and the fronts of both searches."""
    from spnas import remote
    text = remote.report_markdown({"serial front": serial_front, "parallel front": parallel_front}, best)
    with open(report.path, "w") as fh:
        fh.write(text)
    return best.get("weights", "")


@_component
def prepare(config: str, seed: int, candidate_epochs: int, full_epochs: int) -> str:
    """Validate the config with this run's parameters; returns the config overrides (JSON list)."""
    import json
    from spnas import remote
    return json.dumps(remote.prepare(config, seed, candidate_epochs, full_epochs))


@_component
def run_prefix(results_uri: str, job_id: str) -> str:
    """Where this run publishes: ``results_uri/<job id>``."""
    return f"{results_uri.rstrip('/')}/{job_id}" if job_id else results_uri
