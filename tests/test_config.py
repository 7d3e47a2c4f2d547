"""Vega-style configs: the reference page's snippets load; every kind of bad config is
rejected with its key path; refs, placeholders and overrides resolve."""
from pathlib import Path

import pytest
import yaml

from spnas.config import load_config
from spnas.utils.errors import ConfigError

REFERENCE = Path(__file__).parent / "data" / "reference.yml"
DEMO = Path(__file__).parent.parent / "configs" / "demo.yml"


def _reference(tmp_path, data_root="/data/coco", pretrained="/cache/models/fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"):
    text = REFERENCE.read_text().replace("{data_root}", str(data_root)).replace("{pretrained}", str(pretrained))
    path = tmp_path / "reference.yml"
    path.write_text(text)
    return path


def test_reference_page_config_loads(tmp_path):
    cfg = load_config(_reference(tmp_path), workdir=tmp_path / "run")
    assert [s.role for s in cfg.steps] == ["fine_tune", "serial", "reignition", "parallel", "full_train"]
    ft, serial, re_, par, full = cfg.steps
    assert ft.convert_pretrained and ft.pretrained_model_file.endswith("fasterrcnn_resnet50_fpn_coco-258fb6c6.pth")
    assert ft.dataset.data_root == "/data/coco" and ft.dataset.img_prefix == "2017"
    assert serial.search["expand_ratio"] == 0.3 and serial.search["max_sample"] == 20
    assert serial.search["objective_keys"] == ("mAP", "params") and serial.freeze_swap_keys is True
    assert serial.codes == ("111-2111-211111-211",)
    assert serial.pretrained_model_file == str(tmp_path / "run") + "/output/fine_tune/model_0.pth"
    assert re_.models_folder == str(tmp_path / "run") + "/output/serial/"
    assert par.codes == ((0, 1, 2, 3),) and par.search["algorithm"] == "SpNasP"
    assert full.models_folder.endswith("/output/parallel/")
    assert all(s.dataset.data_root == "/data/coco" for s in cfg.steps)
    assert serial.model_desc["backbone"]["type"] == "SerialBackbone"
    # what a step after fine_tune writes about models is reported, once, never silently dropped
    unused = " (not used: a step after fine_tune takes the previous phase's models)"
    assert cfg.ignored == tuple(p + unused for p in (
        "serial.model.pretrained_model_file", "reignition.pipe_step.models_folder",
        "parallel.pipe_step.models_folder", "parallel.model.pretrained_model_file", "fully_train.pipe_step.models_folder"))
    assert cfg.warnings == ()


def test_demo_config_loads_with_refs_and_overrides(tmp_path):
    cfg = load_config(DEMO, workdir=tmp_path, overrides=["serial.search_algorithm.max_sample=6", "general.seed=3"])
    serial = cfg.step("serial")
    assert serial.search["max_sample"] == 6 and serial.search["seed"] == 3 and cfg.seed == 3
    assert serial.trainer.epochs == 1 and serial.trainer.lr == 0.08 and serial.trainer.warmup_iters == 20
    assert serial.trainer.effective_lr == 0.02 and serial.trainer.schedule == "cosine"  # 0.08 per 16 images at batch 4
    ft = cfg.step("fine_tune").trainer
    assert (ft.schedule, ft.milestones, ft.weight_decay, ft.warmup_iters) == ("cosine", None, 1e-4, 50)
    assert cfg.step("parallel").trainer.epochs == 1  # ref: serial.trainer, itself a ref
    assert cfg.step("full_train").trainer.epochs == 4 and cfg.step("full_train").trainer.milestones == (3,)
    assert cfg.step("reignition").top_k == 2
    assert cfg.step("serial").model_desc["backbone"]["code"] == "1-2-2-2"  # inherits the fine_tune description


