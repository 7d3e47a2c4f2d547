"""The ``spnas`` command line. Library errors become one-line messages and exit status 2."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from .. import __version__
from ..utils.errors import SpnasError

log = logging.getLogger("spnas")


def _desc_from_args(args: argparse.Namespace) -> dict:
    desc: dict = {"backbone": {"code": args.code}, "neck": {}}
    if args.block is not None:
        desc["backbone"]["block"] = args.block
    if args.base_channels is not None:
        desc["backbone"]["base_channels"] = args.base_channels
    if args.parallel is not None:
        desc["neck"]["code"] = args.parallel
    if args.num_classes is not None:
        desc["num_classes"] = args.num_classes
    return desc


def cmd_describe(args: argparse.Namespace) -> int:
    from ..models.cost import describe
    info = describe(_desc_from_args(args), size=args.size)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    d, p = info["desc"], info["params"]
    bb = d["backbone"]
    print(f"architecture  {info['arch']}")
    print(f"block         {bb['block']}   base channels {bb['base_channels']}   "
          f"classes {d['num_classes']}")
    print(f"serial code   {bb['code']}   ({sum(r['blocks'] for r in info['stages'])} blocks, "
          f"{len(info['stages'])} stages)")
    print(f"parallel code {d['neck']['code']}")
    print()
    print(f"{'stage':>5} {'code':<14} {'blocks':>6} {'in ch':>6} {'out ch':>6} {'stride':>6} {'parallel':>8}")
    for r in info["stages"]:
        print(f"{r['stage']:>5} {r['code']:<14} {r['blocks']:>6} {r['in_channels']:>6} "
              f"{r['out_channels']:>6} {r['stride']:>6} {r['parallel']:>8}")
    print()
    print(f"params        {p['total']:,} total: backbone {p['backbone']:,}, parallel {p['parallel']:,}, "
          f"FPN {p['neck']:,}, heads {p['heads']:,}")
    print(f"GFLOPs        {info['gflops']:.2f} (backbone + parallel + FPN at {info['size']}x{info['size']})")
    return 0


def _load_desc(args: argparse.Namespace) -> dict:
    """``--desc FILE`` or ``--code/--block/--base-channels``."""
    from ..utils.fileio import read_json
    if getattr(args, "desc", None):
        desc = read_json(args.desc, "model description")
        if not isinstance(desc, dict):
            raise SpnasError(f"model description {args.desc!r} must be a JSON object")
        return desc
    desc: dict = {"backbone": {"code": args.code}}
    if args.block is not None:
        desc["backbone"]["block"] = args.block
    if args.base_channels is not None:
        desc["backbone"]["base_channels"] = args.base_channels
    return desc


#: ``--task`` -> the model type that does it.
TASKS = {"detection": "FasterRCNN", "instance_segmentation": "MaskRCNN", "semantic_segmentation": "SemanticFPN"}


def _with_task(desc: dict, task: str | None) -> dict:
    """``desc`` with the model type of ``--task`` (refused when the description names another).
    For ``semantic_segmentation`` the detector-only keys of a detector's description (RPN, RoI
    head settings) are dropped, and said so on stderr: one description serves every task."""
    if task is None:
        return desc
    from ..models.desc import DETECTOR_KWARGS, SEMANTIC_KWARGS, normalize_desc
    given = desc.get("type")
    if given is not None and normalize_desc({"type": given})["type"] != TASKS[task]:
        raise SpnasError(f"--task {task} needs model desc type {TASKS[task]!r}, but the description says {given!r}")
    out = {**desc, "type": TASKS[task]}
    if TASKS[task] == "SemanticFPN":
        dropped = sorted(k for k in out if (k in DETECTOR_KWARGS and k not in SEMANTIC_KWARGS)
                         or k == "representation_size")
        if dropped:
            print(f"--task {task}: detector setting(s) {', '.join(dropped)} of the description do not apply to a "
                  "SemanticFPN and are left out", file=sys.stderr)
        out = {k: v for k, v in out.items() if k not in dropped}
    return out


def cmd_demo_data(args: argparse.Namespace) -> int:
    from ..data.demo import write_demo_dataset
    out = write_demo_dataset(args.out_dir, train=args.train, val=args.val, size=args.size, classes=args.classes,
                             seed=args.seed, progress=True, hard=args.hard)
    print(f"{'hard ' if args.hard else ''}demo data (COCO layout) written to {out}")
    return 0


def _train_config(args: argparse.Namespace):
    from ..training.schedule import TrainConfig
    kw = dict(batch_size=args.batch_size, lr=args.lr, seed=args.seed, workers=args.workers,
              schedule=args.schedule, warmup_iters=args.warmup_iters, clip_grad_norm=args.clip_grad_norm,
              lr_scaling=args.lr_scaling, checkpoint_every=args.checkpoint_every, amp=not args.no_amp,
              channels_last=not args.no_channels_last, cudnn_benchmark=not args.no_cudnn_benchmark,
              pin_memory=not args.no_pin_memory)
    if args.iters is not None:
        kw["iters"] = args.iters
    else:
        kw["epochs"] = args.epochs
    return TrainConfig(**kw)


def _relaunch(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``spnas ... --nproc N``: the same command as N data-parallel ranks through
    ``torch.distributed.run`` (``--nproc`` dropped); its exit status."""
    from ..training.distributed import launch_argv
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    import subprocess
    return subprocess.call(launch_argv(args.nproc, ["-m", "spnas", *rest]))


