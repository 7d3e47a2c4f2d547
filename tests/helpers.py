"""Helpers shared by the tests: small COCO data sets, the demo config shrunk to seconds, and
models with randomised BatchNorm statistics."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from spnas.data.demo import write_demo_dataset

ROOT = Path(__file__).parent.parent
DEMO = ROOT / "configs" / "demo.yml"


#: a small Mask R-CNN for the tiny data set (96 px, 3 classes; at most 12 detections per image)
MASK_RCNN = {"type": "MaskRCNN", "backbone": {"code": "1-1-1-1", "block": "basic", "base_channels": 8},
             "neck": {"code": [0, 0, 1, 0], "out_channels": 32}, "min_size": 96, "max_size": 96, "num_classes": 4,
             "representation_size": 64, "box_score_thresh": 0.3, "box_detections_per_img": 12}


def tiny_overrides(data_root) -> list[str]:
    """``--set`` overrides that shrink configs/demo.yml to a run of seconds on ``data_root``."""
    return [f"fine_tune.dataset.common.data_root={data_root}", "general.workers=1",
            "fine_tune.model.model_desc.min_size=96", "fine_tune.model.model_desc.max_size=96",
            "fine_tune.model.model_desc.backbone.base_channels=8", "fine_tune.trainer.epochs=1",
            "fine_tune.trainer.lr_scheduler.params.warmup_iters=2",
            "serial.search_algorithm.max_sample=2", "serial.search_algorithm.flops_size=96",
            "parallel.search_algorithm.max_sample=2", "parallel.search_algorithm.flops_size=96",
            "reignition.top_k=1", "fully_train.trainer.epochs=1",
            "fully_train.trainer.lr_scheduler.params.after_scheduler_config.params.milestones=[1]"]


#: The shared tiny run's config on top of :func:`tiny_overrides`: fine_tune gets 2 epochs (4
#: iterations each, so a checkpoint exists mid-training for the resume test) and the full train
#: takes the top 2 of the front (so the pipeline fans out over more than one model).
TINY_RUN = ["fine_tune.trainer.epochs=2", "fully_train.top_k=2"]


def run_argv(data_root, workdir, workers: int = 1, extra=()) -> list[str]:
    """``spnas run`` of the shared tiny config (``configs/demo.yml`` + tiny overrides + TINY_RUN)."""
    argv = ["run", str(DEMO), "--workdir", str(workdir), "--workers", str(workers), "--quiet"]
    for o in tiny_overrides(data_root) + TINY_RUN + list(extra):
        argv += ["--set", o]
    return argv


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN random affine parameters and running statistics (in place), so that
    checks run in eval mode are not trivially satisfied by identity-like BN layers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                n = m.weight.shape[0]
                if m.weight.abs().sum() > 0:  # keep zero-initialised BNs (identity blocks) at zero
                    m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
    return model


def demo(tmp: Path, train: int = 24, val: int = 8, classes: int = 3, seed: int = 0, size: int = 160) -> Path:
    return write_demo_dataset(tmp, train=train, val=val, classes=classes, seed=seed, size=size)


def load_ann(root: Path, split: str = "train") -> dict:
    return json.loads((root / "annotations" / f"instances_{split}2017.json").read_text())


def save_ann(root: Path, data, split: str = "train") -> Path:
    path = root / "annotations" / f"instances_{split}2017.json"
    path.write_text(json.dumps(data))
    return path


def remap_categories(src: Path, dst: Path, mapping: dict[int, int]) -> Path:
    """Copy a data set, renumbering category ids (e.g. {1: 3, 2: 7, 3: 12})."""
    shutil.copytree(src, dst)
    for split in ("train", "val"):
        d = load_ann(dst, split)
        for c in d["categories"]:
            c["id"] = mapping[c["id"]]
        for a in d["annotations"]:
            a["category_id"] = mapping[a["category_id"]]
        save_ann(dst, d, split)
    return dst


def make_step(role: str = "serial", desc: dict | None = None, data_root=None, name: str | None = None,
              search: dict | None = None, **trainer):
    """A :class:`~spnas.config.types.StepConfig` built directly (no YAML): ``trainer`` keywords
    are :class:`~spnas.training.schedule.TrainConfig` fields."""
    from spnas.config.types import DatasetConfig, StepConfig
    from spnas.training.schedule import TrainConfig
    return StepConfig(name=name or role, role=role, dataset=DatasetConfig(data_root=str(data_root) if data_root else None),
                      trainer=TrainConfig(**trainer), model_desc=dict(desc or {}), search=search)


def png_bytes(array) -> bytes:
    """A uint8 ``[H, W, 3]`` (or ``[H, W]``) array encoded as PNG."""
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def val_scene_png(data_root, index: int, size: tuple[int, int]) -> bytes:
    """Val image ``index`` of a demo data set resized to ``size`` (h, w), as PNG bytes."""
    import numpy as np
    from PIL import Image

    from spnas.data.source import CocoSource
    ds = CocoSource(str(data_root)).load("val", train=False)
    image = (ds[index][0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return png_bytes(np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR)))


def as_served(encoded: bytes):
    """An encoded image decoded as ``spnas serve`` decodes it: float32 ``[3, H, W]`` RGB in [0, 1]."""
    import io

    import numpy as np
    from PIL import Image
    with Image.open(io.BytesIO(encoded)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255)


def onnx_outputs(folder: Path, encoded: bytes, names: list[str]) -> list:
    """An export folder's model.onnx run by ONNX Runtime directly on ``encoded`` as served."""
    import onnxruntime as ort
    session = ort.InferenceSession(str(Path(folder) / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(names, {"images": as_served(encoded)})


def export_categories(folder: Path) -> dict[int, int]:
    """An export folder's labels.json as ``{label: category id}``."""
    return {e["label"]: e["category_id"] for e in json.loads((Path(folder) / "labels.json").read_text())["labels"]}
