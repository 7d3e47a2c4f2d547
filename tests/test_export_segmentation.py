"""Exporting segmentation models (#16): a Mask R-CNN's programs output masks, a SemanticFPN's a
label map; the parity gate checks matched masks (IoU >= 0.99) and label maps (>= 99.9 % of the
pixels) on the validation images and on resized probes, and refuses a corrupted program. A
semantic export is served (`spnas serve`) as category-id label maps, checked over loopback HTTP
against ONNX Runtime run directly."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil

import numpy as np
import onnxruntime  # noqa: F401  the export extra: missing, these tests fail, not skip
import pytest
import torch
from helpers import export_categories, onnx_outputs, randomize_norms, val_scene_png

from spnas.data.source import CocoSource
from spnas.export import parity
from spnas.export.bundle import ExportRefused, check_publishable, export_model
from spnas.export.programs import eager_runner, onnx_runner, torchscript_runner
from spnas.models.detector import build_detector
from spnas.serve.bundle import load_export
from spnas.utils.errors import ServeError

BACKBONE = {"code": "1-1-2-1", "block": "basic", "base_channels": 8}
SEMANTIC = {"type": "SemanticFPN", "backbone": BACKBONE, "neck": {"code": [0, 1, 0, 0], "out_channels": 32},
            "min_size": 96, "max_size": 96, "num_classes": 4, "head_channels": 16}


def _corrupt(folder, tensor: str, dest):
    """A copy of the export ``folder`` whose model.onnx has ``tensor`` negated."""
    import onnx
    from onnx import numpy_helper
    shutil.copytree(folder, dest)
    proto = onnx.load(str(dest / "model.onnx"))
    [init] = [i for i in proto.graph.initializer if i.name == tensor]
    init.CopyFrom(numpy_helper.from_array((-numpy_helper.to_array(init)).astype(np.float32), init.name))
    onnx.save(proto, str(dest / "model.onnx"))
    return dest


def test_mask_rcnn_programs_output_masks_and_pass_the_gate(mask_export, tiny_data):
    out, info, model = mask_export
    report = json.loads((out / "parity.json").read_text())
    assert info["task"] == "instance_segmentation" and [o["name"] for o in info["outputs"]] == \
        ["boxes", "labels", "scores", "masks"]
    assert report["passed"] is True and "segm_mAP" in report["reference"]
    for name in ("onnx", "torchscript"):
        p = report["programs"][name]
        v, pr = p["val"], p["probes"]
        assert p["passed"] and v["matched"] == v["detections"] > 0 and v["unmatched"] == 0
        assert v["mask_mismatch"] == 0 and v["min_mask_iou"] >= 0.99
        assert pr["matched"] == pr["detections"] > 0 and pr["mask_mismatch"] == 0 and pr["min_mask_iou"] >= 0.99
        assert p["segm_mAP_diff"] <= 0.1
    ds = CocoSource(str(tiny_data)).load("val", train=False)
    image = ds[0][0][:, :80, :]  # a size the programs were not traced on
    want = eager_runner(model)(image)
    for run in (onnx_runner(out / "model.onnx"), torchscript_runner(out / "model.torchscript.pt")):
        got = run(image)
        n = want["boxes"].shape[0]
        assert got["masks"].shape == want["masks"].shape == (n, 1, 80, 96) and n > 0
        assert torch.equal(got["labels"], want["labels"])
        assert ((got["masks"] > 0.5) != (want["masks"] > 0.5)).sum() <= 0.001 * got["masks"].numel()
    card = (out / "MODEL_CARD.md").read_text()
    assert "A Mask R-CNN (instance segmentation)" in card and "min mask IoU" in card and "segm_mAP" in card


def test_a_mask_rcnn_program_with_wrong_masks_is_refused(mask_export, tiny_data, tmp_path):
    """model.onnx with the mask predictor's weights negated: boxes and scores are PyTorch's, the
    masks are not: the gate fails on the masks alone and the folder is refused."""
    out, _, model = mask_export
    bad = _corrupt(out, "roi_heads.mask_predictor.mask_fcn_logits.weight", tmp_path / "bad")
    ds = CocoSource(str(tiny_data)).load("val", train=False)
    report = parity.check(eager_runner(model), {"onnx": onnx_runner(bad / "model.onnx")}, ds)
    p = report["programs"]["onnx"]
    assert report["passed"] is False and p["val"]["unmatched"] == 0 and p["val"]["score_mismatch"] == 0
    assert p["val"]["mask_mismatch"] > 0 and p["val"]["min_mask_iou"] < 0.99
    (bad / "parity.json").write_text(json.dumps(report))
    with pytest.raises(ExportRefused, match=r"onnx: 0 unmatched detection\(s\), 0 score mismatch\(es\), \d+ mask "
                                            r"mismatch\(es\)"):
        check_publishable(bad)


@pytest.fixture(scope="module")
def semantic_export(tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("semantic-export")
    torch.manual_seed(0)
    model = randomize_norms(build_detector(SEMANTIC), 2).eval()
    with torch.no_grad():
        model.sem_head.predictor.weight.normal_(0, 0.5)  # every class somewhere
    torch.save(model.state_dict(), tmp / "w.pth")
    info = export_model(SEMANTIC, tmp / "w.pth", CocoSource(str(tiny_data)), tmp / "out", name="tiny-semantic")
    return tmp / "out", info, model


def test_semantic_programs_output_label_maps_and_pass_the_gate(semantic_export, tiny_data):
    out, info, model = semantic_export
    report = json.loads((out / "parity.json").read_text())
    assert info["task"] == "semantic_segmentation" and [o["name"] for o in info["outputs"]] == ["sem_seg"]
    labels = json.loads((out / "labels.json").read_text())["labels"]
    assert [(e["label"], e["category_id"]) for e in labels] == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert report["passed"] is True and set(report["reference"]) == {"mIoU", "pixel_acc", "mAcc"}
    for name in ("onnx", "torchscript"):
        p = report["programs"][name]
        assert p["passed"] and p["val"]["pixels"] == 6 * 96 * 96 and p["val"]["images_with_mismatch"] == 0
        assert p["val"]["min_agreement"] >= 0.999 and p["probes"]["images_with_mismatch"] == 0
        assert p["probes"]["pixels"] > 0 and p["mIoU_diff"] <= 0.1
    ds = CocoSource(str(tiny_data)).load("val", train=False)
    image = ds[1][0][:, 10:, :70]  # another size and aspect ratio
    want = eager_runner(model)(image)["sem_seg"]
    assert want.shape == (86, 70) and len(want.unique()) >= 2
    for run in (onnx_runner(out / "model.onnx"), torchscript_runner(out / "model.torchscript.pt")):
        got = run(image)["sem_seg"]
        assert got.shape == want.shape and (got != want).sum() <= 0.001 * want.numel()
    card = (out / "MODEL_CARD.md").read_text()
    assert "A SemanticFPN (semantic segmentation)" in card and "pixels labelled otherwise" in card


def test_a_semantic_program_with_wrong_scores_is_refused(semantic_export, tiny_data, tmp_path):
    out, _, model = semantic_export
    bad = _corrupt(out, "sem_head.predictor.weight", tmp_path / "bad")
    ds = CocoSource(str(tiny_data)).load("val", train=False, semantic=True)
    report = parity.check(eager_runner(model), {"onnx": onnx_runner(bad / "model.onnx")}, ds)
    p = report["programs"]["onnx"]
    assert report["passed"] is False and p["val"]["images_with_mismatch"] == 6 and p["val"]["disagree"] > 0
    (bad / "parity.json").write_text(json.dumps(report))
    with pytest.raises(ExportRefused, match=r"onnx: \d+ of 55296 pixels labelled otherwise, 6 image\(s\) under the "
                                            r"pixel agreement"):
        check_publishable(bad)
    with pytest.raises(ServeError, match="failed the parity gate"):
        load_export(bad)


def test_the_pipelines_export_figures_follow_the_task(mask_export, semantic_export):
    """What the pipeline's export task reports of each program's gate: mask figures for a Mask
    R-CNN, label-map figures for a semantic model (not box figures it has none of)."""
    from spnas.orchestration.ship import _parity_figures
    mask = json.loads((mask_export[0] / "parity.json").read_text())["programs"]["onnx"]
    got = _parity_figures(mask)
    assert set(got) == {"max_box_diff", "max_score_diff", "unmatched", "mAP_diff", "mask_mismatch", "min_mask_iou",
                        "segm_mAP_diff"}
    assert got["mask_mismatch"] == 0 and got["min_mask_iou"] >= 0.99 and got["unmatched"] == 0
    sem = json.loads((semantic_export[0] / "parity.json").read_text())["programs"]["torchscript"]
    assert _parity_figures(sem) == {"disagree": 0, "min_agreement": 1.0, "mIoU_diff": 0.0}


# ---------------------------------------------------------------- serving label maps

def _direct_map(folder, encoded: bytes) -> np.ndarray:
    """ONNX Runtime's label map on the image as the server decodes it, mapped to category ids."""
    [labels] = onnx_outputs(folder, encoded, ["sem_seg"])
    return np.vectorize(export_categories(folder).__getitem__)(labels).astype(np.int64)


