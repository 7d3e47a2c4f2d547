"""A Mask R-CNN shipped end to end (#16): exported behind the mask parity gate, then served by
`spnas serve` with one COCO RLE per detection.

The model is a random-weight Mask R-CNN (class scores and mask logits spread, BN statistics
randomised) whose score threshold lets it detect on the tiny data set's val scenes. The server is
a child process on a loopback port (tests/test_serve.py's `Server`); what it answers is compared
with ONNX Runtime run directly on the same decoded image: boxes and scores within 1e-4, labels
exactly, every mask decoded by pycocotools equal pixel for pixel to the ONNX masks above 0.5.
"""
from __future__ import annotations

import asyncio
import base64
import json
import shutil

import numpy as np
import pytest
import torch
from helpers import MASK_RCNN, export_categories, onnx_outputs, png_bytes, val_scene_png
from pycocotools import mask as mask_utils
from test_serve import Server, _write_export

from spnas.data.source import CocoSource
from spnas.export import parity
from spnas.export.bundle import ExportRefused, check_publishable, export_model
from spnas.export.programs import eager_runner, onnx_runner
from spnas.serve.bundle import load_export
from spnas.utils.errors import ServeError

VAL_IMAGES = 6  # the tiny data set's val split
# pycocotools 2.0.11's decode under numpy 2 warns on every call; nothing of ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


# ---------------------------------------------------------------- the gate

def test_both_programs_pass_the_mask_gate(mask_export):
    out, info, _ = mask_export
    report = json.loads((out / "parity.json").read_text())
    assert info["task"] == "instance_segmentation"
    assert [o["name"] for o in info["outputs"]] == ["boxes", "labels", "scores", "masks"]
    assert info["outputs"][3]["shape"] == ["N", 1, "H", "W"] and info["parity"]["passed"] is True
    assert report["passed"] is True and report["images"] == VAL_IMAGES
    assert report["gate"]["mask_iou"] == 0.99
    for name in ("onnx", "torchscript"):
        p = report["programs"][name]
        for where in (p["val"], p["probes"]):
            assert where["detections"] > 0 and where["matched"] == where["detections"]
            assert where["unmatched"] == 0 and where["score_mismatch"] == 0 and where["mask_mismatch"] == 0
            assert where["min_mask_iou"] >= 0.99 and where["max_box_diff"] < 1e-3
        assert p["probes"]["images"] == 2 * VAL_IMAGES
        assert p["metrics"]["segm_mAP"] is not None and p["segm_mAP_diff"] <= 0.1 and p["mAP_diff"] <= 0.1
    card = (out / "MODEL_CARD.md").read_text()
    assert "min mask IoU" in card and "segm_mAP" in card and "**passed**" in card
    check_publishable(out)  # does not raise


@pytest.mark.slow
def test_a_trained_mask_rcnn_exports_with_equal_segm_map(tiny_data, tmp_path):
    """A Mask R-CNN trained a little (`spnas train --task instance_segmentation`, 24 iterations:
    segm_mAP above 0, so the mask AP comparison is not 0 against 0) passes the gate, both programs
    scoring the reference's segm_mAP."""
    from spnas.cli.main import main as cli
    desc = tmp_path / "desc.json"
    desc.write_text(json.dumps({**MASK_RCNN, "box_score_thresh": 0.05}))
    assert cli(["train", "--data", str(tiny_data), "--desc", str(desc), "--task", "instance_segmentation",
                "--iters", "24", "--batch-size", "4", "--lr", "0.16", "--schedule", "cosine", "--warmup-iters", "2",
                "--seed", "1", "--workers", "0", "--out", str(tmp_path / "train")]) == 0
    trained = json.loads((tmp_path / "train" / "desc_0.json").read_text())
    export_model(trained, tmp_path / "train" / "model_0.pth", CocoSource(str(tiny_data)), tmp_path / "out")
    report = json.loads((tmp_path / "out" / "parity.json").read_text())
    ref = report["reference"]
    assert report["passed"] is True and ref["segm_mAP"] > 0 and ref["mAP"] > 0
    for name in ("onnx", "torchscript"):
        p = report["programs"][name]
        assert p["val"]["matched"] == p["val"]["detections"] > 0 and p["val"]["mask_mismatch"] == 0
        assert p["val"]["min_mask_iou"] >= 0.99 and p["probes"]["mask_mismatch"] == 0
        assert p["metrics"]["segm_mAP"] > 0 and p["segm_mAP_diff"] <= 0.1 and p["mAP_diff"] <= 0.1
    check_publishable(tmp_path / "out")