def cmd_train(args: argparse.Namespace) -> int:
    from ..data.source import CocoSource
    from ..training import distributed
    from ..training.architecture import train_architecture
    distributed.check_nproc(args.nproc)
    if args.nproc > 1 and not distributed.in_launch():
        from ..training.device import device_of
        distributed.check_devices(args.nproc, device_of(args.device))
        return _relaunch(args, args.argv)
    perf = train_architecture(_with_task(_load_desc(args), args.task), CocoSource(args.data), args.out,
                              _train_config(args), arch_id=args.id,
                              init=args.init, device=args.device, resume=not args.no_resume, progress=True,
                              min_size=args.min_size, max_size=args.max_size)
    if distributed.env_context().is_main:
        segm = f"segm_mAP {perf.get('segm_mAP') or 0:.2f}  " if "segm_mAP" in perf else ""
        quality = (f"mIoU {perf['mIoU']:.2f}  pixel acc {perf['pixel_acc']:.2f}  " if "mIoU" in perf else
                   f"mAP {perf.get('mAP') or 0:.2f}  AP50 {perf.get('AP50') or 0:.2f}  {segm}")
        print(f"{args.out}: {quality}"
              f"params {perf['params']:,}  GFLOPs {perf['gflops']:.2f}  {perf['world_size']} process(es), "
              f"global batch {perf['global_batch']}  ({perf['train_seconds']:.0f} s)")
    return 0