def _remapped(folder, dest, offset: int):
    """A copy of the export ``folder`` whose labels.json maps label k >= 1 to category k + offset."""
    shutil.copytree(folder, dest)
    doc = json.loads((dest / "labels.json").read_text())
    for e in doc["labels"]:
        e["category_id"] += offset if e["label"] else 0
    (dest / "labels.json").write_text(json.dumps(doc))
    return dest


@pytest.fixture(scope="module")
def semantic_server(semantic_export, tmp_path_factory):
    from test_serve import Server
    tmp = tmp_path_factory.mktemp("semantic-server")
    folder = _remapped(semantic_export[0], tmp / "export", 10)  # categories 11..13: a label is not its id
    srv = Server(folder, tmp / "serve.log")
    try:
        yield folder, srv.wait_ready()
    finally:
        srv.stop()


def test_served_label_maps_are_what_onnxruntime_gives(semantic_server, tiny_data):
    """Over loopback HTTP, on an image of another size than the traced 96x96: v2 answers
    ``sem_seg`` (INT64 [H, W] category ids) and ``sem_seg_png`` (one base64 PNG of the same map),
    both equal pixel for pixel to ONNX Runtime's labels mapped through labels.json; v1 the same;
    a request naming one output gets that one; an unknown output is a 400 naming the outputs."""
    folder, srv = semantic_server
    from spnas.serve import labelmap
    status, meta = srv.get("/v2/models/tiny-semantic")
    assert status == 200 and meta["outputs"] == [{"name": "sem_seg", "datatype": "INT64", "shape": [-1, -1]},
                                                 {"name": "sem_seg_png", "datatype": "BYTES", "shape": [1]}]
    h, w = 86, 70
    encoded = val_scene_png(tiny_data, 1, (h, w))
    want = _direct_map(folder, encoded)
    assert want.shape == (h, w) and set(np.unique(want)) <= {0, 11, 12, 13} and len(np.unique(want)) >= 2
    b64 = base64.b64encode(encoded).decode()
    image = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}

    status, body = srv.post("/v2/models/tiny-semantic/infer", {"id": "s1", "inputs": [image]})
    assert status == 200, body
    assert [(o["name"], o["datatype"], o["shape"]) for o in body["outputs"]] == [
        ("sem_seg", "INT64", [h, w]), ("sem_seg_png", "BYTES", [1])]
    assert np.array_equal(np.asarray(body["outputs"][0]["data"]).reshape(h, w), want)
    png = base64.b64decode(body["outputs"][1]["data"][0])
    assert np.array_equal(labelmap.decode(png), want) and len(png) < 2000

    status, body = srv.post("/v1/models/tiny-semantic:predict", {"instances": [{"image": {"b64": b64}}]})
    assert status == 200, body
    [pred] = body["predictions"]
    assert sorted(pred) == ["sem_seg", "sem_seg_png"]
    assert np.array_equal(np.asarray(pred["sem_seg"]), want)
    assert np.array_equal(labelmap.decode(base64.b64decode(pred["sem_seg_png"])), want)

    status, body = srv.post("/v2/models/tiny-semantic/infer", {"inputs": [image], "outputs": [{"name": "sem_seg_png"}]})
    assert status == 200 and [o["name"] for o in body["outputs"]] == ["sem_seg_png"], body
    assert np.array_equal(labelmap.decode(base64.b64decode(body["outputs"][0]["data"][0])), want)
    status, body = srv.post("/v2/models/tiny-semantic/infer", {"inputs": [image], "outputs": [{"name": "masks"}]})
    assert status == 400 and "unknown output(s) ['masks'] requested; this model has ['sem_seg', 'sem_seg_png']" \
        in body["error"], body


