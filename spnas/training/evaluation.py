"""Evaluation: predictions of a detector on a COCO split, and COCO box AP (and, for a model
that predicts masks, mask AP) through pycocotools' COCOeval (its prints kept out of our output).

``coco_metrics(coco_gt, results)`` returns ``mAP`` (AP@[.5:.95] x 100), ``AP50``, ``AP75``,
``AP_small``, ``AP_medium``, ``AP_large`` (all x 100; ``None`` where COCO leaves a metric
undefined because the ground truth has no object of that size); with ``iou_type="segm"`` the
same of the masks, which :func:`evaluate` reports as ``segm_mAP``, ``segm_AP50``, ...
"""
from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..data.coco import CocoDetection
from .device import device_of

METRIC_NAMES = ("mAP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")


#: The semantic-segmentation metrics (x 100): mean IoU over the classes present in the ground
#: truth or the predictions, pixel accuracy, mean class accuracy; ``IoU_per_class`` beside them.
SEMANTIC_METRIC_NAMES = ("mIoU", "pixel_acc", "mAcc")
#: Prefix of the mask metrics (``segm_mAP``...).
SEGM = "segm_"
SEGM_METRIC_NAMES = tuple(SEGM + name for name in METRIC_NAMES)


def coco_metrics(coco_gt: Any, results: Sequence[dict], iou_type: str = "bbox") -> dict[str, float | None]:
    """Evaluate detections ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``
    (``iou_type="segm"``: ``"segmentation"``, a compressed RLE, instead of ``"bbox"``)."""
    from pycocotools.cocoeval import COCOeval
    if not results:  # pycocotools cannot load an empty result list; nothing detected is AP 0
        return {name: 0.0 for name in METRIC_NAMES}
    if iou_type == "segm":
        bare = [a["id"] for a in coco_gt.dataset.get("annotations", []) if not a.get("segmentation")]
        if bare:
            from ..utils.errors import DataError
            raise DataError(f"mask AP needs a segmentation on every annotation; {len(bare)} have none "
                            f"(e.g. annotation {bare[0]})")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes([dict(r) for r in results])  # loadRes adds keys: keep the caller's dicts intact
        ev = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: (float(ev.stats[i]) * 100 if ev.stats[i] >= 0 else None)
            for i, name in enumerate(METRIC_NAMES)}


