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


def test_demo_config_loads_with_refs_and_overrides(tmp_path):
    cfg = load_config(DEMO, workdir=tmp_path, overrides=["serial.search_algorithm.max_sample=6", "general.seed=3"])
    serial = cfg.step("serial")
    assert serial.search["max_sample"] == 6 and serial.search["seed"] == 3 and cfg.seed == 3
    assert serial.trainer.epochs == 1 and serial.trainer.lr == 0.02 and serial.trainer.warmup_iters == 20
    assert cfg.step("fine_tune").trainer.steps == (1.0,) and cfg.step("fine_tune").trainer.weight_decay == 1e-4
    assert cfg.step("parallel").trainer.epochs == 1  # ref: serial.trainer, itself a ref
    assert cfg.step("full_train").trainer.epochs == 4 and cfg.step("full_train").trainer.steps == (0.75,)
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
    (lambda r: r["fine_tune"]["trainer"]["lr_scheduler"]["params"]["after_scheduler_config"]["params"].update(milestones=[5]),
     "milestones: \\[5\\] lie beyond the 2 training epochs"),
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
