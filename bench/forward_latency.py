"""Forward latency of spnas.build_detector versus torchvision's fasterrcnn_resnet50_fpn
(``--mask``: the MaskRCNN type versus maskrcnn_resnet50_fpn).

Both models carry the same (random) weights, converted with spnas.convert_torchvision, and run
on the same images in eval mode; runs alternate between the two so that machine noise hits
both alike. Prints the median latency of each and the ratio spnas / torchvision (goal 1.00 +-
0.03 for the ResNet-50 code: the SerialBackbone adds no overhead).

    python bench/forward_latency.py [--repeats 7] [--height 480 --width 640] [--device cpu|cuda] [--mask]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torchvision.models.detection import fasterrcnn_resnet50_fpn, maskrcnn_resnet50_fpn

from spnas import build_detector, convert_torchvision


def timed(model: torch.nn.Module, images: list[torch.Tensor], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.inference_mode():
        model(images)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--mask", action="store_true", help="Mask R-CNN (MaskRCNN type vs maskrcnn_resnet50_fpn)")
    args = ap.parse_args()

    torch.manual_seed(0)
    tv = (maskrcnn_resnet50_fpn if args.mask else fasterrcnn_resnet50_fpn)(weights=None, weights_backbone=None).eval()
    ours = build_detector({"type": "MaskRCNN"} if args.mask else {})
    ours.load_state_dict(convert_torchvision(tv.state_dict()), strict=True)
    ours.eval()
    tv, ours = tv.to(args.device), ours.to(args.device)
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, args.height, args.width, generator=g).to(args.device) for _ in range(args.batch)]

    for model in (tv, ours):  # warm-up
        timed(model, images, args.device)
    t_tv, t_ours = [], []
    for i in range(args.repeats):
        pair = [(tv, t_tv), (ours, t_ours)] if i % 2 == 0 else [(ours, t_ours), (tv, t_tv)]
        for model, acc in pair:
            acc.append(timed(model, images, args.device))
    m_tv, m_ours = statistics.median(t_tv), statistics.median(t_ours)
    print(f"device {args.device}, threads {torch.get_num_threads()}, {args.batch} image(s) "
          f"{args.height}x{args.width}, {args.repeats} alternating repeats")
    name = "maskrcnn_resnet50_fpn " if args.mask else "fasterrcnn_resnet50_fpn"
    print(f"torchvision {name}  median {m_tv * 1000:8.1f} ms  (min {min(t_tv) * 1000:.1f})")
    print(f"spnas build_detector (ResNet-50)     median {m_ours * 1000:8.1f} ms  (min {min(t_ours) * 1000:.1f})")
    print(f"ratio spnas / torchvision            {m_ours / m_tv:.3f}")


if __name__ == "__main__":
    main()