def _bad(tmp_path, mutate):
    raw = yaml.safe_load(DEMO.read_text())
    mutate(raw)
    return raw


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["serial"]["search_algorithm"].update(max_sampel=3), "serial.search_algorithm.max_sampel: unknown key"),
    (lambda r: r["serial"]["search_algorithm"].update(add_stage_ratio=1.5), "serial.search_algorithm.*add_stage_ratio"),
    (lambda r: r["serial"]["search_algorithm"].update(max_sample="many"), "serial.search_algorithm.*max_sample"),
    (lambda r: r["serial"]["search_algorithm"].update(type="Random"), "serial.search_algorithm.type: 'Random' is not"),
    (lambda r: r["serial"]["search_algorithm"].update(expand_ratio=0.5), "expend_ratio: contradicts expand_ratio"),
    (lambda r: r["fine_tune"]["trainer"].update(epochs=-1), "fine_tune.trainer.epochs: must be an integer >= 0, got -1"),
    (lambda r: r["fine_tune"]["trainer"]["optimizer"].update(type="Adam"), "fine_tune.trainer.optimizer.type: 'Adam'"),
    (lambda r: r["fine_tune"]["trainer"]["optimizer"]["params"].update(lr=0), "fine_tune.trainer.optimizer.params.lr"),
    (lambda r: r["fine_tune"]["trainer"]["lr_scheduler"].update(type="PolyLR"), "lr_scheduler.type: 'PolyLR' is not supported"),
    (lambda r: r["fully_train"]["trainer"]["lr_scheduler"]["params"]["after_scheduler_config"]["params"].update(milestones=[0]),
     "after_scheduler_config.params.milestones: must be a list of positive numbers, got \\[0\\]"),
    (lambda r: r["fine_tune"]["trainer"]["lr_scheduler"]["params"]["after_scheduler_config"].update(type="WarmupScheduler"),
     "after_scheduler_config.type: 'WarmupScheduler' is not supported: MultiStepLR or CosineAnnealingLR"),
    (lambda r: r["fine_tune"]["trainer"]["lr_scheduler"].update(by_epoch="yes"),
     "fine_tune.trainer.lr_scheduler.by_epoch: must be true or false, got 'yes'"),
    (lambda r: r["fine_tune"]["trainer"]["lr_scheduler"]["params"].update(warmup_type="cosine"),
     "fine_tune.trainer.lr_scheduler.params.warmup_type: must be one of 'linear', 'constant', 'exp', got 'cosine'"),
    (lambda r: r["fine_tune"]["trainer"].update(lr_scaling="sqrt"),
     "config key fine_tune.trainer.lr_scaling: must be one of 'linear', 'none', got 'sqrt'"),
    (lambda r: r["fine_tune"]["trainer"].update(lr_reference_batch=0), "fine_tune.trainer.lr_reference_batch: must be an integer >= 1"),
    (lambda r: r["fine_tune"]["trainer"].update(clip_grad_norm=1.0, grad_clip=2.0),
     "config key fine_tune.trainer.grad_clip: contradicts clip_grad_norm"),
    (lambda r: r["fine_tune"]["trainer"].update(use_amp=1), "config key fine_tune.trainer.use_amp: must be true or false, got 1"),
    (lambda r: r["fine_tune"]["trainer"].update(metric={"type": "coco", "parmas": {}}),
     "config key fine_tune.trainer.metric.parmas: unknown key \\(known here: params, type\\)"),
    (lambda r: r["fine_tune"]["trainer"].update(with_train="no"), "fine_tune.trainer.with_train: must be true or false"),
    (lambda r: r["fine_tune"]["dataset"]["common"].update(data_path="/elsewhere"),
     "config key fine_tune.dataset.common.data_path: contradicts data_root"),
    (lambda r: r["fine_tune"]["dataset"].update(train={"batch_size": 0}), "config key fine_tune.dataset.train.batch_size: must be an integer >= 1"),
    (lambda r: r["fine_tune"]["dataset"].update(val={"colour": 1}), "config key fine_tune.dataset.val.colour: unknown key"),
    (lambda r: r["reignition"].update(dataset={"type": "Imagenet", "common": {"img_prefix": "2017"}}),
     "config key reignition.dataset.common.img_prefix: unknown key"),
    (lambda r: r["general"].update(local_base_path="/a", task={"local_base_path": "/b"}),
     "config key general.task.local_base_path: contradicts general.local_base_path"),
    (lambda r: r["general"].update(task={"tsk_id": 1}), "config key general.task.tsk_id: unknown key"),
    (lambda r: r["general"].update(cluster_mode=1), "config key general.cluster_mode: unknown key"),  # not in Vega's schema
    (lambda r: r["fine_tune"]["dataset"]["common"].update(batch_size=0), "fine_tune.dataset.common.batch_size: must be an integer >= 1"),
    (lambda r: r["fine_tune"]["dataset"]["common"].update(data_root=5), "fine_tune.dataset.common.data_root: must be a path"),
    (lambda r: r["fine_tune"]["dataset"].update(type="VOC"), "fine_tune.dataset.type: 'VOC' is not supported"),
    (lambda r: r["fine_tune"]["model"]["model_desc"]["backbone"].update(code="1-2x"), "fine_tune.model.model_desc: serial code '1-2x'"),
    (lambda r: r["fine_tune"]["model"]["model_desc"]["backbone"].update(depth=50), "fine_tune.model.model_desc: .*unknown key\\(s\\) \\['depth'\\]"),
    (lambda r: r["fine_tune"]["model"]["model_desc"].update(convert_pretrained="yes"), "convert_pretrained: must be true or false"),
    (lambda r: r.update(extra_step=3), "config key extra_step: is neither"),
    (lambda r: r.update(pipeline=list(r["pipeline"]) + ["ghost"]), "config key ghost: is listed in pipeline but has no section"),
    (lambda r: r.update(pipeline=["fine_tune", "parallel", "serial", "reignition", "fully_train"]), "must run in the order"),
    (lambda r: r.update(pipeline="fine_tune"), "config key pipeline: must be a non-empty list"),
    (lambda r: r["general"].update(workers=0), "general.workers: must be an integer >= 1, got 0"),
    (lambda r: r["general"].update(colour="red"), "general.colour: unknown key"),
    (lambda r: r["serial"]["trainer"].update(ref="nowhere.trainer"), "serial.trainer.ref: 'nowhere.trainer' does not name"),
    (lambda r: r["serial"]["search_space"]["hyperparameters"][0].update(key="network.head.code"), "'network.head.code' is not searched"),
    (lambda r: r["parallel"].update(search_space=r["serial"]["search_space"]), "a parallel search searches network.neck.code"),
    (lambda r: r["reignition"].update(top_k=-1), "reignition.top_k: must be an integer >= 0"),
])
def test_bad_configs_name_the_key(tmp_path, mutate, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_bad(tmp_path, mutate), workdir=tmp_path)


