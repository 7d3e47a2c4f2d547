"""`spnas serve` over real HTTP on 127.0.0.1 and the KServe InferenceService manifest.

The export folder is made here from a random-weight detector (score threshold 0, so it detects):
model.onnx as `spnas export` writes it, labels.json mapping labels 1..3 to category ids 3/7/12,
export.json and parity.json by hand. Each server is a child process on a free loopback port,
stopped by PID (SIGTERM, then SIGKILL) whatever the tests do.
"""
from __future__ import annotations

import argparse
import base64
import functools
import http.client
import io
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import kserve  # noqa: E402,F401  the serve extra (`make install` installs it): missing, these tests fail, not skip
import numpy as np
import onnx  # noqa: E402,F401  the export extra: the test model is exported here
import pytest
import yaml
from filelock import FileLock
from helpers import as_served
from PIL import Image

from spnas.serve.bundle import load_export
from spnas.utils.errors import ConfigError, ServeError

CATEGORIES = {1: 3, 2: 7, 3: 12}
NAMES = {1: "circle", 2: "square", 3: "triangle"}
MAX_IMAGE_BYTES = 100_000
MAX_PIXELS = 20_000

# the real command line: `python -m spnas` is `spnas`
CLI = ["-m", "spnas"]


# ---------------------------------------------------------------- the export folder

def _write_export(root: Path, passed: bool | None = True) -> Path:
    import torch

    from spnas.models.detector import build_detector
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = build_detector({"backbone": {"code": "1-1-1-1", "block": "basic", "base_channels": 8},
                            "min_size": 64, "max_size": 64, "num_classes": 4}).eval()
    model.roi_heads.score_thresh = 0.0
    with warnings.catch_warnings():  # the tracer's warnings about torchvision's detection code
        warnings.simplefilter("ignore")
        torch.onnx.export(model, ([torch.rand(3, 64, 64)],), str(root / "model.onnx"), opset_version=17, dynamo=False,
                          input_names=["images"], output_names=["boxes", "labels", "scores"],
                          dynamic_axes={"images": [1, 2]})
    _write_json(root / "labels.json", {"labels": [{"label": k, "category_id": CATEGORIES[k], "name": NAMES[k]}
                                                  for k in sorted(CATEGORIES)]})
    _write_json(root / "export.json", {"name": "spnas", "format_version": 1, "onnx": "model.onnx"})
    _write_json(root / "parity.json", {"passed": passed})
    return root


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj))


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    """The verified export folder, made once per test run (the pytest-xdist workers share it)."""
    shared = tmp_path_factory.getbasetemp().parent if os.environ.get("PYTEST_XDIST_WORKER") else \
        tmp_path_factory.getbasetemp()
    root = shared / "serve-export"
    with FileLock(str(shared / "serve-export.lock")):
        if not (root / "parity.json").is_file():
            tmp = shared / "serve-export.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            _write_export(tmp)
            tmp.rename(root)
    return root


def _copy(export_dir: Path, dest: Path, **changes) -> Path:
    """A copy of the export (model.onnx hard-linked) with files replaced or removed (None)."""
    dest.mkdir()
    for f in export_dir.iterdir():
        if f.name == "model.onnx":
            os.link(f, dest / f.name)
        else:
            shutil.copy(f, dest / f.name)
    for name, content in changes.items():
        path = dest / name.replace("_", ".", 1)
        path.unlink(missing_ok=True)  # never write through the hard link into the shared model.onnx
        if content is None:
            pass
        elif isinstance(content, (bytes, str)):
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
        else:
            _write_json(path, content)
    return dest


@pytest.fixture(scope="module")
def unverified_dir(export_dir, tmp_path_factory) -> Path:
    return _copy(export_dir, tmp_path_factory.mktemp("unverified") / "export", parity_json={"passed": False})


