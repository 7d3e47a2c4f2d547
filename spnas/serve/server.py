"""``spnas serve``: a KServe model server for an export folder, running ONNX Runtime.

The server is KServe's own REST server (kserve 0.21.0: FastAPI + uvicorn, gRPC off) with one
model, :class:`DetectorModel`. It speaks:

* the Open Inference Protocol v2: ``POST /v2/models/{name}/infer`` with exactly one input
  ``{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["<base64 PNG or JPEG>"]}``;
  the outputs are ``boxes`` (FP32 ``[N, 4]``, x1 y1 x2 y2 in the input image's pixels),
  ``scores`` (FP32 ``[N]``, descending) and ``labels`` (INT64 ``[N]``, the data set's category
  ids from ``labels.json``); a Mask R-CNN export (``"task": "instance_segmentation"``) adds
  ``masks`` (BYTES ``[N]``: per detection, the JSON text of its COCO compressed RLE
  ``{"size": [h, w], "counts": "..."}``, the pixels of probability above 0.5; :mod:`.rle`); a
  SemanticFPN export (``"task": "semantic_segmentation"``) answers instead ``sem_seg`` (INT64
  ``[H, W]``: the category id of every input pixel, 0 background) and ``sem_seg_png`` (BYTES
  ``[1]``: the same label map as a base64 PNG, 8-bit or 16-bit grey; :mod:`.labelmap`), both
  unless the request names the outputs it wants;
  ``GET /v2/health/ready``, ``GET /v2/models``, ``GET /v2/models/{name}`` (metadata) and
  ``/v2/models/{name}/ready``;
* v1 (free with KServe): ``POST /v1/models/{name}:predict`` with
  ``{"instances": [{"image": {"b64": "<base64>"}}]}``, answered with
  ``{"predictions": [{"boxes": [...], "scores": [...], "labels": [...]}]}`` (and ``"masks": [RLE
  object, ...]`` for a Mask R-CNN export; ``{"sem_seg": [[...], ...], "sem_seg_png": "<base64>"}``
  for a semantic export).

Bad input never reaches ONNX Runtime: a request that is not one decodable PNG/JPEG within the
limits gets 400 (KServe's ``InvalidInput``) with a message naming what is wrong; a body larger
than the image limit allows gets 413 before it is read; an unknown model 404 (KServe's
``ModelNotFound``); a body that is not a v2 request (malformed JSON, a missing field) 422
(FastAPI's request validation). Images are decoded as in training: Pillow, ``convert("RGB")``
(no EXIF rotation), float32 in [0, 1], ``[3, H, W]``.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import math
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..utils import checks
from ..utils.errors import ServeError
from . import labelmap, rle
from .bundle import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_PIXELS, EXPORT_JSON, ExportBundle, check_model_name, load_export
from .deps import import_kserve, import_onnxruntime

kserve = import_kserve()
ort = import_onnxruntime()

from kserve.errors import InferenceError, InvalidInput  # noqa: E402  (after the guarded import above)
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse  # noqa: E402

__all__ = ["DEFAULT_MAX_IMAGE_BYTES", "DEFAULT_MAX_PIXELS", "DetectorModel", "ExportBundle", "Limits", "decode_image",
           "load_export", "serve"]

log = logging.getLogger(__name__)

IMAGE_INPUT = "image"
IMAGE_FORMATS = ("PNG", "JPEG")
#: the ONNX graph's tensors (spnas export's contract) and the served outputs, in their order
ONNX_INPUT = "images"
ONNX_OUTPUTS = ("boxes", "labels", "scores")
ONNX_MASK_OUTPUTS = (*ONNX_OUTPUTS, "masks")
OUTPUTS = (("boxes", "FP32", [-1, 4]), ("scores", "FP32", [-1]), ("labels", "INT64", [-1]))
#: a Mask R-CNN export's outputs: one RLE (its JSON text) per detection
MASK_OUTPUTS = (*OUTPUTS, ("masks", "BYTES", [-1]))
#: a semantic export's: the ONNX label map, served as category ids and as one base64 PNG
SEMANTIC_ONNX_OUTPUTS = ("sem_seg",)
SEMANTIC_OUTPUTS = (("sem_seg", "INT64", [-1, -1]), ("sem_seg_png", "BYTES", [1]))
#: what a request body may carry beyond the base64 image (JSON framing, id, parameters)
BODY_SLACK = 64 * 1024
#: the side of the grey test image the model runs on at load
WARMUP_SIDE = 64

_served = False


@dataclass(frozen=True)
class Limits:
    """Per-request limits: encoded image bytes and decoded pixels (width x height)."""

    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        checks.integer(self.max_image_bytes, "--max-image-bytes", 1, error=ServeError)
        checks.integer(self.max_pixels, "--max-pixels", 1, error=ServeError)

    @property
    def max_base64_chars(self) -> int:
        """The base64 length of an image of ``max_image_bytes``."""
        return 4 * -(-self.max_image_bytes // 3)

    @property
    def max_body_bytes(self) -> int:
        """The largest request body read: the base64 image plus :data:`BODY_SLACK`."""
        return self.max_base64_chars + BODY_SLACK


def decode_base64(text: Any, limits: Limits) -> bytes:
    """The image bytes of one base64 element (ASCII whitespace ignored); :class:`InvalidInput`
    when it is not a string, not base64 or over ``limits.max_image_bytes``."""
    if isinstance(text, bytes):  # a raw BYTES element (gRPC-style): the encoded image itself
        data = text
    elif isinstance(text, str):
        compact = "".join(text.split())
        if len(compact) > limits.max_base64_chars:
            raise InvalidInput(f"input '{IMAGE_INPUT}' is over the limit of {limits.max_image_bytes} bytes "
                               f"(--max-image-bytes): {len(compact)} base64 characters")
        try:
            data = base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidInput(f"input '{IMAGE_INPUT}' is not valid base64 ({exc})") from None
    else:
        raise InvalidInput(f"input '{IMAGE_INPUT}' must hold a base64 string (an encoded PNG or JPEG), "
                           f"got {type(text).__name__}")
    if len(data) > limits.max_image_bytes:
        raise InvalidInput(f"input '{IMAGE_INPUT}' is {len(data)} bytes, over the limit of "
                           f"{limits.max_image_bytes} bytes (--max-image-bytes)")
    if not data:
        raise InvalidInput(f"input '{IMAGE_INPUT}' is empty")
    return data


def decode_image(data: bytes, limits: Limits) -> np.ndarray:
    """An encoded PNG or JPEG as float32 ``[3, H, W]`` RGB in [0, 1] (as the training data is read);
    :class:`InvalidInput` when it is not a PNG/JPEG, over ``limits.max_pixels`` or undecodable."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
            width, height = im.size
            if width * height > limits.max_pixels:
                raise InvalidInput(f"input '{IMAGE_INPUT}' is {width}x{height} = {width * height} pixels, over the "
                                   f"limit of {limits.max_pixels} (--max-pixels)")
            fmt = im.format
            rgb = im.convert("RGB")
    except InvalidInput:
        raise
    except UnidentifiedImageError:
        raise InvalidInput(f"input '{IMAGE_INPUT}' is not a PNG or JPEG image") from None
    except Exception as exc:  # noqa: BLE001  any decoder failure on untrusted bytes is the request's fault
        raise InvalidInput(f"input '{IMAGE_INPUT}' cannot be decoded as an image: {type(exc).__name__}: {exc}") from None
    if rgb.width == 0 or rgb.height == 0:
        raise InvalidInput(f"input '{IMAGE_INPUT}' ({fmt}) has no pixels")
    x = np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32)
    x /= 255.0
    return x


