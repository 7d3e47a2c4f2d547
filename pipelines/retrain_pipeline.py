"""The retraining pipeline: the production model retrained on new data, promoted only when better.

    python -m pipelines.retrain_pipeline --config configs/demo.yml --output pipelines/retrain_pipeline.yaml

prepare -> preflight (config, data, results prefix, the registry and its champion) -> stage the
new data (its version manifest) and fetch the champion -> train the champion's architecture from
its weights on the new data (the config's full-train schedule; ``epochs`` overrides it) ->
evaluate the champion *and* the retrained challenger on the same new val split -> decide:
``dsl.If`` the challenger gains at least ``margin`` mAP (mIoU for a semantic model): export behind the parity gate, write the
KServe InferenceService manifest, register the new version and move the ``champion`` alias;
``dsl.Else``: record that the champion stays, both figures shown. Scheduled with ``make
schedule`` (no catch-up, one run at a time); the NAS pipeline stays on demand (``make run``).
The registry is the MLflow Model Registry at ``registry_uri`` (else the pods'
``MLFLOW_TRACKING_URI``). Wiring only: every step is a component of components/spnas_components.py.
"""

import argparse
import json
from pathlib import Path

import yaml

from pipelines.spnas_pipeline import (
    DEFAULT_IMAGE,
    EXPORT_RESOURCES,
    GATE_IMAGES,
    SECRET,
    TIMEOUTS,
    TaskStyle,
    add_compile_args,
    candidate_time_limit,
    check_image,
    compile_options,
    data_volume_path,
)

PACKAGE = Path(__file__).parent / "retrain_pipeline.yaml"


