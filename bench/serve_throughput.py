"""An exported model, measured: ONNX Runtime vs PyTorch CPU latency side by side, and the
throughput of ``spnas serve`` over loopback HTTP.

1. **Latency.** The export's PyTorch detector (``export.json``'s description and weights) and
   its ``model.onnx`` under ONNX Runtime run the same val images, alternating per image so that
   machine noise hits both alike; prints each one's median per image and the ratio ORT/PyTorch.
2. **Serving.** ``spnas serve`` is started as a child process on 127.0.0.1 (a free port), and a
   bounded number of v2 infer requests (encoded val images, base64 in JSON) is sent at each
   concurrency level; prints requests per second and the p50/p95 request latency, and checks
   every answer against ONNX Runtime run directly on the same image (boxes within 1e-3 px,
   scores within 1e-4, labels equal; a Mask R-CNN's RLE masks equal to ONNX Runtime's masks
   above 0.5 pixel for pixel; a semantic model's label map and its PNG equal to ONNX Runtime's
   label map in category ids). The server is stopped by PID, whatever happens.

    python bench/serve_throughput.py runs/demo/export [--data data/demo] [--images 12]
        [--requests 48] [--concurrency 1 4] [--workers 2]

Exits 1 when an answer disagrees with ONNX Runtime or a request fails.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from spnas.data.source import CocoSource
from spnas.export.programs import eager_runner, onnx_runner
from spnas.models.checkpoint import load_weights
from spnas.models.detector import build_detector
from spnas.serve import labelmap, rle


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tensor(encoded: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(encoded)) as im:
        x = np.asarray(im.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    return torch.from_numpy(x)


def latency(export: Path, info: dict, images: list[bytes], repeats: int) -> dict:
    """Median ms per image of PyTorch eager and ONNX Runtime, alternating per image."""
    detector = build_detector(info["desc"])
    load_weights(detector, info["desc"], info["weights"])
    runs = {"pytorch": eager_runner(detector), "onnxruntime": onnx_runner(export / info["onnx"])}
    tensors = [_tensor(b) for b in images]
    for run in runs.values():  # warm-up
        run(tensors[0])
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(repeats):
        for i, x in enumerate(tensors):
            order = list(runs) if (i + r) % 2 == 0 else list(reversed(runs))
            for k in order:
                t = time.perf_counter()
                runs[k](x)
                times[k].append((time.perf_counter() - t) * 1000)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"pytorch_ms": round(med["pytorch"], 2), "onnxruntime_ms": round(med["onnxruntime"], 2),
            "ratio_ort_over_pytorch": round(med["onnxruntime"] / med["pytorch"], 3), "samples": len(times["pytorch"])}


def references(export: Path, info: dict, images: list[bytes]) -> list[dict[str, np.ndarray]]:
    """ONNX Runtime directly on each decoded image (one session), labels mapped to category
    ids: what the server must answer."""
    labels = json.loads((export / info.get("labels", "labels.json")).read_text())["labels"]
    to_cat = {int(e["label"]): int(e["category_id"]) for e in labels}
    lut = np.zeros(max(to_cat) + 1, dtype=np.int64)
    for label, cat in to_cat.items():
        lut[label] = cat
    run = onnx_runner(export / info["onnx"])
    out = []
    for encoded in images:
        o = run(_tensor(encoded))
        if "sem_seg" in o:
            out.append({"sem_seg": lut[o["sem_seg"].numpy()]})
            continue
        ref = {"boxes": o["boxes"].numpy(), "scores": o["scores"].numpy(), "labels": lut[o["labels"].numpy()]}
        if "masks" in o:
            ref["masks"] = o["masks"].numpy()[:, 0] > rle.MASK_THRESHOLD
        out.append(ref)
    return out


class Server:
    """``spnas serve`` as a child process on 127.0.0.1."""

    def __init__(self, export: Path, workers: int, log: Path) -> None:
        self.port, self.log = _free_port(), log
        self._log = open(log, "wb")  # noqa: SIM115  closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "spnas", "serve", str(export), "--port", str(self.port),
                                      "--workers", str(workers)], stdout=self._log, stderr=subprocess.STDOUT)

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, json.loads(data) if data else {}
        finally:
            conn.close()

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"spnas serve exited ({self.proc.returncode}):\n{self.log.read_text()}")
            try:
                if self.request("GET", "/v2/health/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"spnas serve was not ready in {timeout:.0f} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        self._log.close()


def agrees(body: dict, ref: dict[str, np.ndarray]) -> bool:
    """The v2 answer equals ONNX Runtime direct (:func:`references`): detections (and masks), or
    the label map as category ids and as its PNG."""
    outs = {o["name"]: o for o in body.get("outputs", [])}
    if "sem_seg" in ref:
        want = ref["sem_seg"]
        if set(outs) != {"sem_seg", "sem_seg_png"} or outs["sem_seg"]["shape"] != list(want.shape):
            return False
        png = labelmap.decode(base64.b64decode(outs["sem_seg_png"]["data"][0]))
        return np.array_equal(np.asarray(outs["sem_seg"]["data"]).reshape(want.shape), want) and \
            np.array_equal(png, want)
    if set(outs) != ({"boxes", "scores", "labels", "masks"} if "masks" in ref else {"boxes", "scores", "labels"}):
        return False
    n = len(ref["scores"])
    boxes = np.asarray(outs["boxes"]["data"], dtype=np.float32).reshape(-1, 4)
    same = (boxes.shape[0] == n and np.allclose(boxes, ref["boxes"], atol=1e-3, rtol=0)
            and np.allclose(np.asarray(outs["scores"]["data"], dtype=np.float32), ref["scores"], atol=1e-4, rtol=0)
            and list(outs["labels"]["data"]) == ref["labels"].tolist())
    if same and "masks" in ref:
        masks = [rle.decode(json.loads(text)).astype(bool) for text in outs["masks"]["data"]]
        same = len(masks) == n and all(np.array_equal(m, w) for m, w in zip(masks, ref["masks"], strict=False))
    return same


def throughput(server: Server, name: str, bodies: list[bytes], refs: list[dict], requests: int,
               concurrency: int) -> dict:
    """``requests`` infer calls (images in turn) from ``concurrency`` client threads."""
    def one(i: int) -> tuple[float, bool]:
        t = time.perf_counter()
        status, body = server.request("POST", f"/v2/models/{name}/infer", bodies[i % len(bodies)])
        return (time.perf_counter() - t) * 1000, status == 200 and agrees(body, refs[i % len(bodies)])
    server.request("POST", f"/v2/models/{name}/infer", bodies[0])  # warm-up
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    lat = sorted(ms for ms, _ in results)
    return {"concurrency": concurrency, "requests": requests, "wall_s": round(wall, 2),
            "rps": round(requests / wall, 2), "p50_ms": round(lat[len(lat) // 2], 1),
            "p95_ms": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 1),
            "correct": sum(ok for _, ok in results)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export", type=Path, help="an export folder (spnas export --out)")
    ap.add_argument("--data", default=None, help="COCO-layout data root (default: export.json's data root)")
    ap.add_argument("--images", type=int, default=12, help="val images used (default 12)")
    ap.add_argument("--repeats", type=int, default=2, help="latency passes over the images (default 2)")
    ap.add_argument("--requests", type=int, default=48, help="infer requests per concurrency level (default 48)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--workers", type=int, default=2, help="spnas serve --workers (default 2)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    if not 1 <= args.requests <= 1000 or not all(1 <= c <= 16 for c in args.concurrency):
        ap.error("--requests must be 1..1000 and --concurrency 1..16 (a loopback bench, bounded)")

    info = json.loads((args.export / "export.json").read_text())
    data = CocoSource(args.data or info["data"]["root"])
    val = data.load("val", train=False)
    files = [val.img_dir / r["file_name"] for r in val.records[: args.images]]
    images = [f.read_bytes() for f in files]
    print(f"export {args.export} ({info['desc']['backbone']['code']}, neck {info['desc']['neck']['code']}), "
          f"{len(images)} val images of {data.root}, torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs")

    lat = latency(args.export, info, images, args.repeats)
    print(f"latency per image (median of {lat['samples']}, alternating): PyTorch {lat['pytorch_ms']:.1f} ms, "
          f"ONNX Runtime {lat['onnxruntime_ms']:.1f} ms, ratio ORT/PyTorch {lat['ratio_ort_over_pytorch']:.2f}")

    refs = references(args.export, info, images)
    bodies = [json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                      "data": [base64.b64encode(b).decode()]}]}).encode() for b in images]
    name = info.get("name", "spnas")
    rows = []
    with tempfile.TemporaryDirectory(prefix="spnas-serve-bench-") as tmp:
        server = Server(args.export, args.workers, Path(tmp) / "serve.log")
        try:
            server.wait_ready()
            for c in args.concurrency:
                row = throughput(server, name, bodies, refs, args.requests, c)
                rows.append(row)
                print(f"served (--workers {args.workers}), concurrency {c}: {row['requests']} requests in "
                      f"{row['wall_s']:.1f} s = {row['rps']:.2f} req/s, p50 {row['p50_ms']:.0f} ms, "
                      f"p95 {row['p95_ms']:.0f} ms, {row['correct']}/{row['requests']} equal to ONNX Runtime direct")
        finally:
            server.stop()
    if args.json:
        args.json.write_text(json.dumps({"latency": lat, "serve": rows, "images": len(images),
                                         "threads": torch.get_num_threads()}, indent=2) + "\n")
    bad = sum(r["requests"] - r["correct"] for r in rows)
    if bad:
        print(f"FAILED: {bad} answer(s) missing or different from ONNX Runtime direct")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