def _elements(data: Any) -> list[Any]:
    """The leaves of a (possibly nested) JSON tensor, collecting at most two."""
    out: list[Any] = []

    def walk(x: Any, depth: int) -> None:
        if isinstance(x, (list, tuple)):
            if depth >= 8:
                raise InvalidInput(f"input '{IMAGE_INPUT}': its data is nested too deeply")
            for y in x:
                if len(out) > 1:
                    return
                walk(y, depth + 1)
        else:
            out.append(x)

    walk(data, 0)
    return out


def image_of_v2(request: InferRequest) -> Any:
    """The one base64 element of a v2 request's ``image`` input; :class:`InvalidInput` naming the
    problem (no inputs, no ``image``, other inputs, a datatype other than BYTES, not one element)."""
    names = [i.name for i in request.inputs]
    expected = (f"expected one input: {{\"name\": \"{IMAGE_INPUT}\", \"datatype\": \"BYTES\", \"shape\": [1], "
                f"\"data\": [\"<base64 PNG or JPEG>\"]}}")
    if IMAGE_INPUT not in names:
        raise InvalidInput(f"no input named '{IMAGE_INPUT}' (got {names}); {expected}")
    if len(names) != 1:
        raise InvalidInput(f"{len(names)} inputs {names}: one image per request; {expected}")
    inp = request.inputs[0]
    if inp.datatype != "BYTES":
        raise InvalidInput(f"input '{IMAGE_INPUT}' has datatype {inp.datatype}; expected BYTES (a base64-encoded "
                           "PNG or JPEG)")
    elements = _elements(inp.data)
    if not elements:
        raise InvalidInput(f"input '{IMAGE_INPUT}' holds no data; {expected}")
    if len(elements) > 1:
        raise InvalidInput(f"input '{IMAGE_INPUT}' holds more than one image: one image per request, shape [1]")
    shape = inp.shape
    if (not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
            or math.prod(shape) != 1):
        raise InvalidInput(f"input '{IMAGE_INPUT}' has shape {shape}; expected [1] (one image per request)")
    return elements[0]