def to_coco_results(image_id: int, boxes, scores, labels, label_to_cat: dict[int, int]) -> list[dict]:
    """torchvision predictions of one image (``boxes`` [N, 4] x0y0x1y1, ``scores`` [N],
    ``labels`` [N] contiguous) -> COCO result dicts with the dataset's category ids."""
    out = []
    b = boxes.tolist()
    for (x0, y0, x1, y1), s, lab in zip(b, scores.tolist(), labels.tolist(), strict=False):
        out.append({"image_id": int(image_id), "category_id": int(label_to_cat[int(lab)]),
                    "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(s)})
    return out


def eval_batches(n_images: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """The image indices of the evaluation batches rank ``rank`` of ``world_size`` runs: the
    single-process batches (consecutive images, ``batch_size`` each) dealt out round-robin, so
    every image is evaluated exactly once, in the same batch as in a single process (a batch's
    padding, and so its predictions, do not depend on the number of processes)."""
    batches = [list(range(i, min(i + batch_size, n_images))) for i in range(0, n_images, batch_size)]
    return batches[rank::world_size]


@torch.no_grad()
def predict(model: nn.Module, dataset: CocoDetection, device: str | torch.device | None = None,
            batch_size: int = 4, progress: bool = False, workers: int = 0,
            pin_memory: bool = False) -> list[dict]:
    """COCO-format detections of ``model`` on every image of ``dataset``, in image order.

    Inside a process group (a data-parallel training) the batches are shared out among the
    ranks (:func:`eval_batches`) and the detections gathered: every rank returns the same list,
    equal to a single process's."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from ..data.coco import collate
    from . import distributed
    ctx = distributed.current()
    dev = distributed.rank_device(device_of(device), ctx)
    model.eval().to(dev)
    dataset.set_epoch(0)
    batches = eval_batches(len(dataset), batch_size, ctx.rank, ctx.world_size)
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=workers,
                        pin_memory=pin_memory)
    per_batch: list[tuple[int, list[dict]]] = []
    for idx, (images, targets) in zip(batches, tqdm(loader, desc="evaluate", unit="batch",
                                                    disable=not progress or not ctx.is_main, leave=False),
                                      strict=True):
        outs = model([im.to(dev, non_blocking=True) for im in images])
        found: list[dict] = []
        for out, tgt in zip(outs, targets, strict=True):
            res = to_coco_results(tgt["image_id"], out["boxes"].cpu(), out["scores"].cpu(),
                                  out["labels"].cpu(), dataset.label_to_cat)
            if "masks" in out:
                for r, rle in zip(res, mask_rles(out["masks"]), strict=True):
                    r["segmentation"] = rle
            found.extend(res)
        per_batch.append((idx[0], found))
    if ctx.distributed:
        per_batch = [b for part in distributed.all_gather(per_batch) for b in part]
        per_batch.sort(key=lambda b: b[0])
    return [r for _, found in per_batch for r in found]


def mask_rles(masks: torch.Tensor) -> list[dict]:
    """torchvision's mask probabilities ``[N, 1, H, W]`` -> COCO compressed RLEs of the pixels
    above 0.5 (``counts`` as text, so results stay JSON and gatherable)."""
    import numpy as np
    from pycocotools import mask as mask_utils
    if masks.shape[0] == 0:
        return []
    binary = np.asfortranarray((masks[:, 0] > 0.5).cpu().numpy().astype(np.uint8).transpose(1, 2, 0))
    return [{"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")}
            for r in mask_utils.encode(binary)]


def is_semantic(model: nn.Module) -> bool:
    """Whether ``model`` is a semantic-segmentation model (one class per pixel)."""
    from ..models.semantic import SemanticFPN
    return isinstance(model, SemanticFPN)


@torch.no_grad()
def confusion_matrix(model: nn.Module, dataset: CocoDetection, device: str | torch.device | None = None,
                     batch_size: int = 4, progress: bool = False) -> torch.Tensor:
    """``int64 [C, C]`` pixel counts of a semantic model on ``dataset`` (which must carry
    ``sem_seg`` label maps): row = true class, column = predicted; ignored pixels left out.
    Inside a process group the batches are shared out as :func:`predict` does and the counts
    summed: every rank returns the single-process matrix."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from ..data.coco import collate
    from . import distributed
    ctx = distributed.current()
    dev = distributed.rank_device(device_of(device), ctx)
    model.eval().to(dev)
    dataset.set_epoch(0)
    n = model.num_classes
    conf = torch.zeros(n * n, dtype=torch.int64)
    batches = eval_batches(len(dataset), batch_size, ctx.rank, ctx.world_size)
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate)
    for images, targets in tqdm(loader, desc="evaluate", unit="batch", disable=not progress or not ctx.is_main,
                                leave=False):
        outs = model([im.to(dev, non_blocking=True) for im in images])
        for out, tgt in zip(outs, targets, strict=True):
            conf += pixel_counts(tgt["sem_seg"], out["sem_seg"].cpu(), n, f"image {tgt['image_id']}")
    if ctx.distributed:
        conf = sum(distributed.all_gather(conf), torch.zeros_like(conf))
    return conf.reshape(n, n)


def pixel_counts(truth: torch.Tensor, pred: torch.Tensor, n: int, where: str) -> torch.Tensor:
    """One image's flat confusion counts ``int64 [n * n]`` (index ``true * n + predicted``),
    ignored pixels left out; a truth value >= ``n`` raises ValueError naming ``where``."""
    from ..models.semantic import IGNORE_INDEX
    truth, pred = truth.reshape(-1), pred.reshape(-1)
    keep = truth != IGNORE_INDEX
    if bool((truth[keep] >= n).any()):
        raise ValueError(f"{where}: label map values >= the model's {n} classes")
    return torch.bincount(truth[keep] * n + pred[keep], minlength=n * n)


def semantic_metrics(conf: torch.Tensor, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """``mIoU``, ``pixel_acc``, ``mAcc`` (x 100) and ``IoU_per_class`` (``{name: IoU x 100}``,
    ``None`` for a class absent from both the truth and the predictions) of a confusion matrix
    (rows true, columns predicted). The mean IoU averages the classes present in the truth or
    the predictions (a class predicted but absent from the truth counts with IoU 0); the mean
    accuracy the classes present in the truth. No labelled pixel at all: every figure 0."""
    c = conf.to(torch.float64)
    tp, truth, pred = c.diag(), c.sum(1), c.sum(0)
    union = truth + pred - tp
    names = list(class_names) if class_names is not None else [str(i) for i in range(c.shape[0])]
    if len(names) != c.shape[0]:
        raise ValueError(f"{len(names)} class names for a {c.shape[0]}-class confusion matrix")
    iou = [float(tp[i] / union[i] * 100) if union[i] > 0 else None for i in range(c.shape[0])]
    present = [v for v in iou if v is not None]
    acc = [float(tp[i] / truth[i] * 100) for i in range(c.shape[0]) if truth[i] > 0]
    total = float(truth.sum())
    return {"mIoU": sum(present) / len(present) if present else 0.0,
            "pixel_acc": float(tp.sum()) / total * 100 if total else 0.0,
            "mAcc": sum(acc) / len(acc) if acc else 0.0,
            "IoU_per_class": dict(zip(names, iou, strict=True))}


def evaluate(model: nn.Module, dataset: CocoDetection, device: str | torch.device | None = None,
             batch_size: int = 4, progress: bool = False) -> dict[str, Any]:
    """COCO box metrics of ``model`` on ``dataset`` (see :func:`coco_metrics`), and for a model
    that predicts masks the mask metrics too (``segm_mAP``...); for a semantic model
    (:func:`is_semantic`) the metrics of :func:`semantic_metrics` instead (class names
    ``background`` and the data set's categories). Inside a process group, evaluated sharded
    (:func:`predict`), the same figures on every rank."""
    if is_semantic(model):
        conf = confusion_matrix(model, dataset, device, batch_size, progress)
        return semantic_metrics(conf, ["background", *dataset.cat_names])
    results = predict(model, dataset, device, batch_size, progress)
    boxes = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    metrics = coco_metrics(dataset.coco, boxes)
    heads = getattr(model, "roi_heads", None)
    if heads is not None and heads.has_mask():
        masks = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
        metrics.update({SEGM + k: v for k, v in coco_metrics(dataset.coco, masks, "segm").items()})
    return metrics