def _figures(metrics: dict) -> str:
    """The task's headline figures of a metrics dict: ``mAP 61.25`` (``segm_mAP`` too for a Mask
    R-CNN; ``mIoU`` and ``pixel_acc`` for a semantic model)."""
    keys = [k for k in ("mAP", "segm_mAP", "mIoU", "pixel_acc") if metrics.get(k) is not None]
    return ", ".join(f"{k} {metrics[k]:.2f}" for k in keys) or "no metric"


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..data.source import CocoSource
    from ..training.architecture import evaluate_architecture
    from ..utils.fileio import atomic_write_json
    metrics = evaluate_architecture(_load_desc(args), args.weights, CocoSource(args.data), split=args.split,
                                    device=args.device, batch_size=args.batch_size, progress=True)
    if args.out:
        atomic_write_json(args.out, metrics)
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_reignite(args: argparse.Namespace) -> int:
    from ..data.source import CocoSource
    from ..training.reignite import reignite
    from ..training.schedule import ReignitionSettings
    settings = ReignitionSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                  image_size=args.image_size, seed=args.seed,
                                  recalibrate_images=args.recalibrate_images, head_iters=args.head_iters,
                                  detection_batch_size=args.detection_batch_size)
    detection = CocoSource(args.from_detection, args.img_prefix, args.ann_prefix) if args.from_detection else None
    perf = reignite(_load_desc(args), args.weights, args.out, settings, folder=args.data, detection=detection,
                    arch_id=args.id, device=args.device, progress=True, nproc=args.nproc)
    print(f"{args.out}: reignited backbone, top-1 {perf['top1_train']:.1f}% (train) on {perf['source']}, "
          f"BN recalibrated on {perf['recalibrated']} detection image(s), {perf['head_iters']} head iteration(s)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..orchestration.local import run
    from ..orchestration.reports import seed_line
    from ..search.settings import SECOND_FIGURE
    config = load_config(args.config, workdir=args.workdir, overrides=args.set or ())
    reports = run(config, workers=args.workers, progress=not args.quiet, publish=args.publish,
                  resume=args.resume, nproc=args.nproc)
    best = reports.get("best")
    out = f"{config.workdir}/output"
    print(f"\nSP-NAS finished in {reports['seconds']:.0f} s. Results: {out}")
    for name, ph in reports["phases"].items():
        extra = f", plot {ph['plot']}" if ph.get("plot") else ""
        print(f"  {name:<12} {len(ph['records'])} record(s), {ph.get('seconds', 0):.0f} s{extra}")
    if reports.get("published"):
        print(f"  published to {reports['published']['uri']} ({reports['published']['objects']} files)")
    ctrl = reports.get("control")
    if ctrl:
        print("equal-budget control (the seed trained as long as the searched model's lineage, from the same weights):")
        q = ctrl.get("quality", "mAP")
        q2 = SECOND_FIGURE.get(q, "AP50")
        for key in ("searched", "control"):
            e = ctrl[key]
            print(f"  {key:<9} {e['desc']['backbone']['code']} neck {e['desc']['neck']['code']}  {q} {e[q]:.2f}  "
                  f"{q2} {e.get(q2) or 0:.2f}  params {e['params']:,}  GFLOPs {e['gflops']:.2f}  "
                  f"{e['iterations']} iterations")
        for name, ph in ctrl["phases"].items():
            if "delta_" + q in ph:
                print(f"  {name:<9} best candidate {ph['searched'][q]:.2f} vs control {ph['control'][q]:.2f} {q} "
                      f"({ph['delta_' + q]:+.2f}, {ph['control']['iterations']} iterations each)")
            if ph.get("seed") is not None:
                print(f"  {'':<9} {seed_line(ph, q)}")
        print(f"  delta {q} {ctrl['delta_' + q]:+.2f}: the {ctrl['winner']} model is the result ({ctrl['reason']})")
    if reports.get("compute"):
        c = reports["compute"]
        print(f"compute: search {c['search']['images']:,} images ({c['search']['iterations']:,} iterations), "
              f"controls {c['controls']['images']:,} images ({c['controls']['iterations']:,} iterations), "
              f"{c['seconds']:.0f} s wall")
    if best:
        m = best["metrics"]
        figures = "  ".join(f"{k} {m[k]:.2f}" for k in ("mAP", "AP50", "segm_mAP", "mIoU", "pixel_acc")
                            if m.get(k) is not None)
        print(f"result: {best['desc']['backbone']['code']} neck {best['desc']['neck']['code']}  "
              f"{figures}  params {best['params']:,}  GFLOPs {best['gflops']:.2f}")
        print(f"  weights {best['weights']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..data.source import CocoSource
    from ..export.bundle import export_model, lineage
    from ..utils.fileio import read_json
    control, lin = None, None
    if args.run:
        from pathlib import Path
        reports = read_json(Path(args.run) / "reports.json", "run reports")
        best = reports.get("best")
        if not best:
            raise SpnasError(f"{args.run}/reports.json names no result model (an unfinished run?)")
        desc, weights = best["desc"], args.weights or best["weights"]
        control, lin = reports.get("control"), lineage(reports, best)
        data = args.data
        if not data:
            raise SpnasError("spnas export --run needs --data: the data set whose val split gates the export")
    else:
        if not (args.desc and args.weights and args.data):
            raise SpnasError("spnas export needs --desc, --weights and --data (or --run OUTPUT_DIR of a spnas run "
                             "and --data)")
        desc, weights, data = _load_desc(args), args.weights, args.data
    if args.control:
        control = read_json(args.control, "control summary")
    info = export_model(desc, weights, CocoSource(data), args.out, name=args.name, control=control, lineage_=lin,
                        max_images=args.max_images)
    costs = info["costs"]
    print(f"{args.out}: model.onnx, model.torchscript.pt, labels.json, parity.json, export.json, MODEL_CARD.md; "
          f"{_figures(info['metrics'])}, {costs['params']:,} params, latency CPU PyTorch "
          f"{costs['latency_ms']['pytorch_cpu']} ms / ONNX Runtime {costs['latency_ms']['onnxruntime_cpu']} ms")
    if not info["parity"]["passed"]:
        print(f"spnas export: parity gate FAILED (see {args.out}/parity.json): this export is refused for publishing",
              file=sys.stderr)
        return 3
    print("parity gate passed")
    return 0


def _arch_args(p: argparse.ArgumentParser, desc: bool = True) -> None:
    if desc:
        p.add_argument("--desc", default=None, help="model description JSON (desc_<id>.json)")
    p.add_argument("--code", default="111-2111-211111-211",
                   help="serial code, or Vega's one-string form r_111-2111-211111-211_0-0-0-0")
    p.add_argument("--block", default=None, help="basic | bottleneck | resnext (default bottleneck)")
    p.add_argument("--base-channels", type=int, default=None, help="stem width (default 64)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spnas", description="SP-NAS detection backbone search")
    parser.add_argument("--version", action="version", version=f"spnas {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("describe", help="print blocks, stages, channels, strides, params and GFLOPs")
    _arch_args(p, desc=False)
    p.add_argument("--parallel", default=None, help="parallel code, e.g. 0,1,0,0 (default all zeros)")
    p.add_argument("--num-classes", type=int, default=None, help="classes incl. background (default 91)")
    p.add_argument("--size", type=int, default=800, help="square input size for GFLOPs (default 800)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_describe)

    p = sub.add_parser("demo-data", help="write the generated demo detection set in COCO layout")
    p.add_argument("out_dir")
    p.add_argument("--train", type=int, default=240, help="training images (default 240)")
    p.add_argument("--val", type=int, default=60, help="validation images (default 60)")
    p.add_argument("--size", type=int, default=160, help="image side in pixels (default 160)")
    p.add_argument("--classes", type=int, default=None, help="object classes, at most 8 (default 3; 8 with --hard)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hard", action="store_true",
                   help="the harder set: 8 classes, 2-10 objects of 4-50%% of the image side, occlusion, "
                        "unannotated distractors, colour jitter and lighting (see the annotation files' info)")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("train", help="train and evaluate one architecture on a COCO-layout data set")
    p.add_argument("--data", required=True, help="data root with annotations/instances_{train,val}2017.json")
    _arch_args(p)
    p.add_argument("--task", choices=sorted(TASKS), default=None,
                   help="detection (Faster R-CNN), instance_segmentation (Mask R-CNN: trains on the annotations' "
                        "masks, reports segm_mAP... beside the box metrics) or semantic_segmentation (SemanticFPN: "
                        "trains on the label maps in annotations/semantic_<split>2017/, else on maps painted from the "
                        "instance masks; reports mIoU, pixel_acc, mAcc, per-class IoU); default: the description's "
                        "type")
    sched = p.add_mutually_exclusive_group()
    sched.add_argument("--epochs", type=int, default=3, help="epochs (default 3)")
    sched.add_argument("--iters", type=int, default=None, help="iterations instead of epochs")
    p.add_argument("--batch-size", type=int, default=4, help="images per process (default 4)")
    p.add_argument("--nproc", type=int, default=1,
                   help="data-parallel processes on this machine, one per GPU (default 1); launched through "
                        "torch.distributed.run (`torchrun --nproc-per-node N -m spnas train ...` works too)")
    p.add_argument("--lr", type=float, default=0.02,
                   help="learning rate per 16 images with --lr-scaling linear, else as it is (default 0.02)")
    p.add_argument("--lr-scaling", choices=["linear", "none"], default="linear",
                   help="linear: SGD runs at lr x global batch (batch size x processes) / 16 (torchvision's recipe; "
                        "default); none: at lr")
    p.add_argument("--schedule", choices=["step", "cosine"], default="step")
    p.add_argument("--warmup-iters", type=int, default=100)
    p.add_argument("--clip-grad-norm", type=float, default=None)
    for flag, what in (("amp", "mixed precision (bf16 where supported, else fp16 with a grad scaler)"),
                       ("channels-last", "the channels_last memory format"),
                       ("cudnn-benchmark", "cudnn.benchmark (kernel autotuning for fixed sizes)"),
                       ("pin-memory", "pinned host memory for the data loader")):
        p.add_argument(f"--no-{flag}", action="store_true", help=f"turn off {what} (on by default on CUDA)")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="also write the resumable checkpoint every N iterations (default 0: at each epoch's end)")
    p.add_argument("--min-size", type=int, default=None, help="detector resize: shorter side")
    p.add_argument("--max-size", type=int, default=None, help="detector resize: longer side cap")
    p.add_argument("--init", default=None, help="weights to start from (.pth: spnas, torchvision detector or resnet)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--workers", type=int, default=None,
                   help="data loader processes per training process (default: 0 on CPU, up to 4 on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--id", default="0", help="candidate id used in the output file names (default 0)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in --out")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="COCO box AP of saved weights")
    p.add_argument("--data", required=True)
    _arch_args(p)
    p.add_argument("--weights", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="also write the metrics to this JSON file")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("reignite", help="re-train a detector's backbone as a classifier (backbone + pool + linear "
                                        "head), then put it back into the detector")
    _arch_args(p)
    p.add_argument("--weights", required=True, help="detector weights (model_<id>.pth)")
    p.add_argument("--data", default=None, help="folder-per-class classification set (default: object crops of "
                                                "--from-detection)")
    p.add_argument("--from-detection", default=None, metavar="DATA_ROOT",
                   help="detection data root: object crops to train on when --data is not given, and the images "
                        "the BN statistics are recalibrated on (and the heads fine-tuned on)")
    p.add_argument("--img-prefix", default="2017", help="detection image folder/annotation suffix (default 2017)")
    p.add_argument("--ann-prefix", default="instances", help="detection annotation file prefix (default instances)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05, help="classification lr, also the head fine-tune's (default 0.05)")
    p.add_argument("--image-size", type=int, default=None,
                   help="classifier input side (default 224 for --data, 64 for object crops)")
    p.add_argument("--recalibrate-images", type=int, default=64,
                   help="detection images the BN statistics are recalibrated on; 0: off (default 64)")
    p.add_argument("--head-iters", type=int, default=0,
                   help="iterations of FPN + heads fine-tune with the backbone frozen (default 0)")
    p.add_argument("--nproc", type=int, default=1,
                   help="data-parallel processes on this machine, one per GPU (default 1); --batch-size is per process")
    p.add_argument("--detection-batch-size", type=int, default=4,
                   help="batch of the recalibration and head fine-tune (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--id", default="0")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_reignite)

    p = sub.add_parser("run", help="run every SP-NAS phase of a Vega-style config on this machine")
    p.add_argument("config", help="YAML config (see configs/demo.yml)")
    p.add_argument("--workdir", default=None, help="working directory = {local_base_path} (default runs/spnas)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set serial.search_algorithm.max_sample=8")
    p.add_argument("--workers", type=int, default=None, help="candidates trained at once (default: config)")
    p.add_argument("--nproc", type=int, default=1,
                   help="data-parallel processes (one per GPU) for each training of one model: fine_tune, full "
                        "train, reignition, controls (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--publish", default=None, metavar="URI",
                   help="upload the output folder to an s3:// or minio:// prefix at the end")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --workdir: finished phases and candidates are kept, "
                        "an interrupted training continues from its last checkpoint")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("export", help="export a trained detector: ONNX and TorchScript programs, a parity gate "
                                      "against PyTorch, labels.json and a model card")
    p.add_argument("--run", default=None, metavar="OUTPUT_DIR",
                   help="a spnas run's output folder: export its result model with its control and lineage")
    p.add_argument("--desc", default=None, help="model description JSON (desc_<id>.json)")
    p.add_argument("--weights", default=None, help="the weights (model_<id>.pth)")
    p.add_argument("--data", default=None, help="COCO-layout data root: its val split is the parity gate's set")
    p.add_argument("--control", default=None, help="a run's control.json (searched vs equal-budget control)")
    p.add_argument("--name", default="spnas", help="the model's name (default spnas)")
    p.add_argument("--max-images", type=int, default=None, help="gate on the first N val images (default all)")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_export, code="111-2111-211111-211", block=None, base_channels=None)

    from .storage import register
    register(sub)
    from ..serve.cli import register as register_serve
    register_serve(sub)
    from ..registry.cli import register as register_registry
    register_registry(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except SpnasError as exc:
        print(f"spnas {args.command}: error: {exc}", file=sys.stderr)
        return 2