def image_of_v1(payload: Any) -> Any:
    """The one base64 image of a v1 body ``{"instances": [{"image": {"b64": ...}}]}``
    (``{"image": "<base64>"}`` is accepted too); :class:`InvalidInput` otherwise."""
    expected = 'expected {"instances": [{"image": {"b64": "<base64 PNG or JPEG>"}}]}'
    if not isinstance(payload, dict):
        raise InvalidInput(f"a v1 request must be a JSON object; {expected}")
    instances = payload.get("instances")
    if not isinstance(instances, list) or not instances:
        raise InvalidInput(f"'instances' must be a non-empty list; {expected}")
    if len(instances) > 1:
        raise InvalidInput(f"{len(instances)} instances: one image per request; {expected}")
    inst = instances[0]
    image = inst.get(IMAGE_INPUT) if isinstance(inst, dict) else None
    if isinstance(image, dict):
        image = image.get("b64")
    if image is None:
        raise InvalidInput(f"instance 0 has no '{IMAGE_INPUT}'; {expected}")
    return image


class _RunFailed(InferenceError):
    """ONNX Runtime raised while running the model."""


class DetectorModel(kserve.Model):
    """The export's detector (or Mask R-CNN: :attr:`masks`, or SemanticFPN: :attr:`semantic`)
    behind KServe's v1/v2 protocols.
    :meth:`load` opens ``model.onnx`` in ONNX Runtime (CUDA when the installed onnxruntime offers it, else CPU), checks its input
    and outputs and runs it once on a test image; requests are decoded and run in a pool of
    ``workers`` threads, so the event loop (health checks) never waits on a detection."""

    def __init__(self, bundle: ExportBundle, name: str | None = None, limits: Limits | None = None,
                 workers: int = 1) -> None:
        super().__init__(check_model_name(name, "--name") if name is not None else
                         check_model_name(bundle.name, f"{EXPORT_JSON}'s name (give another with --name)"))
        self.bundle = bundle
        self.limits = limits or Limits()
        self.workers = checks.integer(workers, "workers", 1, 64, error=ServeError)
        self._session: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._lut = np.full(max(bundle.categories) + 1, -1, dtype=np.int64)  # label -> category id
        self.masks, self.semantic = bundle.masks, bundle.semantic
        if self.semantic:
            self._onnx_outputs: tuple[str, ...] = SEMANTIC_ONNX_OUTPUTS
            self.outputs: tuple[tuple[str, str, list[int]], ...] = SEMANTIC_OUTPUTS
            self._png_bits = labelmap.png_bits(max(bundle.categories.values()))
        else:
            self._onnx_outputs = ONNX_MASK_OUTPUTS if self.masks else ONNX_OUTPUTS
            self.outputs = MASK_OUTPUTS if self.masks else OUTPUTS
        for label, cat in bundle.categories.items():
            self._lut[label] = cat

    @staticmethod
    def providers() -> list[str]:
        """ONNX Runtime's execution providers in order of preference: CUDA when available, CPU."""
        available = ort.get_available_providers()
        return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]

    def load(self) -> bool:
        """Open the ONNX model; :class:`ServeError` naming the file when it cannot be loaded, does
        not have the export's input ``images`` and outputs ``boxes``, ``labels``, ``scores`` (and
        ``masks`` for a Mask R-CNN export, none for another; ``sem_seg`` alone for a semantic
        export), or fails on a grey 64x64 test image."""
        path = self.bundle.onnx_path
        try:
            session = ort.InferenceSession(str(path), providers=self.providers())
        except Exception as exc:  # noqa: BLE001  onnxruntime raises its own exception types
            raise ServeError(f"the ONNX model {str(path)!r} cannot be loaded by ONNX Runtime: {exc}") from None
        inputs = [(i.name, i.type) for i in session.get_inputs()]
        outputs = [o.name for o in session.get_outputs()]
        if inputs != [(ONNX_INPUT, "tensor(float)")]:
            raise ServeError(f"the ONNX model {str(path)!r} must have one float input {ONNX_INPUT!r}, has {inputs}")
        if sorted(outputs) != sorted(self._onnx_outputs):
            task = self.bundle.export.get("task", "detection")
            raise ServeError(f"the ONNX model {str(path)!r} must have the outputs {list(self._onnx_outputs)} (the "
                             f"export's task is {task!r} in {EXPORT_JSON}), has {outputs}")
        try:  # a model that cannot run at all fails here, not on every request
            self._run(session, np.full((3, WARMUP_SIDE, WARMUP_SIDE), 0.5, dtype=np.float32))
        except InferenceError as exc:
            raise ServeError(f"the ONNX model {str(path)!r} fails on a {WARMUP_SIDE}x{WARMUP_SIDE} test image: "
                             f"{exc}") from None
        self._session = session
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="spnas-infer")
        log.info("model %r: %s on %s, %d label(s)%s%s", self.name, path, session.get_providers()[0],
                 len(self.bundle.categories), ", masks as RLE" if self.masks else
                 ", label maps (category ids and PNG)" if self.semantic else "",
                 "" if self.bundle.verified else " (UNVERIFIED: parity gate not passed)")
        self.ready = True
        return self.ready

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        super().stop()

    def get_input_types(self) -> list[dict[str, Any]]:
        return [{"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [1]}]

    def get_output_types(self) -> list[dict[str, Any]]:
        return [{"name": n, "datatype": d, "shape": list(s)} for n, d, s in self.outputs]

    def detect(self, data: Any) -> dict[str, Any]:
        """One base64 (or raw) encoded image -> ``{"boxes", "scores", "labels"}`` (numpy arrays),
        labels mapped to category ids, and for a Mask R-CNN export ``"masks"``: one RLE
        (:func:`.rle.encode`) per detection, in detection order; for a semantic export
        ``{"sem_seg"}`` alone, ``int64 [H, W]`` category ids. :class:`InvalidInput` for bad
        input, an image ONNX Runtime fails on included (the model ran at load, so the image's
        geometry is what it cannot take: a 1x200 image leaves torchvision's resize a side of 0
        pixels); :class:`InferenceError` when the model gives inconsistent outputs (masks of
        another shape than ``[N, 1, H, W]``, a label map of another size than the image included)
        or a label ``labels.json`` does not map."""
        x = decode_image(decode_base64(data, self.limits), self.limits)
        try:
            return self._run(self._session, x)
        except _RunFailed as exc:
            raise InvalidInput(f"the model cannot process this {x.shape[2]}x{x.shape[1]} image: {exc}") from None

    def _run(self, session: Any, x: np.ndarray) -> dict[str, Any]:
        try:
            values = session.run(list(self._onnx_outputs), {ONNX_INPUT: x})
        except Exception as exc:  # noqa: BLE001  onnxruntime raises its own exception types
            raise _RunFailed(f"ONNX Runtime failed: {exc}") from None
        if self.semantic:
            return {"sem_seg": self._label_map(values[0], x)}
        boxes, labels, scores = values[:3]
        n = len(scores)
        if boxes.shape != (n, 4) or labels.shape != (n,):
            raise InferenceError(f"the model gave inconsistent outputs: boxes {list(boxes.shape)}, labels "
                                 f"{list(labels.shape)}, scores {list(scores.shape)}")
        out: dict[str, Any] = {"boxes": boxes.astype(np.float32, copy=False),
                               "scores": scores.astype(np.float32, copy=False), "labels": self._categories(labels)}
        if self.masks:
            masks = values[3]
            if masks.shape != (n, 1, *x.shape[1:]):
                raise InferenceError(f"the model gave masks of shape {list(masks.shape)} for {n} detection(s) on a "
                                     f"{x.shape[2]}x{x.shape[1]} image; expected {[n, 1, *x.shape[1:]]}")
            out["masks"] = rle.encode(masks)
        return out

    def _categories(self, labels: np.ndarray) -> np.ndarray:
        """The model's labels as category ids; :class:`InferenceError` for one labels.json does
        not map (below 1, or 0 for a semantic export's background, above the largest, or missing)."""
        labels = labels.astype(np.int64, copy=False)
        first = 0 if self.semantic else 1
        unmapped = labels[(labels < first) | (labels >= len(self._lut))]
        if not unmapped.size:
            unmapped = labels[self._lut[labels] < 0]
        if unmapped.size:
            raise InferenceError(f"the model gave label {int(unmapped.flat[0])}, which labels.json does not map")
        return self._lut[labels]

    def _label_map(self, sem_seg: np.ndarray, x: np.ndarray) -> np.ndarray:
        if sem_seg.shape != x.shape[1:]:
            raise InferenceError(f"the model gave a label map of shape {list(sem_seg.shape)} for a "
                                 f"{x.shape[2]}x{x.shape[1]} image; expected {list(x.shape[1:])}")
        return self._categories(sem_seg)

    def _png(self, sem_seg: np.ndarray) -> str:
        """The label map (category ids) as the base64 text of a PNG (:mod:`.labelmap`)."""
        return base64.b64encode(labelmap.encode(sem_seg, self._png_bits)).decode("ascii")

    async def _detect_async(self, data: Any) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.detect, data)

    async def predict(self, payload: Any, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> InferResponse | dict[str, Any]:
        """v2 (:class:`InferRequest`) -> :class:`InferResponse`; v1 (a JSON object) ->
        ``{"predictions": [{"boxes", "scores", "labels"}]}`` (and ``"masks"``, a list of RLE
        objects, for a Mask R-CNN export); a semantic export's ``{"predictions": [{"sem_seg":
        [[...]], "sem_seg_png": "<base64 PNG>"}]}``. In v2 each mask is the JSON text of its RLE,
        one element of the BYTES output ``masks`` (shape ``[N]``); the PNG one element of the
        BYTES output ``sem_seg_png`` (shape ``[1]``), made only when asked for or no output is named."""
        if isinstance(payload, InferRequest):
            known = [n for n, _, _ in self.outputs]
            unknown = [o.name for o in payload.request_outputs or [] if o.name not in known]
            if unknown:
                raise InvalidInput(f"unknown output(s) {unknown} requested; this model has {known}")
            result = await self._detect_async(image_of_v2(payload))
            wanted = {o.name for o in payload.request_outputs or []} or set(known)
            outputs_now = [(n, d) for n, d, _ in self.outputs if n in wanted]
            if self.semantic and "sem_seg_png" in wanted:
                result["sem_seg_png"] = np.array([self._png(result["sem_seg"])], dtype=np.object_)
            if self.masks:
                result["masks"] = np.array([json.dumps(r, separators=(",", ":")) for r in result["masks"]],
                                           dtype=np.object_).reshape(-1)
            outputs = [InferOutput(name=name, shape=list(result[name].shape), datatype=datatype, data=result[name])
                       for name, datatype in outputs_now]
            return InferResponse(response_id=payload.id or str(uuid.uuid4()), model_name=self.name,
                                 infer_outputs=outputs, requested_outputs=payload.request_outputs or None,
                                 use_binary_outputs=payload.use_binary_outputs)
        result = await self._detect_async(image_of_v1(payload))
        if self.semantic:
            return {"predictions": [{"sem_seg": result["sem_seg"].tolist(), "sem_seg_png": self._png(result["sem_seg"])}]}
        keys = [n for n, _, _ in self.outputs]
        return {"predictions": [{k: result[k] if k == "masks" else result[k].tolist() for k in keys}]}


ASGIApp = Callable[[MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
                   Awaitable[None]]


class BodyLimitMiddleware:
    """ASGI middleware in front of KServe's app: 413 for a request body over ``limit`` bytes,
    declared (``Content-Length``: refused before any byte is read) or streamed (chunked); 400 for
    a request using the v2 binary tensor data extension."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    def _message(self, size: int | None) -> str:
        what = f" of {size} bytes" if size is not None else ""
        return (f"request body{what} over the limit of {self.limit} bytes (a base64 image of "
                f"--max-image-bytes plus {BODY_SLACK} bytes)")

    @staticmethod
    async def _reply(send: Callable[[Any], Awaitable[None]], status: int, message: str) -> None:
        import orjson
        body = orjson.dumps({"error": message})
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.lower(): value for key, value in scope.get("headers") or ()}
        try:
            declared: int | None = int(headers[b"content-length"])
        except (KeyError, ValueError):
            declared = None
        if declared is not None and declared > self.limit:
            await self._reply(send, 413, self._message(declared))
            return
        if b"inference-header-content-length" in headers:
            # kserve 0.21.0 turns binary BYTES elements into UTF-8 strings, so an encoded image sent
            # this way fails inside KServe with a 500: the extension is refused plainly instead
            await self._reply(send, 400, "the binary tensor data extension (Inference-Header-Content-Length) is not "
                                         f"supported: send the image base64-encoded in the JSON input '{IMAGE_INPUT}'")
            return
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            message = await receive()
            if message.get("type") == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    from fastapi import HTTPException  # FastAPI re-raises it while reading the body: a 413
                    raise HTTPException(status_code=413, detail=self._message(None))
            return message

        await self.app(scope, limited, send)


def _check_address(host: str, port: int) -> None:
    """:class:`ServeError` now, with the address, when ``host:port`` cannot be listened on."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ServeError(f"cannot listen on {host}:{port}: {exc}") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def serve(path: str | os.PathLike, port: int = 8080, host: str = "127.0.0.1", name: str | None = None,
          allow_unverified: bool = False, *, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
          max_pixels: int = DEFAULT_MAX_PIXELS, workers: int = 1, grace_period: int = 30) -> None:
    """Serve the export folder ``path`` on ``host:port`` until SIGINT/SIGTERM (blocks).

    The model is named ``name``, else ``export.json``'s ``name``, else ``spnas``. The folder is
    checked by :func:`load_export` first (a failed or missing parity gate is refused unless
    ``allow_unverified``), then the ONNX model is loaded; every failure before listening is a
    :class:`ServeError`. One server per process: KServe's REST app is a module-level object.
    """
    global _served
    port = checks.integer(port, "--port", 1, 65535, error=ServeError)
    limits = Limits(max_image_bytes=max_image_bytes, max_pixels=max_pixels)
    bundle = load_export(path, allow_unverified=allow_unverified)
    model = DetectorModel(bundle, name, limits, workers=workers)
    if _served:
        raise ServeError("serve() runs once per process (KServe's REST application is a module-level object)")
    model.load()
    _check_address(host, port)
    _served = True

    from kserve.model_repository import ModelRepository
    from kserve.model_server import app
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.model_repository_extension import ModelRepositoryExtension
    from kserve.protocol.rest.server import RESTServer

    class FixedModels(ModelRepositoryExtension):
        """The v2 repository extension without load/unload: the one model stays (501 otherwise)."""

        async def load(self, model_name: str) -> None:
            raise NotImplementedError("this server serves one fixed model: repository load is disabled")

        async def unload(self, model_name: str) -> None:
            raise NotImplementedError("this server serves one fixed model: repository unload is disabled")

    repository = ModelRepository()
    repository.update(model)
    app.add_middleware(BodyLimitMiddleware, limit=limits.max_body_bytes)
    rest = RESTServer("kserve.model_server:app", DataPlane(model_registry=repository),
                      FixedModels(model_registry=repository), port, workers=1, grace_period=grace_period)
    rest.config.host = host  # KServe's RESTServer always binds 0.0.0.0; spnas binds where it is told
    log.info("serving %r from %s on http://%s:%d  (v2: POST /v2/models/%s/infer, v1: POST /v1/models/%s:predict)",
             model.name, bundle.root, host, port, model.name, model.name)
    try:
        rest.run()
    finally:
        model.stop()