def _shifted(run):
    """``run`` whose masks are moved one pixel to the right (boxes, labels and scores untouched)."""
    def shifted(image: torch.Tensor) -> dict[str, torch.Tensor]:
        out = dict(run(image))
        masks = torch.zeros_like(out["masks"])
        masks[..., 1:] = out["masks"][..., :-1]
        out["masks"] = masks
        return out
    return shifted


def test_a_program_with_shifted_masks_fails_the_gate_and_is_refused(mask_export, tiny_data, tmp_path):
    out, _, model = mask_export
    ds = CocoSource(str(tiny_data)).load("val", train=False)
    reference = eager_runner(model)
    report = parity.check(reference, {"onnx": _shifted(onnx_runner(out / "model.onnx"))}, ds, max_images=2)
    p = report["programs"]["onnx"]
    # what the shift does to PyTorch's own masks, counted independently: masks whose IoU with
    # themselves moved by a pixel falls under 0.99 (empty masks stay IoU 1)
    expected = 0
    for i in range(2):
        ds.set_epoch(0)
        m = reference(ds[i][0])["masks"][:, 0] > 0.5
        moved = torch.zeros_like(m)
        moved[..., 1:] = m[..., :-1]
        inter, union = (m & moved).flatten(1).sum(1), (m | moved).flatten(1).sum(1)
        expected += int(((union > 0) & (inter < 0.99 * union)).sum())
    assert report["passed"] is False and p["passed"] is False
    assert p["val"]["matched"] == p["val"]["detections"] > 0
    assert p["val"]["unmatched"] == 0 and p["val"]["score_mismatch"] == 0  # the boxes are right
    assert p["val"]["mask_mismatch"] == expected > 0 and p["val"]["min_mask_iou"] < 0.99
    assert p["probes"]["mask_mismatch"] > 0
    bad = shutil.copytree(out, tmp_path / "bad")
    (bad / "parity.json").write_text(json.dumps(report))
    with pytest.raises(ExportRefused, match=rf"onnx: 0 unmatched detection\(s\), 0 score mismatch\(es\), {expected} "
                                            r"mask mismatch\(es\)"):
        check_publishable(bad)
    with pytest.raises(ServeError, match="failed the parity gate"):
        load_export(bad)


# ---------------------------------------------------------------- serving

def _direct(folder, encoded: bytes) -> dict[str, np.ndarray]:
    """ONNX Runtime on the decoded image (as the server decodes it), labels mapped to category ids."""
    boxes, labels, scores, masks = onnx_outputs(folder, encoded, ["boxes", "labels", "scores", "masks"])
    cats = export_categories(folder)
    return {"boxes": boxes, "scores": scores, "labels": np.array([cats[int(v)] for v in labels]),
            "masks": masks[:, 0] > 0.5}


def _decoded(rles: list[dict], h: int, w: int) -> np.ndarray:
    for r in rles:
        assert set(r) == {"size", "counts"} and r["size"] == [h, w] and isinstance(r["counts"], str)
    return np.stack([mask_utils.decode({"size": r["size"], "counts": r["counts"].encode("ascii")}) for r in rles]) \
        .astype(bool) if rles else np.zeros((0, h, w), dtype=bool)


def _same(got: dict, want: dict[str, np.ndarray], h: int, w: int) -> None:
    n = len(want["scores"])
    assert n > 0 and len(got["masks"]) == n
    np.testing.assert_allclose(np.asarray(got["boxes"], dtype=np.float32).reshape(n, 4), want["boxes"], atol=1e-4,
                               rtol=0)
    np.testing.assert_allclose(got["scores"], want["scores"], atol=1e-4, rtol=0)
    assert list(got["labels"]) == want["labels"].tolist()
    masks = _decoded(got["masks"], h, w)
    assert masks.shape == want["masks"].shape == (n, h, w)
    assert np.array_equal(masks, want["masks"])  # pixel for pixel
    # the masks have shapes of their own: most cover well under their box (not box-shaped, not empty)
    area = (want["boxes"][:, 2] - want["boxes"][:, 0]) * (want["boxes"][:, 3] - want["boxes"][:, 1])
    cover = want["masks"].sum(axis=(1, 2)) / area
    assert (cover > 0).all() and (cover < 0.8).sum() >= n // 2


@pytest.fixture(scope="module")
def mask_server(mask_export, tmp_path_factory):
    srv = Server(mask_export[0], tmp_path_factory.mktemp("mask-server") / "serve.log")
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