def build_retrain_pipeline(config_path: "str | Path", image: str = DEFAULT_IMAGE, retries: int = 2,
                           secret: "str | None" = SECRET, caching: bool = False,
                           timeouts: "dict[str, int] | None" = None, shm_size: str = "2Gi",
                           image_pull_secret: "str | None" = None, require_digest: bool = False,
                           data_volume: str = "workspace", workspace_size: str = "100Gi",
                           workspace_storage_class: "str | None" = None, retry_backoff: int = 60):
    """Return the ``@dsl.pipeline`` function of the retraining pipeline for ``config_path`` (its
    full-train step's schedule and data settings; read now, embedded as text), every component
    running on ``image`` (also the image the InferenceService manifest names). The options are
    :func:`pipelines.spnas_pipeline.build_pipeline`'s."""
    from kfp import dsl

    from components.spnas_components import build_components
    from spnas.config import load_config
    from spnas.orchestration.pods import compiled_contract
    image = check_image(image, require_digest)
    c = build_components(image)
    limits = {**TIMEOUTS, **(timeouts or {})}
    workspace = data_volume_path(data_volume)
    pvc = data_volume[4:].strip() if data_volume.startswith("pvc:") else None
    style = TaskStyle(caching=caching, limits=limits, image_pull_secret=image_pull_secret, secret=secret,
                      retries=retries, retry_backoff=retry_backoff, shm_size=shm_size, pvc=pvc)
    raw = yaml.safe_load(Path(config_path).read_text())
    cfg = load_config(raw, workdir="/tmp/spnas")
    text = json.dumps(raw, sort_keys=True)  # one line: kfp writes defaults into a comment header
    full = next((s for s in cfg.steps if s.role == "full_train"), None)
    if full is None:
        raise SystemExit(f"{config_path}: the retraining pipeline trains with the config's full-train step; "
                         f"steps are {[s.role for s in cfg.steps]}")
    contract = compiled_contract(Path(config_path).read_text())
    trainjob = json.dumps({"image": image, "shm_size": shm_size, "image_pull_secret": image_pull_secret or "",
                           "time_limit": candidate_time_limit(limits["long"])}, sort_keys=True)
    pipeline_config = None
    if data_volume == "workspace":
        patch = {"accessModes": ["ReadWriteMany"]}
        if workspace_storage_class:
            patch["storageClassName"] = workspace_storage_class
        pipeline_config = dsl.PipelineConfig(workspace=dsl.WorkspaceConfig(
            size=workspace_size, kubernetes=dsl.KubernetesWorkspaceConfig(pvcSpecPatch=patch)))

    @dsl.pipeline(name="spnas-retrain", pipeline_config=pipeline_config,
                  description="Retrain the registered champion on new data; promote the result only when it beats "
                              f"the champion on the same val split (config {Path(config_path).name})")
    def spnas_retrain(data_uri: str, model_name: str = "spnas", margin: float = 0.0, registry_uri: str = "",
                      results_uri: str = "", seed: int = cfg.seed, epochs: int = -1,
                      accelerator_type: str = "nvidia.com/gpu", gpus: int = 0, cpu: str = "4", memory: str = "16G",
                      node_selector: dict = {}, tolerations: list = [],  # noqa: B006 (kfp pipeline defaults)
                      gate_images: int = GATE_IMAGES, config: str = text):
        light, heavy = style.light, style.heavy
        root = {"node_selector": node_selector, "tolerations": tolerations}
        res = {"cpu": cpu, "memory": memory, "accelerator": accelerator_type, "gpus": gpus}
        prep = light(c.prepare(config=config, seed=seed, candidate_epochs=-1, full_epochs=epochs,
                               shared_volume=data_volume != "none"))
        prep.set_display_name("validate config")
        prefix = light(c.run_prefix(results_uri=results_uri, job_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER))
        prefix.set_display_name("run prefix")
        pre = light(c.retrain_preflight(config=config, overrides=prep.output, data_uri=data_uri, run_uri=prefix.output,
                                        expected=contract, model_name=model_name, registry_uri=registry_uri))
        pre.set_display_name("preflight: config, data set, results prefix, registry and champion")
        stage = c.stage_data(config=config, overrides=prep.output, data_uri=data_uri, workspace=workspace,
                             run_uri=prefix.output)
        style.stage(stage).set_display_name("stage the new data (version manifest)").after(pre)
        champ = light(c.fetch_champion(model_name=model_name, run_uri=prefix.output, overrides=prep.output,
                                       registry_uri=registry_uri)).after(pre)
        champ.set_display_name("fetch the champion")
        train = heavy(c.full_train(config=config, step=full.name, item=champ.output, dataset=stage.output,
                                   workspace=workspace, accelerator_type=accelerator_type, gpus_per_task=gpus,
                                   cpu_per_task=cpu, memory_per_task=memory, trainjob=trainjob,
                                   node_selector=node_selector, tolerations=tolerations), root, res, kind="long")
        train.set_display_name("train the champion's architecture on the new data")
        evals = {}
        for role, record in (("champion", champ.output), ("challenger", train.outputs["Output"])):
            ev = heavy(c.evaluate_model(config=config, step=full.name, record=record, dataset=stage.output,
                                        workspace=workspace, role=role, overrides=prep.output), root, res)
            ev.set_display_name(f"evaluate the {role} on the new val split")
            evals[role] = ev
        dec = light(c.decide(champion=evals["champion"].outputs["Output"],
                             challenger=evals["challenger"].outputs["Output"], margin=margin, run_uri=prefix.output))
        dec.set_display_name("decide: challenger better by at least margin?")
        with dsl.If(dec.outputs["Output"] == "promote", name="challenger-wins"):
            exp = style.cpu_heavy(c.export_model(config=config, step=full.name, record=train.outputs["Output"], controls={},
                                       weights="", dataset=stage.output, workspace=workspace, run_uri=prefix.output,
                                       name=model_name, overrides=prep.output, gate_images=gate_images),
                                  EXPORT_RESOURCES)
            exp.set_display_name("export + parity gate")
            pro = light(c.promote(export=exp.outputs["Output"], model_name=model_name, run_uri=prefix.output,
                                  image=image, registry_uri=registry_uri))
            pro.set_display_name("register, write the InferenceService, promote to champion")
        with dsl.Else(name="champion-stays"):
            keep = light(c.keep_champion(model_name=model_name, run_uri=prefix.output, registry_uri=registry_uri))
            keep.set_display_name("champion kept")

    return spnas_retrain


def compile_retrain_pipeline(config_path: "str | Path", output: "str | Path", image: str = DEFAULT_IMAGE,
                             **options) -> Path:
    """Compile the retraining pipeline of ``config_path`` to ``output``; ``options`` go to
    :func:`build_retrain_pipeline`."""
    import tempfile

    from kfp import compiler
    func = build_retrain_pipeline(config_path, image=image, **options)
    with tempfile.TemporaryDirectory(prefix="spnas-compile-") as tmp:
        staged = Path(tmp) / "pipeline.yaml"
        compiler.Compiler().compile(func, str(staged))
        Path(output).write_bytes(staged.read_bytes())
    return Path(output)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_compile_args(ap, "pipelines/retrain_pipeline.yaml")
    args = ap.parse_args()
    print(compile_retrain_pipeline(args.config, args.output, args.image, **compile_options(args)))


if __name__ == "__main__":
    main()