# ---------------------------------------------------------------- servers

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `spnas serve` child process on 127.0.0.1:port."""

    def __init__(self, folder: Path, log: Path, *extra: str) -> None:
        self.port = _free_port()
        self.log = log
        self._log = open(log, "wb")  # noqa: SIM115  closed in stop()
        self.proc = subprocess.Popen([sys.executable, *CLI, "serve", str(folder), "--port", str(self.port),
                                      *extra], stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 60.0) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited ({self.proc.returncode}):\n{self.log.read_text()}")
            try:
                if self.get("/v2/health/ready")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"the server was not ready in {timeout} s:\n{self.log.read_text()}")

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                chunked: bool = False) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, json.loads(data) if data else {}
        finally:
            conn.close()

    def get(self, path: str) -> tuple[int, dict]:
        return self.request("GET", path)

    def post(self, path: str, obj, headers: dict | None = None) -> tuple[int, dict]:
        body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        return self.request("POST", path, body, {"Content-Type": "application/json", **(headers or {})})

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self._log.close()


@pytest.fixture(scope="module")
def server(export_dir, tmp_path_factory):
    srv = Server(export_dir, tmp_path_factory.mktemp("server") / "serve.log",
                 "--max-image-bytes", str(MAX_IMAGE_BYTES), "--max-pixels", str(MAX_PIXELS), "--workers", "2")
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


# ---------------------------------------------------------------- requests and the reference

def _encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt)
    return buf.getvalue()


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _v2(image: bytes | str, **changes) -> dict:
    text = image if isinstance(image, str) else base64.b64encode(image).decode()
    inp = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [text], **changes}
    return {"inputs": [inp]}


@functools.lru_cache(maxsize=2)
def _session(path: str):
    import onnxruntime as ort
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def _reference(export_dir: Path, encoded: bytes) -> dict[str, np.ndarray]:
    """ONNX Runtime run directly on the decoded image, labels mapped through labels.json."""
    boxes, labels, scores = _session(str(export_dir / "model.onnx")).run(["boxes", "labels", "scores"],
                                                                         {"images": as_served(encoded)})
    return {"boxes": boxes, "scores": scores, "labels": np.array([CATEGORIES[int(v)] for v in labels], dtype=np.int64)}


def _check_v2(body: dict, ref: dict[str, np.ndarray], name: str = "spnas") -> None:
    assert body["model_name"] == name
    outs = {o["name"]: o for o in body["outputs"]}
    assert [o["name"] for o in body["outputs"]] == ["boxes", "scores", "labels"]
    n = len(ref["scores"])
    assert n > 0
    assert (outs["boxes"]["datatype"], outs["boxes"]["shape"]) == ("FP32", [n, 4])
    assert (outs["scores"]["datatype"], outs["scores"]["shape"]) == ("FP32", [n])
    assert (outs["labels"]["datatype"], outs["labels"]["shape"]) == ("INT64", [n])
    np.testing.assert_allclose(np.array(outs["boxes"]["data"]).reshape(n, 4), ref["boxes"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(outs["scores"]["data"], ref["scores"], atol=1e-4, rtol=0)
    assert outs["labels"]["data"] == ref["labels"].tolist()
    assert set(outs["labels"]["data"]) <= set(CATEGORIES.values())


# ---------------------------------------------------------------- the served protocol

def test_health_model_list_and_metadata(server):
    assert server.get("/v2/health/ready") == (200, {"ready": True})
    assert server.get("/v2/health/live") == (200, {"live": True})
    assert server.get("/v2/models") == (200, {"models": ["spnas"]})
    assert server.get("/v2/models/spnas/ready") == (200, {"name": "spnas", "ready": True})
    status, meta = server.get("/v2/models/spnas")
    assert status == 200
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [1]}]
    assert meta["outputs"] == [{"name": "boxes", "datatype": "FP32", "shape": [-1, 4]},
                               {"name": "scores", "datatype": "FP32", "shape": [-1]},
                               {"name": "labels", "datatype": "INT64", "shape": [-1]}]
    status, v1 = server.get("/v1/models")
    assert (status, v1["models"]) == (200, ["spnas"])
    assert f"Uvicorn running on http://127.0.0.1:{server.port}" in server.log.read_text()  # loopback only


def test_busy_port_refused_with_the_address(export_dir):
    from spnas.serve.server import serve
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ServeError, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
            serve(export_dir, port=port)


@pytest.mark.parametrize("fmt, h, w", [("PNG", 64, 64), ("JPEG", 48, 80)])
def test_v2_infer_equals_onnxruntime(server, export_dir, fmt, h, w):
    encoded = _encode(_noise(h, w), fmt)
    status, body = server.post("/v2/models/spnas/infer", {"id": "req-1", **_v2(encoded)})
    assert status == 200, body
    assert body["id"] == "req-1"
    ref = _reference(export_dir, encoded)
    _check_v2(body, ref)
    boxes = np.array([o for o in body["outputs"] if o["name"] == "boxes"][0]["data"]).reshape(-1, 4)
    assert boxes.min() >= 0 and boxes[:, 2].max() <= w and boxes[:, 3].max() <= h  # the input image's pixels


def test_v2_requested_outputs_and_v1_predict(server, export_dir):
    encoded = _encode(_noise(64, 64, seed=1))
    ref = _reference(export_dir, encoded)
    status, body = server.post("/v2/models/spnas/infer", {**_v2(encoded), "outputs": [{"name": "labels"}]})
    assert status == 200, body
    assert [o["name"] for o in body["outputs"]] == ["labels"]
    assert body["outputs"][0]["data"] == ref["labels"].tolist()
    status, body = server.post("/v1/models/spnas:predict",
                               {"instances": [{"image": {"b64": base64.b64encode(encoded).decode()}}]})
    assert status == 200, body
    assert len(body["predictions"]) == 1
    pred = body["predictions"][0]
    assert sorted(pred) == ["boxes", "labels", "scores"]
    np.testing.assert_allclose(pred["boxes"], ref["boxes"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(pred["scores"], ref["scores"], atol=1e-4, rtol=0)
    assert pred["labels"] == ref["labels"].tolist()


def test_base64_with_line_breaks_is_accepted(server, export_dir):
    encoded = _encode(_noise(64, 64, seed=2))
    wrapped = "\n".join(base64.encodebytes(encoded).decode().split())  # as `base64` (76 columns) writes it
    status, body = server.post("/v2/models/spnas/infer", _v2(wrapped))
    assert status == 200, body
    _check_v2(body, _reference(export_dir, encoded))


def test_concurrent_requests_all_answered(server, export_dir):
    images = [_encode(_noise(64, 64, seed=10 + i)) for i in range(8)]
    refs = [_reference(export_dir, im) for im in images]
    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(lambda im: server.post("/v2/models/spnas/infer", _v2(im)), images))
    for (status, body), ref in zip(answers, refs, strict=True):
        assert status == 200, body
        _check_v2(body, ref)


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, "GIF")
    return buf.getvalue()


def _bytes_of_size(n: int) -> bytes:
    png = _encode(np.zeros((8, 8, 3), dtype=np.uint8))
    return png + b"\0" * (n - len(png))


B64 = base64.b64encode(_encode(_noise(64, 64))).decode()
BAD = [  # (id, path, body, status, part of the message)
    ("not-an-image", "/v2/models/spnas/infer", _v2(b"hello, not an image"), 400, "input 'image' is not a PNG or JPEG image"),
    ("gif", "/v2/models/spnas/infer", _v2(_gif()), 400, "input 'image' is not a PNG or JPEG image"),
    ("truncated-png", "/v2/models/spnas/infer", _v2(_encode(_noise(64, 64))[:200]), 400, "input 'image' cannot be decoded as an image"),
    ("not-base64", "/v2/models/spnas/infer", _v2("@@@ not base64 @@@"), 400, "input 'image' is not valid base64"),
    ("datatype-fp32", "/v2/models/spnas/infer", _v2(B64, datatype="FP32"), 400, "input 'image' has datatype FP32; expected BYTES"),
    ("element-not-string", "/v2/models/spnas/infer", _v2(B64, data=[7]), 400, "input 'image' must hold a base64 string"),
    ("missing-input", "/v2/models/spnas/infer", {"inputs": [{**_v2(B64)["inputs"][0], "name": "img"}]}, 400, "no input named 'image' (got ['img'])"),
    ("no-inputs", "/v2/models/spnas/infer", {"inputs": []}, 400, "no input named 'image' (got [])"),
    ("two-inputs", "/v2/models/spnas/infer", {"inputs": _v2(B64)["inputs"] * 2}, 400, "2 inputs ['image', 'image']: one image per request"),
    ("two-images", "/v2/models/spnas/infer", _v2(B64, shape=[2], data=[B64, B64]), 400, "input 'image' holds more than one image"),
    ("empty-data", "/v2/models/spnas/infer", _v2(B64, data=[]), 400, "input 'image' holds no data"),
    ("bad-shape", "/v2/models/spnas/infer", _v2(B64, shape=[3]), 400, "input 'image' has shape [3]; expected [1]"),
    ("over-max-image-bytes", "/v2/models/spnas/infer", _v2(_bytes_of_size(MAX_IMAGE_BYTES + 1)), 400,
     f"over the limit of {MAX_IMAGE_BYTES} bytes (--max-image-bytes)"),
    ("over-max-pixels", "/v2/models/spnas/infer", _v2(_encode(np.zeros((150, 150, 3), dtype=np.uint8))), 400,
     f"input 'image' is 150x150 = 22500 pixels, over the limit of {MAX_PIXELS} (--max-pixels)"),
    ("body-over-limit", "/v2/models/spnas/infer", _v2(_bytes_of_size(3 * MAX_IMAGE_BYTES)), 413, "over the limit of"),
    ("image-the-model-cannot-take", "/v2/models/spnas/infer", _v2(_encode(np.zeros((200, 1, 3), dtype=np.uint8))), 400,
     "the model cannot process this 1x200 image"),
    ("unknown-output", "/v2/models/spnas/infer", {**_v2(B64), "outputs": [{"name": "masks"}]}, 400, "unknown output(s) ['masks'] requested"),
    ("unknown-model", "/v2/models/nope/infer", _v2(B64), 404, "Model with name nope does not exist"),
    ("malformed-json", "/v2/models/spnas/infer", b'{"inputs": [', 422, "JSON decode error"),
    ("no-inputs-field", "/v2/models/spnas/infer", {"id": "x"}, 422, "Field required"),
    ("v1-two-instances", "/v1/models/spnas:predict", {"instances": [{"image": {"b64": B64}}] * 2}, 400, "2 instances: one image per request"),
    ("v1-no-image", "/v1/models/spnas:predict", {"instances": [{"picture": B64}]}, 400, "instance 0 has no 'image'"),
    ("v1-not-an-image", "/v1/models/spnas:predict", {"instances": [{"image": {"b64": "aGVsbG8="}}]}, 400, "is not a PNG or JPEG image"),
]


@pytest.mark.parametrize("path, body, status, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_gets_4xx_with_a_message(server, path, body, status, message):
    got, answer = server.post(path, body)
    assert got == status, answer
    text = answer.get("error") or json.dumps(answer.get("detail"))
    assert message in text, answer
    assert server.get("/v2/health/ready") == (200, {"ready": True})  # and the server is still up


def test_chunked_body_over_limit_and_binary_extension_refused(server):
    def chunks():
        yield b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["'
        for _ in range(20):
            yield b"A" * 10_000
        yield b'"]}]}'

    status, answer = server.request("POST", "/v2/models/spnas/infer", chunks(), {"Content-Type": "application/json"},
                                    chunked=True)
    assert status == 413 and "over the limit of" in answer["detail"], answer
    png = _encode(_noise(8, 8))
    head = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                   "parameters": {"binary_data_size": len(png) + 4}}]}).encode()
    status, answer = server.post("/v2/models/spnas/infer", head + len(png).to_bytes(4, "little") + png,
                                 {"Inference-Header-Content-Length": str(len(head))})
    assert status == 400 and "binary tensor data extension" in answer["error"], answer


def test_repository_unload_is_disabled(server):
    status, answer = server.post("/v2/repository/models/spnas/unload", {})
    assert status == 501 and "repository unload is disabled" in answer["error"], answer
    assert server.get("/v2/models/spnas/ready") == (200, {"name": "spnas", "ready": True})


# ---------------------------------------------------------------- the parity gate

def test_unverified_export_refused_then_served_with_allow_unverified(unverified_dir, tmp_path, export_dir):
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, *CLI, "serve", str(unverified_dir), "--port", str(_free_port())],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert f"spnas serve: error: parity.json '{unverified_dir / 'parity.json'}' says the export failed the parity " \
           "gate (passed: false); serve it anyway with --allow-unverified" in res.stderr
    assert time.monotonic() - t0 < 20
    srv = Server(unverified_dir, tmp_path / "serve.log", "--allow-unverified", "--name", "shapes")
    try:
        srv.wait_ready()
        assert srv.get("/v2/models") == (200, {"models": ["shapes"]})
        encoded = _encode(_noise(64, 64, seed=3))
        status, body = srv.post("/v2/models/shapes/infer", _v2(encoded))
        assert status == 200, body
        _check_v2(body, _reference(export_dir, encoded), name="shapes")
        assert srv.post("/v2/models/spnas/infer", _v2(encoded))[0] == 404
    finally:
        srv.stop()
    assert "UNVERIFIED" in srv.log.read_text()


def test_missing_parity_refused(export_dir, tmp_path):
    folder = _copy(export_dir, tmp_path / "export", parity_json=None)
    with pytest.raises(ServeError, match=r"parity\.json is missing in .*: the export never passed the parity gate; "
                                         r"serve it anyway with --allow-unverified"):
        load_export(folder)
    bundle = load_export(folder, allow_unverified=True)
    assert (bundle.verified, bundle.name, bundle.categories, bundle.names) == (False, "spnas", CATEGORIES, NAMES)


def test_load_export_reads_the_folder(export_dir):
    bundle = load_export(export_dir)
    assert bundle.verified is True
    assert bundle.onnx_path == export_dir / "model.onnx"
    assert (bundle.name, bundle.categories, bundle.names, bundle.parity) == ("spnas", CATEGORIES, NAMES, {"passed": True})


LABELS = [{"label": 1, "category_id": 3, "name": "circle"}, {"label": 2, "category_id": 7, "name": "square"}]
BAD_FOLDERS = [  # (id, changes, message)
    ("no-export-json", {"export_json": None}, "export.json '{d}/export.json' does not exist"),
    ("export-json-not-json", {"export_json": "{nope"}, "export.json '{d}/export.json' is not valid JSON"),
    ("export-json-a-list", {"export_json": [1]}, "export.json '{d}/export.json': must be a JSON object"),
    ("format-version-2", {"export_json": {"format_version": 2}}, "format_version 2 is not supported"),
    ("name-not-a-string", {"export_json": {"name": 5}}, "export.json '{d}/export.json': name must be a string, got 5"),
    ("onnx-outside", {"export_json": {"onnx": "../model.onnx"}}, "'onnx' must be a file name in the export folder"),
    ("no-model-onnx", {"model_onnx": None}, "the ONNX model '{d}/model.onnx' (named by export.json) does not exist"),
    ("no-labels-json", {"labels_json": None}, "labels.json '{d}/labels.json' does not exist"),
    ("labels-empty", {"labels_json": {"labels": []}}, "labels.json '{d}/labels.json': must be an object with a non-empty list 'labels'"),
    ("label-zero", {"labels_json": {"labels": [{**LABELS[0], "label": 0}]}}, "labels[0].label: must be an integer >= 1, got 0"),
    ("category-id-string", {"labels_json": {"labels": [{**LABELS[0], "category_id": "3"}]}}, "labels[0].category_id: must be an integer, got '3'"),
    ("name-missing", {"labels_json": {"labels": [{"label": 1, "category_id": 3}]}}, "labels[0].name: must be a string, got None"),
    ("label-twice", {"labels_json": {"labels": [LABELS[0], LABELS[0]]}}, "labels[1].label: label 1 is listed twice"),
    ("category-twice", {"labels_json": {"labels": [LABELS[0], {**LABELS[1], "category_id": 3}]}}, "labels[1].category_id: category id 3 is listed twice"),
    ("labels-not-contiguous", {"labels_json": {"labels": [LABELS[0], {**LABELS[1], "label": 3}]}}, "the labels must be 1..2 (the model's contiguous labels), missing [2]"),
    ("parity-malformed", {"parity_json": {"passed": "yes"}}, "parity.json '{d}/parity.json': 'passed' must be true or false, got 'yes'"),
]


@pytest.mark.parametrize("changes, message", [b[1:] for b in BAD_FOLDERS], ids=[b[0] for b in BAD_FOLDERS])
def test_bad_export_folder_names_the_file(export_dir, tmp_path, changes, message):
    folder = _copy(export_dir, tmp_path / "export", **changes)
    with pytest.raises(ServeError) as err:
        load_export(folder)
    assert message.format(d=folder) in str(err.value)


def test_missing_folder_and_bad_onnx_refused(export_dir, tmp_path):
    with pytest.raises(ServeError, match="export folder '.*nowhere' does not exist or is not a folder"):
        load_export(tmp_path / "nowhere")
    from spnas.serve.server import DetectorModel
    folder = _copy(export_dir, tmp_path / "export", model_onnx=b"not an onnx file")
    with pytest.raises(ServeError, match=r"the ONNX model '.*model\.onnx' cannot be loaded by ONNX Runtime"):
        DetectorModel(load_export(folder)).load()


def test_missing_extra_gives_a_one_line_hint(monkeypatch):
    from spnas.serve import deps
    monkeypatch.setitem(sys.modules, "kserve", None)
    with pytest.raises(ServeError, match=r"serving needs the 'serve' extra \(.*\): pip install 'spnas\[serve\]'"):
        deps.import_kserve()


# ---------------------------------------------------------------- the InferenceService manifest

def test_manifest_fields(export_dir):
    from spnas.serve.manifest import check_manifest, inference_service
    doc = inference_service("spnas-shapes", "minio://spnas/runs/demo/export", "registry.example.com/ml/spnas:0.1.0",
                            namespace="ml", resources={"cpu": "2", "memory": "4Gi", "gpus": 1},
                            service_account="spnas-s3")
    assert doc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert doc["kind"] == "InferenceService"
    assert doc["metadata"] == {"name": "spnas-shapes", "namespace": "ml"}
    predictor = doc["spec"]["predictor"]
    assert sorted(doc["spec"]) == ["predictor"]
    assert sorted(predictor) == ["containers", "serviceAccountName"]
    assert predictor["serviceAccountName"] == "spnas-s3"
    assert len(predictor["containers"]) == 1
    c = predictor["containers"][0]
    assert c["name"] == "kserve-container"
    assert c["image"] == "registry.example.com/ml/spnas:0.1.0"
    assert c["command"] == ["spnas"]
    assert c["args"] == ["serve", "/mnt/models", "--port", "8080", "--host", "0.0.0.0", "--name", "spnas-shapes"]
    assert c["ports"] == [{"containerPort": 8080, "name": "http1", "protocol": "TCP"}]
    # the storage URI of a custom predictor: STORAGE_URI on kserve-container, minio:// as s3://, a folder prefix
    assert c["env"] == [{"name": "STORAGE_URI", "value": "s3://spnas/runs/demo/export/"}]
    assert c["resources"] == {"requests": {"cpu": "2", "memory": "4Gi"},
                              "limits": {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": "1"}}
    check_manifest(doc)  # every key a field of the kserve / kubernetes typed models


def test_manifest_defaults_and_checks():
    from spnas.serve.manifest import check_manifest, inference_service
    doc = inference_service("spnas", "s3://models/spnas/v3/", "img:1")
    assert doc["metadata"] == {"name": "spnas"}
    assert sorted(doc["spec"]["predictor"]) == ["containers"]
    c = doc["spec"]["predictor"]["containers"][0]
    assert c["env"] == [{"name": "STORAGE_URI", "value": "s3://models/spnas/v3/"}]
    assert c["resources"] == {}
    bad = json.loads(json.dumps(doc))
    bad["spec"]["predictor"]["storageUri"] = "s3://models/spnas/v3/"  # a framework spec's field, not PredictorSpec's
    with pytest.raises(ServeError, match=r"spec\.predictor\.storageUri: not a field of V1beta1PredictorSpec"):
        check_manifest(bad)
    bad = json.loads(json.dumps(doc))
    bad["spec"]["predictor"]["containers"][0]["ports"][0]["containerPort"] = "8080"
    with pytest.raises(ServeError, match=r"spec\.predictor\.containers\[0\]\.ports\[0\]\.containerPort: must be int"):
        check_manifest(bad)


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "Spnas_1"}, "--name: must be a lower-case DNS label of at most 47 characters"),
    ({"name": "a" * 48}, "--name: must be a lower-case DNS label"),
    ({"namespace": "ML"}, "--namespace: must be a lower-case DNS label"),
    ({"storage_uri": "file:///tmp/export"}, "--storage-uri: must be an s3://, minio:// or gs://"),
    ({"storage_uri": "s3://B/x"}, "--storage-uri: object URI 's3://B/x': 'B' is not a valid bucket name"),
    ({"image": "two words"}, "--image: must be a container image reference"),
    ({"resources": {"cpu": "lots"}}, "--cpu: must be a positive Kubernetes quantity (e.g. 2, 500m, 4Gi), got 'lots'"),
    ({"resources": {"memory": "-1Gi"}}, "--memory: must be a positive Kubernetes quantity"),
    ({"resources": {"gpus": -1}}, "--gpus: must be an integer in [0, 64], got -1"),
    ({"resources": {"disk": "1Gi"}}, "resources: unknown key(s) ['disk']"),
])
def test_manifest_bad_settings(kwargs, message):
    from spnas.serve.manifest import inference_service
    args = {"name": "spnas", "storage_uri": "s3://models/x/", "image": "img:1", **kwargs}
    with pytest.raises(ConfigError) as err:
        inference_service(args.pop("name"), args.pop("storage_uri"), args.pop("image"), **args)
    assert message in str(err.value)


def test_manifest_command_writes_the_yaml_next_to_the_export(export_dir, unverified_dir, tmp_path):
    from spnas.serve.cli import register
    from spnas.serve.manifest import check_manifest, inference_service
    folder = _copy(export_dir, tmp_path / "export")
    parser = argparse.ArgumentParser(prog="spnas")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["manifest", str(folder), "--storage-uri", "s3://models/spnas/v1", "--image", "img:1",
                              "--namespace", "ml", "--cpu", "1", "--memory", "2Gi", "--service-account", "s3-reader"])
    assert args.func(args) == 0
    path = folder / "inferenceservice.yaml"
    doc = yaml.safe_load(path.read_text())
    assert doc == inference_service("spnas", "s3://models/spnas/v1", "img:1", namespace="ml",
                                    resources={"cpu": "1", "memory": "2Gi"}, service_account="s3-reader")
    check_manifest(doc)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    args = parser.parse_args(["manifest", str(unverified_dir), "--storage-uri", "s3://models/x", "--image", "img:1"])
    with pytest.raises(ServeError, match="says the export failed the parity gate"):
        args.func(args)
    assert not (unverified_dir / "inferenceservice.yaml").exists()