def test_served_masks_are_rles_of_what_onnxruntime_gives(mask_server, mask_export, tiny_data):
    out = mask_export[0]
    status, meta = mask_server.get("/v2/models/masks")
    assert status == 200 and meta["outputs"][-1] == {"name": "masks", "datatype": "BYTES", "shape": [-1]}
    h, w = 72, 120  # another size and aspect ratio than the 96x96 the programs were traced on
    encoded = val_scene_png(tiny_data, 1, (h, w))
    want = _direct(out, encoded)
    n = len(want["scores"])

    status, body = mask_server.post("/v2/models/masks/infer", {"id": "m1", "inputs": [
        {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(encoded).decode()]}]})
    assert status == 200, body
    outs = {o["name"]: o for o in body["outputs"]}
    assert [o["name"] for o in body["outputs"]] == ["boxes", "scores", "labels", "masks"]
    assert (outs["masks"]["datatype"], outs["masks"]["shape"]) == ("BYTES", [n])
    assert all(isinstance(t, str) for t in outs["masks"]["data"])  # one JSON text per detection
    _same({"boxes": outs["boxes"]["data"], "scores": outs["scores"]["data"], "labels": outs["labels"]["data"],
           "masks": [json.loads(t) for t in outs["masks"]["data"]]}, want, h, w)

    status, body = mask_server.post("/v1/models/masks:predict",
                                    {"instances": [{"image": {"b64": base64.b64encode(encoded).decode()}}]})
    assert status == 200, body
    [pred] = body["predictions"]
    assert sorted(pred) == ["boxes", "labels", "masks", "scores"]
    _same(pred, want, h, w)

    status, body = mask_server.post("/v2/models/masks/infer", {"inputs": [
        {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(encoded).decode()]}],
        "outputs": [{"name": "masks"}]})
    assert status == 200 and [o["name"] for o in body["outputs"]] == ["masks"], body
    assert np.array_equal(_decoded([json.loads(t) for t in body["outputs"][0]["data"]], h, w), want["masks"])


def test_a_detection_export_answers_without_masks(tmp_path):
    """In process (no HTTP): a Faster R-CNN export's v2 and v1 answers and metadata have no masks
    and asking for them is refused; an export.json claiming masks its model.onnx lacks, a semantic
    export whose labels.json has no background label, and an unknown task are refused by name."""
    from kserve.errors import InvalidInput
    from kserve.protocol.infer_type import InferInput, InferRequest, RequestedOutput

    from spnas.serve.server import DetectorModel
    folder = _write_export(tmp_path / "det")
    model = DetectorModel(load_export(folder))
    assert model.load() and model.masks is False
    assert [o["name"] for o in model.get_output_types()] == ["boxes", "scores", "labels"]
    b64 = base64.b64encode(png_bytes(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))).decode()

    def v2(outputs=()):
        return asyncio.run(model.predict(InferRequest(
            model_name="spnas", infer_inputs=[InferInput("image", [1], "BYTES", [b64])],
            request_outputs=[RequestedOutput(n) for n in outputs] or None)))

    rest, _ = v2().to_rest()
    assert [o["name"] for o in rest["outputs"]] == ["boxes", "scores", "labels"] and rest["outputs"][1]["shape"][0] > 0
    [pred] = asyncio.run(model.predict({"instances": [{"image": {"b64": b64}}]}))["predictions"]
    assert sorted(pred) == ["boxes", "labels", "scores"]
    with pytest.raises(InvalidInput, match=r"unknown output\(s\) \['masks'\] requested"):
        v2(["masks"])
    model.stop()

    doc = json.loads((folder / "export.json").read_text())
    (folder / "export.json").write_text(json.dumps({**doc, "task": "instance_segmentation"}))
    claimed = DetectorModel(load_export(folder))
    assert claimed.masks is True
    with pytest.raises(ServeError, match=r"must have the outputs \['boxes', 'labels', 'scores', 'masks'\] \(the "
                                         r"export's task is 'instance_segmentation'"):
        claimed.load()
    (folder / "export.json").write_text(json.dumps({**doc, "task": "semantic_segmentation"}))
    with pytest.raises(ServeError, match=r"labels.json .*: a semantic export's labels must include label 0 "
                                         r"\(background, category id 0\), has labels \[1, 2, 3\]"):
        load_export(folder)
    (folder / "export.json").write_text(json.dumps({**doc, "task": "panoptic"}))
    with pytest.raises(ServeError, match=r"task 'panoptic' is not one spnas serve answers \(tasks \['detection', "
                                         r"'instance_segmentation', 'semantic_segmentation'\]\)"):
        load_export(folder)