def test_a_semantic_export_with_category_ids_over_255_answers_16_bit_pngs(semantic_export, tiny_data, tmp_path):
    """In process: categories 301..303 come back as they are in ``sem_seg`` and in a 16-bit PNG."""
    from kserve.protocol.infer_type import InferInput, InferRequest
    from PIL import Image

    from spnas.serve import labelmap
    from spnas.serve.server import DetectorModel
    folder = _remapped(semantic_export[0], tmp_path / "wide", 300)
    model = DetectorModel(load_export(folder))
    assert model.load() and model.semantic and not model.masks
    encoded = val_scene_png(tiny_data, 2, (64, 80))
    want = _direct_map(folder, encoded)
    assert set(np.unique(want)) <= {0, 301, 302, 303} and want.max() > 255
    b64 = base64.b64encode(encoded).decode()
    rest, _ = asyncio.run(model.predict(InferRequest(
        model_name="tiny-semantic", infer_inputs=[InferInput("image", [1], "BYTES", [b64])]))).to_rest()
    assert np.array_equal(np.asarray(rest["outputs"][0]["data"]).reshape(64, 80), want)
    png = base64.b64decode(rest["outputs"][1]["data"][0])
    with Image.open(io.BytesIO(png)) as im:
        assert im.mode == "I;16"
    assert np.array_equal(labelmap.decode(png), want)
    model.stop()