def test_vega_only_keys_are_reported_once_as_ignored(tmp_path, caplog):
    import logging
    raw = yaml.safe_load(DEMO.read_text())
    raw["general"]["backend"] = "pytorch"
    raw["fine_tune"]["trainer"]["loss"] = {"type": "SumLoss"}
    raw["fine_tune"]["trainer"]["metric"] = {"type": "coco", "params": {"anno_path": "x"}}
    with caplog.at_level(logging.INFO, logger="spnas.config"):
        cfg = load_config(raw, workdir=tmp_path)
    assert "general.backend" in cfg.ignored and "fine_tune.trainer.loss" in cfg.ignored
    assert caplog.text.count("fine_tune.trainer.loss is not used by this project") == 1
    cfg = load_config({**raw, "pipeline": ["fine_tune", "serial"]}, workdir=tmp_path)
    assert "parallel (a section not in the pipeline)" in cfg.ignored


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file '.*missing.yml' does not exist"):
        load_config(tmp_path / "missing.yml")
    (tmp_path / "bad.yml").write_text("pipeline: [a\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(tmp_path / "bad.yml")
    with pytest.raises(ConfigError, match="--set 'novalue' must look like key.path=value"):
        load_config(DEMO, workdir=tmp_path, overrides=["novalue"])


def test_serial_search_space_keys(tmp_path):
    """``max_swap_shift`` and ``width_ratio`` reach the search settings; bad values name their key."""
    from spnas.search import SearchSettings
    cfg = load_config(DEMO, workdir=tmp_path, overrides=["serial.search_algorithm.max_swap_shift=3",
                                                         "serial.search_algorithm.width_ratio=0.4"])
    s = SearchSettings(**cfg.step("serial").search)
    assert (s.max_swap_shift, s.width_ratio) == (3, 0.4)
    for key, value, message in (("max_swap_shift", 9, "must be an integer in \\[1, 8\\], got 9"),
                                ("width_ratio", 2, "must be a probability in \\[0, 1\\], got 2")):
        with pytest.raises(ConfigError, match=f"serial.search_algorithm.*{key}: {message}"):
            load_config(DEMO, workdir=tmp_path, overrides=[f"serial.search_algorithm.{key}={value}"])


def test_trainer_norm_eval(tmp_path):
    cfg = load_config(DEMO, workdir=tmp_path, overrides=["fine_tune.trainer.norm_eval=false", "serial.trainer.norm_eval=AUTO"])
    assert cfg.step("fine_tune").trainer.norm_eval is False and not cfg.step("fine_tune").trainer.freeze_norm_stats
    assert cfg.step("serial").trainer.norm_eval == "auto" and cfg.step("serial").trainer.freeze_norm_stats  # batch 4
    assert load_config(DEMO, workdir=tmp_path).step("full_train").trainer.norm_eval == "auto"  # the default
    with pytest.raises(ConfigError, match="fine_tune.trainer.norm_eval: must be true, false or 'auto', got 'sometimes'"):
        load_config(DEMO, workdir=tmp_path, overrides=["fine_tune.trainer.norm_eval=sometimes"])


# A config written the Vega way, as Vega's own examples/nas/sp_nas/spnas.yml writes its trainers:
# by_epoch beside the scheduler and its after-scheduler, loss and metric sections, a fine_tune
# that only converts (with_train: False) and later steps that ref its trainer with other epochs.
VEGA_WAY = """
pipeline: [fine_tune, serial, reignition, fullytrain]
fine_tune:
    pipe_step: {type: TrainPipeStep}
    model:
        model_desc: {type: FasterRCNN, backbone: {type: SerialBackbone}}
    trainer:
        type: Trainer
        epochs: 1
        with_train: False
        optimizer: {type: SGD, params: {lr: 0.02, momentum: 0.9, weight_decay: !!float 1e-4}}
        lr_scheduler:
            type: WarmupScheduler
            by_epoch: False
            params:
                warmup_type: linear
                warmup_iters: 1000
                warmup_ratio: 0.001
                after_scheduler_config:
                    type: MultiStepLR
                    by_epoch: True
                    params: {milestones: [10, 20], gamma: 0.1}
        loss: {type: SumLoss}
        metric: {type: coco, params: {anno_path: /data/coco/annotations/instances_val2017.json}}
    dataset:
        type: CocoDataset
        common: {data_root: /data/coco, batch_size: 4, img_prefix: "2017", ann_prefix: instances}
serial:
    pipe_step: {type: SearchPipeStep}
    search_algorithm: {type: SpNasS, max_sample: 20}
    search_space:
        type: SearchSpace
        hyperparameters: [{key: network.backbone.code, type: CATEGORY, range: ['111-2111-211111-211']}]
    trainer: {ref: fine_tune.trainer, epochs: 3}
    dataset: {ref: fine_tune.dataset}
reignition:
    pipe_step: {type: TrainPipeStep, models_folder: "{local_base_path}/output/serial/"}
    dataset:
        type: Imagenet
        common: {data_path: /data/imagenet, batch_size: 128}
    trainer:
        type: Trainer
        epochs: 20
        callbacks: ReignitionCallback
        mixup: True
        optimizer: {type: SGD, params: {lr: 0.1, momentum: 0.9, weight_decay: !!float 1e-4}}
        lr_scheduler: {type: CosineAnnealingLR, by_epoch: True, params: {T_max: 20}}
        loss: {type: CrossEntropyLoss}
fullytrain:
    pipe_step: {type: TrainPipeStep, models_folder: "{local_base_path}/output/parallel/"}
    trainer: {ref: serial.trainer, epochs: 24}
    dataset: {ref: serial.dataset}
"""


def test_a_config_written_the_vega_way_loads_and_is_honoured(tmp_path, caplog):
    import logging
    with caplog.at_level(logging.INFO, logger="spnas.config"):
        cfg = load_config(yaml.safe_load(VEGA_WAY), workdir=tmp_path)
    ft, serial, re_, full = cfg.steps
    assert ft.trainer.epochs == 0  # with_train: False -> convert and evaluate only
    # by_epoch: False on the warm-up counts iterations, by_epoch: True on the after-scheduler epochs
    assert (ft.trainer.warmup_iters, ft.trainer.warmup_epochs, ft.trainer.warmup_factor) == (1000, None, 0.001)
    assert (ft.trainer.milestones, ft.trainer.decay_unit, ft.trainer.gamma) == ((10, 20), "epoch", 0.1)
    assert serial.trainer.epochs == 3  # a ref does not copy with_train (Vega's merge_reference)
    assert full.trainer.epochs == 24 and full.trainer.milestones == (10, 20)
    assert (re_.trainer.schedule, re_.trainer.cosine_t_max, re_.trainer.warmup_iters) == ("cosine", 20.0, 0)
    assert re_.dataset.kind == "imagenet" and re_.trainer.batch_size == 128
    # milestones past a step's end: a warning per step naming the key path, no error
    late = "trainer.lr_scheduler.params.after_scheduler_config.params.milestones: [10, 20] lie at or beyond the end"
    assert cfg.warnings == (f"serial.{late} of the 3 training epochs: never reached",)
    assert caplog.text.count(f"serial.{late}") == 1 and caplog.text.count("WARNING") == 1
    # Vega's loss/metric/mixup: reported once each, where the config writes them (not again per ref)
    unused = " (not used: a step after fine_tune takes the previous phase's models)"
    assert cfg.ignored == ("fine_tune.trainer.loss", "fine_tune.trainer.metric", "reignition.trainer.mixup",
                           "reignition.trainer.loss", "reignition.pipe_step.models_folder" + unused,
                           "fullytrain.pipe_step.models_folder" + unused)
    assert caplog.text.count("fine_tune.trainer.loss is not used by this project; ignored") == 1
    assert caplog.text.count("reignition.pipe_step.models_folder is not used: a step after fine_tune takes the "
                             "previous phase's models; ignored") == 1


def test_a_warm_up_without_after_scheduler_says_what_it_gets(tmp_path):
    raw = yaml.safe_load(VEGA_WAY)
    del raw["fine_tune"]["trainer"]["lr_scheduler"]["params"]["after_scheduler_config"]
    cfg = load_config(raw, workdir=tmp_path)
    t = cfg.step("serial").trainer
    assert (t.schedule, t.milestones, t.steps, t.gamma) == ("step", None, (0.667, 0.889), 0.1)
    msg = ("trainer.lr_scheduler: a WarmupScheduler without after_scheduler_config gets the default step decay after "
           "its warm-up: the lr is multiplied by 0.1 at 66.7 % and again at 88.9 % of the training iterations")
    assert cfg.warnings == tuple(f"{s}.{msg}" for s in ("fine_tune", "serial", "fullytrain"))


def test_warm_up_by_epoch_and_milestones_by_iteration(tmp_path):
    raw = yaml.safe_load(VEGA_WAY)
    sched = raw["fine_tune"]["trainer"]["lr_scheduler"]
    sched.update(by_epoch=True)
    sched["params"].update(warmup_iters=2, warmup_type="exp")
    sched["params"]["after_scheduler_config"].update(by_epoch=False)
    raw["fine_tune"]["trainer"]["iters"] = 15
    cfg = load_config(raw, workdir=tmp_path)
    t = cfg.step("serial").trainer
    assert (t.warmup_epochs, t.warmup_type, t.milestones, t.decay_unit, t.iters) == (2, "exp", (10, 20), "iter", 15)
    assert cfg.warnings == tuple(f"{s}.trainer.lr_scheduler.params.after_scheduler_config.params.milestones: [20] lie "
                                 "at or beyond the end of the 15 training iterations: never reached"
                                 for s in ("fine_tune", "serial", "fullytrain"))


def test_keys_a_step_has_no_use_for_are_reported(tmp_path):
    raw = yaml.safe_load(DEMO.read_text())
    raw["fine_tune"]["pipe_step"]["models_folder"] = "/somewhere"
    raw["fine_tune"]["top_k"] = 1
    raw["fully_train"]["model"] = {"pretrained_model_file": "/w.pth", "models_folder": "/m",
                                   "model_desc": {"convert_pretrained": True, "freeze_swap_keys": True}}
    raw["serial"]["trainer"]["image_size"] = 32
    cfg = load_config(raw, workdir=tmp_path)
    assert [i for i in cfg.ignored if not i.endswith(" (not used: a step after fine_tune takes the previous phase's models)")] \
        == ["fine_tune.pipe_step.models_folder (not used: fine_tune starts from model_desc and pretrained_model_file)",
            "fine_tune.top_k (not used: only a reignition or full train step chooses models)",
            "serial.trainer.image_size (not used: only a reignition step crops images)",
            "fully_train.model.model_desc.convert_pretrained (not used: only fine_tune converts a checkpoint)",
            "fully_train.model.model_desc.freeze_swap_keys (not used: only a search step trains its candidates)"]
    assert "fully_train.model.pretrained_model_file (not used: a step after fine_tune takes the previous phase's models)" \
        in cfg.ignored and "fully_train.model.models_folder (not used: a step after fine_tune takes the previous " \
        "phase's models)" in cfg.ignored


def test_dataset_split_batch_size_and_workers_are_used(tmp_path):
    raw = yaml.safe_load(DEMO.read_text())
    raw["fine_tune"]["dataset"]["common"]["num_workers"] = 2
    raw["fine_tune"]["dataset"]["train"] = {"batch_size": 8}
    cfg = load_config(raw, workdir=tmp_path)
    assert cfg.step("fine_tune").dataset.batch_size == 8
    assert (cfg.step("serial").trainer.batch_size, cfg.step("serial").trainer.workers) == (8, 2)
    assert cfg.step("serial").trainer.effective_lr == 0.04  # 0.08 per 16 images at batch 8


def test_general_task_local_base_path_is_the_workdir(tmp_path):
    raw = yaml.safe_load(DEMO.read_text())
    raw["general"]["task"] = {"local_base_path": str(tmp_path / "tasks"), "task_id": "x"}
    cfg = load_config(raw)
    assert cfg.workdir == str(tmp_path / "tasks") and cfg.ignored[0] == "general.task.task_id"
    assert cfg.step("serial").pretrained_model_file == str(tmp_path / "tasks") + "/output/fine_tune/model_0.pth"


# ----------------------------------------------------------------------------- every key

EVERY_KEY = Path(__file__).parent / "data" / "every_key.yml"


def test_every_accepted_key_loads_and_vega_ones_are_reported_once(caplog):
    """tests/data/every_key.yml carries every key of the schema: it loads, and the Vega keys this
    project does not use (and keys a step's role has no use for) are reported exactly once each,
    exactly those of every_key.ignored.txt."""
    import logging
    expected = (Path(__file__).parent / "data" / "every_key.ignored.txt").read_text().splitlines()
    with caplog.at_level(logging.INFO, logger="spnas.config"):
        cfg = load_config(EVERY_KEY)
    assert len(expected) == 253 == len(set(expected))
    assert sorted(cfg.ignored) == sorted(expected)
    reports = [r.getMessage() for r in caplog.records if r.levelname == "INFO" and "; ignored" in r.getMessage()]
    assert len(reports) == len(expected) and cfg.warnings == ()
    for item in expected:
        path = item.split(" (not used: ")[0]
        assert sum(f": {path} is not used" in m for m in reports) == 1, item


def test_every_accepted_key_of_ours_is_honoured():
    cfg = load_config(EVERY_KEY)
    assert (cfg.workdir, cfg.seed, cfg.workers, cfg.device, cfg.control) == ("/tmp/every-key", 7, 2, "cpu", False)
    ft, serial, re_, par, full = cfg.steps
    assert (ft.dataset.data_root, ft.dataset.batch_size, ft.dataset.img_prefix, ft.dataset.ann_prefix) == \
        ("/data/coco", 2, "2014", "person_keypoints")  # dataset.train.batch_size is the training batch
    t = ft.trainer
    assert (t.epochs, t.iters, t.batch_size, t.workers, t.seed) == (5, 40, 2, 3, 7)
    assert (t.lr, t.momentum, t.weight_decay, t.lr_scaling, t.lr_reference_batch, t.effective_lr) == \
        (0.01, 0.8, 0.0005, "none", 8, 0.01)
    assert (t.warmup_epochs, t.warmup_factor, t.warmup_type) == (1, 0.01, "exp")  # by_epoch: true
    assert (t.schedule, t.milestones, t.decay_unit, t.gamma) == ("step", (20, 30), "iter", 0.5)  # by_epoch: false
    assert (t.clip_grad_norm, t.amp, t.eval_every, t.checkpoint_every) == (10.0, False, 2, 7)  # and Vega's spellings
    assert (t.channels_last, t.cudnn_benchmark, t.pin_memory) == (False, False, False)
    assert ft.pretrained_model_file == "/cache/models/fasterrcnn_resnet50_fpn_coco.pth" and ft.convert_pretrained
    assert ft.codes == ("11-21-21-21",) and ft.model_desc["backbone"]["code"] == "11-21-21-21"
    assert serial.trainer.epochs == 2 and serial.freeze_swap_keys and serial.codes == ("11-21-21-21", "11-211-21-21")
    assert serial.search == {"algorithm": "SpNasS", "max_sample": 12, "objective_keys": ("mAP", "params"), "num_mutate": 2,
                             "add_stage_ratio": 0.1, "expand_ratio": 0.4, "max_stages": 5, "min_stages": 4,
                             "min_blocks": 4, "max_blocks": 20, "max_per_stage": 2, "max_params": 50000000,
                             "max_gflops": 300, "flops_size": 320, "max_redraws": 500, "candidates_per_round": 3,
                             "seed": 11, "max_memory_mb": 9000, "max_latency_ms": 250, "memory_batch": 8,
                             "reignition_patience": 2, "max_reignitions": 3, "max_swap_shift": 3, "width_ratio": 0.25,
                             "refresh_seeds": True}
    assert (serial.trainer.norm_eval, ft.trainer.norm_eval) == (False, "auto")
    assert (re_.recalibrate_images, re_.head_iters) == (32, 10)
    assert (re_.role, re_.top_k, re_.image_size, re_.dataset.kind, re_.dataset.data_root) == \
        ("reignition", 1, 96, "imagenet", "/data/imagenet")
    assert (re_.trainer.epochs, re_.trainer.lr, re_.trainer.batch_size) == (3, 0.1, 128)
    assert re_.models_folder == "/tmp/every-key/output/serial/"
    assert (par.trainer.schedule, par.trainer.cosine_t_max, par.trainer.eta_min, par.trainer.decay_unit) == \
        ("cosine", 4, 0.0001, "epoch")
    assert par.codes == ((0, 1, 0, 0),) and par.search == {"algorithm": "SpNasP", "max_sample": 6, "max_per_stage": 3,
                                                           "seed": 7, "memory_batch": 2}  # the step's batch
    assert (full.role, full.top_k, full.trainer.epochs, full.trainer.iters) == ("full_train", 2, 24, None)


def test_every_key_config_covers_the_whole_schema():
    """Each section of every_key.yml holds exactly the keys the schema accepts there: ours and
    Vega's. A key added to spnas/config/schema.py must be added to the file (and its report)."""
    from spnas.config import schema as sc
    raw = yaml.safe_load(EVERY_KEY.read_text())
    steps = raw["pipeline"]

    def keys(*paths: str) -> set:
        out: set = set()
        for path in paths:
            node = raw
            for part in path.split("."):
                node = node[int(part)] if part.isdigit() else node[part]
            out |= set(node) - {"ref"}
        return out

    after = "fine_tune.trainer.lr_scheduler.params.after_scheduler_config"
    sections = {  # schema kind -> (ours, the sections of every_key.yml that together must hold them all)
        "general": (sc._GENERAL_OURS, ["general"]),
        "general.task": (sc._GENERAL_TASK_OURS, ["general.task"]),
        "step": (sc._STEP_KEYS, steps),
        "pipe_step": (sc._PIPE_STEP_KEYS, [f"{s}.pipe_step" for s in steps]),
        "model": (sc._MODEL_KEYS, ["fine_tune.model", "serial.model"]),
        "trainer": (sc._TRAINER_KEYS, [f"{s}.trainer" for s in steps]),
        "trainer.metric": (set(), ["fine_tune.trainer.metric"]),
        "trainer.loss": (set(), ["fine_tune.trainer.loss"]),
        "optimizer": (sc._OPTIMIZER_KEYS, ["fine_tune.trainer.optimizer"]),
        "optimizer.params": (sc._SGD_KEYS, ["fine_tune.trainer.optimizer.params"]),
        "lr_scheduler": (sc._LR_SCHEDULER_KEYS, ["fine_tune.trainer.lr_scheduler", after]),
        "WarmupScheduler": (sc._SCHEDULER_PARAMS["WarmupScheduler"], ["fine_tune.trainer.lr_scheduler.params"]),
        "MultiStepLR": (sc._SCHEDULER_PARAMS["MultiStepLR"], [f"{after}.params"]),
        "CosineAnnealingLR": (sc._SCHEDULER_PARAMS["CosineAnnealingLR"], ["parallel.trainer.lr_scheduler.params"]),
        "dataset": (sc._DATASET_KEYS, ["fine_tune.dataset", "reignition.dataset"]),
        "search_algorithm": (sc._SEARCH_KEYS, ["serial.search_algorithm", "parallel.search_algorithm"]),
        "search_space": (sc._SEARCH_SPACE_KEYS, ["fine_tune.search_space"]),
        "hyperparameter": (sc._HYPERPARAMETER_KEYS, ["fine_tune.search_space.hyperparameters.0"]),
    }
    for split in ("common", "train", "val", "test"):  # each split of each data set type on its own
        sections[f"dataset.CocoDataset {split}"] = (sc._DATASET_COMMON, [f"fine_tune.dataset.{split}"])
        sections[f"dataset.Imagenet {split}"] = (sc._DATASET_IMAGENET, [f"reignition.dataset.{split}"])
    assert {k.split(" ")[0] for k in sections} >= set(sc._VEGA_IGNORED)  # every kind of the schema is checked
    for kind, (ours, paths) in sections.items():
        vega = sc._VEGA_IGNORED.get(kind.split(" ")[0], set())
        assert not ours & vega, kind
        assert keys(*paths) == ours | vega, (kind, sorted(keys(*paths) ^ (ours | vega)))
