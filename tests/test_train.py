"""`spnas train`, `evaluate` and `reignite` end to end on the demo data (CPU)."""
import json
from pathlib import Path

import pytest
import torch
from helpers import demo, remap_categories

from spnas.cli.main import main
from spnas.models.checkpoint import load_checkpoint

DEMO_MODEL = "configs/demo-model.json"
# one demo epoch at the demo's rate (0.08 per 16 images: SGD at 0.02 at batch 4) reaches AP50 60.5 on
# this machine (19.96 at the CLI's default 0.02 per 16 images); chance is about 0
AP50_THRESHOLD = 50.0


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    assert main(["demo-data", str(root)]) == 0
    return root


def _perf(out, arch_id="0"):
    return json.loads((out / f"performance_{arch_id}.json").read_text())


@pytest.mark.slow
def test_demo_schedule_learns_and_is_reproducible(demo_root, tmp_path):
    """One epoch of the demo schedule learns (AP50 72.2 measured with the 512-wide box head; chance is about 0); the same
    short training twice gives identical weights and metrics. The metrics are the final model's
    (its weights are model_0.pth) and the effective lr is recorded."""
    def train(name, *schedule):
        out = tmp_path / name
        assert main(["train", "--data", str(demo_root), "--desc", DEMO_MODEL, *schedule, "--warmup-iters", "50", "--lr", "0.08",
                     "--out", str(out)]) == 0
        return out
    runs = [train("a", "--epochs", "1")]
    a = _perf(runs[0])
    assert a["AP50"] >= AP50_THRESHOLD, a
    assert a["params"] == 2_389_747 and a["iters"] == 60 and a["effective_lr"] == 0.02
    assert {k: a[k] for k in ("mAP", "AP50")} == {k: a["history"][-1][k] for k in ("mAP", "AP50")}
    assert a["history"][-1]["iteration"] == 60 and "best_iteration" not in a
    desc = json.loads((runs[0] / "desc_0.json").read_text())
    assert desc["num_classes"] == 4 and desc["backbone"]["code"] == "1-2-2-2"
    # reproducible: two runs of the same (short) schedule, bit for bit
    short = [train(name, "--iters", "8") for name in ("b", "c")]
    b, c = _perf(short[0]), _perf(short[1])
    for key in ("mAP", "AP50", "AP75", "AP_small", "AP_medium", "history", "params", "gflops", "iters"):
        assert b[key] == c[key], key
    wb, wc = load_checkpoint(short[0] / "model_0.pth"), load_checkpoint(short[1] / "model_0.pth")
    assert all(torch.equal(wb[k], wc[k]) for k in wb)
    wa = load_checkpoint(runs[0] / "model_0.pth")

    # evaluating the saved weights gives the recorded metrics
    assert main(["evaluate", "--data", str(demo_root), "--desc", str(runs[0] / "desc_0.json"),
                 "--weights", str(runs[0] / "model_0.pth"), "--out", str(tmp_path / "eval.json")]) == 0
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["mAP"] == a["mAP"] and ev["AP50"] == a["AP50"]

    # reignition from object crops: the backbone changes, the FPN and heads do not
    out = tmp_path / "re"
    assert main(["reignite", "--desc", str(runs[0] / "desc_0.json"), "--weights", str(runs[0] / "model_0.pth"),
                 "--from-detection", str(demo_root), "--epochs", "1", "--out", str(out)]) == 0
    perf = _perf(out)
    assert perf["classes"] == 3 and perf["top1_train"] > 60 and perf["source"].startswith("object crops")
    wr = load_checkpoint(out / "model_0.pth")
    assert set(wr) == set(wa)
    assert not torch.equal(wr["backbone.body.layer1.0.conv1.weight"], wa["backbone.body.layer1.0.conv1.weight"])
    for k in wa:
        if not k.startswith("backbone.body."):
            assert torch.equal(wr[k], wa[k]), k


@pytest.mark.slow
def test_three_class_custom_dataset_with_non_contiguous_ids(tmp_path):
    src = demo(tmp_path / "d", train=120, val=30)
    root = remap_categories(src, tmp_path / "custom", {1: 3, 2: 7, 3: 12})
    out = tmp_path / "out"
    assert main(["train", "--data", str(root), "--desc", DEMO_MODEL, "--epochs", "1", "--lr-scaling", "none",
                 "--warmup-iters", "20", "--out", str(out)]) == 0  # SGD at 0.02: learns enough in one epoch
    assert json.loads((out / "desc_0.json").read_text())["num_classes"] == 4
    assert _perf(out)["effective_lr"] == 0.02
    assert _perf(out)["AP50"] > 10  # labels map back to 3/7/12 (a wrong mapping scores 0)

    from spnas import build_detector
    from spnas.data.coco import load_split
    from spnas.training.evaluation import predict
    model = build_detector(json.loads((out / "desc_0.json").read_text()))
    model.load_state_dict(load_checkpoint(out / "model_0.pth"))
    dets = predict(model, load_split(root, "val", train=False))
    assert dets and {d["category_id"] for d in dets} <= {3, 7, 12}


def test_reignite_from_a_class_folder(demo_root, tmp_path):
    from PIL import Image

    from spnas import build_detector
    folder = tmp_path / "cls"
    for c, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        (folder / f"class{c}").mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (40, 30), tuple(max(0, v - 20 * i) for v in colour)).save(folder / f"class{c}" / f"{i}.png")
    desc = json.loads(Path(DEMO_MODEL).read_text()) | {"num_classes": 4}
    torch.manual_seed(0)
    torch.save(build_detector(desc).state_dict(), tmp_path / "w.pth")
    (tmp_path / "desc.json").write_text(json.dumps(desc))
    out = tmp_path / "out"
    assert main(["reignite", "--desc", str(tmp_path / "desc.json"), "--weights", str(tmp_path / "w.pth"),
                 "--data", str(folder), "--epochs", "1", "--batch-size", "4", "--out", str(out)]) == 0
    perf = _perf(out)
    assert perf["classes"] == 2 and perf["images"] == 12 and perf["source"] == f"folder {folder}"


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "{root}/nowhere", "--code", "1-2-2-2", "--out", "{root}/o"], "dataset folder '.*nowhere' does not exist"),
    (["train", "--data", "{demo}", "--desc", "{root}/missing.json", "--out", "{root}/o"], "model description '.*missing.json' does not exist"),
    (["train", "--data", "{demo}", "--code", "1-2-2-2", "--batch-size", "0", "--out", "{root}/o"], "training setting batch_size: must be an integer >= 1, got 0"),
    (["evaluate", "--data", "{demo}", "--desc", DEMO_MODEL, "--weights", "{root}/none.pth"], "num_classes 91 but .* has 3 categories"),
    (["reignite", "--desc", DEMO_MODEL, "--weights", "{root}/none.pth", "--data", "{root}", "--out", "{root}/o"], "none.pth' does not exist"),
])
def test_cli_errors_are_one_line(argv, message, demo_root, tmp_path, capsys):
    import re
    argv = [a.format(root=tmp_path, demo=demo_root) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(message, err), err