def test_a_semantic_labels_json_must_map_background_to_0(semantic_export, tmp_path):
    folder = shutil.copytree(semantic_export[0], tmp_path / "bad")
    doc = json.loads((folder / "labels.json").read_text())
    doc["labels"][0]["category_id"] = 7
    (folder / "labels.json").write_text(json.dumps(doc))
    with pytest.raises(ServeError, match=r"labels\[0\]: label 0 \(background\) and category id 0 go together in a "
                                         r"semantic export's labels, got label 0 -> category id 7"):
        load_export(folder)


def test_label_map_pngs_round_trip_and_refuse_values_out_of_range():
    from spnas.serve import labelmap
    rng = np.random.default_rng(0)
    for bits, top in ((8, 255), (16, 65535)):
        m = rng.integers(0, top + 1, (13, 7))
        assert np.array_equal(labelmap.decode(labelmap.encode(m, bits)), m)
    assert labelmap.png_bits(255) == 8 and labelmap.png_bits(256) == 16 and labelmap.png_bits(65535) == 16
    with pytest.raises(ServeError, match="category id 65536 does not fit a 16-bit PNG label map"):
        labelmap.png_bits(65536)
    with pytest.raises(ServeError, match=r"label map values 0..256 do not fit 8 bits"):
        labelmap.encode(np.array([[0, 256]]), 8)
    with pytest.raises(ServeError, match=r"a label map must be \[H, W\], got shape \[1, 2, 2\]"):
        labelmap.encode(np.zeros((1, 2, 2), dtype=np.int64))


def test_mask_match_counts_masks_of_another_size_as_mismatches():
    """Matched detections whose masks lie over another image size (a program that pasted them
    wrongly) fail the mask gate instead of stopping it with a shape error."""
    gate = parity.Gate()
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    masks = torch.zeros(2, 1, 32, 32)
    masks[0, 0, :10, :10], masks[1, 0, 20:30, 20:30] = 0.9, 0.8
    ref = {"boxes": boxes, "labels": torch.tensor([1, 2]), "scores": torch.tensor([0.9, 0.8]), "masks": masks}
    same = parity.match(ref, ref, gate)
    assert (same["matched"], same["mask_mismatch"], same["min_mask_iou"], same["max_mask_diff"]) == (2, 0, 1.0, 0.0)
    other = parity.match(ref, {**ref, "masks": torch.zeros(2, 1, 32, 31)}, gate)
    assert (other["matched"], other["mask_mismatch"], other["min_mask_iou"], other["max_mask_diff"]) == (2, 2, 0.0, 1.0)
