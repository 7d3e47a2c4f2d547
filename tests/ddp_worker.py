"""One rank of the data-parallel tests (tests/test_distributed.py), run by torchrun's engine:

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/ddp_worker.py MODE DATA OUT

Modes:
* ``train``: ``train_architecture`` on DATA with every rank given its own output folder
  ``OUT/rank<r>`` (so a file any rank but 0 writes would show), then each rank saves its final
  parameters and buffers to ``OUT/state_rank<r>.pt`` (the test's own file).
* ``grad``: one data-parallel step of :class:`MeanModel` (BatchNorm statistics frozen); each
  rank saves its gradients and the image indices it trained on to ``OUT/grad_rank<r>.pt``.
* ``eval``: sharded prediction and COCO metrics of a seeded detector on DATA's val split
  (rank 0 saves them to ``OUT/eval.pt``); then a ``norm: syncbn`` training on CPU, which must
  be refused (rank 0 saves the message to ``OUT/syncbn.txt``).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

TINY_DESC = {"backbone": {"code": "1-1-1-1", "block": "basic", "base_channels": 8}, "min_size": 64, "max_size": 64}


class MeanModel(nn.Module):
    """A model whose loss is the mean over images of a per-image loss (conv -> BN -> pool ->
    linear, regressing the number of boxes): its data-parallel gradient must equal the
    single-process gradient of the concatenated batch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 1)

    def forward(self, images, targets):
        x = torch.stack(images).to(self.conv.weight.dtype)
        y = self.bn(self.conv(x)).relu().mean(dim=(2, 3))
        pred = self.head(y).squeeze(1)
        want = torch.tensor([float(len(t["boxes"])) for t in targets], dtype=pred.dtype)
        return {"loss": ((pred - want) ** 2).mean()}


def mean_model(seed: int = 0) -> MeanModel:
    """In float64: the sums over a whole batch and over two halves then averaged then agree to
    far below the test's 1e-5 (in float32 their rounding alone reaches ~1e-4 on 16k pixels)."""
    torch.manual_seed(seed)
    m = MeanModel().double()
    with torch.no_grad():  # estimated-looking statistics, frozen in training (norm_eval)
        m.bn.running_mean.uniform_(-0.1, 0.1)
        m.bn.running_var.uniform_(0.5, 1.5)
    return m


def main() -> None:
    mode, data, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    rank = int(os.environ["RANK"])
    from spnas.data.source import CocoSource
    from spnas.training.schedule import TrainConfig
    if mode == "train":
        from spnas.training import architecture
        engine_train = architecture.train

        def train_and_keep(model, *args, **kwargs):  # the test's instrument: every rank's final state
            result = engine_train(model, *args, **kwargs)
            torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out / f"state_rank{rank}.pt")
            return result

        architecture.train = train_and_keep
        cfg = TrainConfig(iters=int(sys.argv[4]), batch_size=2, warmup_iters=1, checkpoint_every=1)
        architecture.train_architecture(TINY_DESC, CocoSource(data), out / f"rank{rank}", cfg)
    elif mode == "grad":
        from spnas.training import distributed
        from spnas.training.engine import setup, train_one_epoch
        with distributed.process_group(torch.device("cpu")) as ctx:
            ds = CocoSource(data).load("train", train=True, seed=0)
            cfg = TrainConfig(iters=1, batch_size=2, warmup_iters=0, lr=1e-3, norm_eval=True, world_size=ctx.world_size)
            st = setup(mean_model(), ds, cfg, torch.device("cpu"), ctx=ctx)
            assert st.freeze_bn
            from spnas.data.coco import make_loader
            idx = list(make_loader(ds, 2, True, seed=0, epoch=0, rank=ctx.rank, world_size=ctx.world_size).sampler)[:2]
            train_one_epoch(st, ds, cfg, torch.device("cpu"), lambda loss, end: None)
            grads = {n: p.grad.clone() for n, p in st.model.named_parameters()}
            torch.save({"grads": grads, "indices": idx}, out / f"grad_rank{rank}.pt")
    elif mode == "eval":
        from spnas.models.detector import build_detector
        from spnas.training import distributed
        from spnas.training.architecture import train_architecture
        from spnas.training.evaluation import coco_metrics, predict
        from spnas.utils.errors import ConfigError
        ds = CocoSource(data).load("val", train=False)
        torch.manual_seed(0)
        model = build_detector({**TINY_DESC, "num_classes": ds.num_classes})
        model.load_state_dict(torch.load(sys.argv[4], weights_only=True))
        with distributed.process_group(torch.device("cpu")):  # one group per process (as a launch has)
            preds = predict(model, ds, "cpu", batch_size=3)
            metrics = coco_metrics(ds.coco, preds)
            sem_set = CocoSource(data).load("val", train=False, semantic=True)  # a semantic model: its confusion matrix
            torch.manual_seed(5)
            sem = build_detector({**TINY_DESC, "type": "SemanticFPN", "num_classes": sem_set.num_classes,
                                  "head_channels": 8})
            from spnas.training.evaluation import confusion_matrix
            conf = confusion_matrix(sem, sem_set, "cpu", batch_size=3)
            if rank == 0:
                torch.save({"preds": preds, "metrics": metrics, "confusion": conf}, out / "eval.pt")
            try:
                desc = {**TINY_DESC, "backbone": {**TINY_DESC["backbone"], "norm": "syncbn"}}
                train_architecture(desc, CocoSource(data), out / f"syncbn{rank}", TrainConfig(iters=1, batch_size=2))
                msg = "not refused"
            except ConfigError as exc:
                msg = str(exc)
            if rank == 0:
                (out / "syncbn.txt").write_text(msg)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
