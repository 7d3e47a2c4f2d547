"""The parsed, frozen form of a run config: :class:`RunConfig` of :class:`StepConfig` steps."""
from __future__ import annotations

from dataclasses import dataclass

from ..data.source import CocoSource
from ..training.schedule import TrainConfig
from ..utils.errors import ConfigError


@dataclass(frozen=True)
class DatasetConfig:
    """Where the data of a step lives. ``kind`` is ``coco`` (detection) or ``imagenet``
    (folder-per-class classification, reignition)."""

    kind: str = "coco"
    data_root: str | None = None
    batch_size: int = 4
    img_prefix: str = "2017"
    ann_prefix: str = "instances"
    num_workers: int | None = None  # data-loader processes; None: 0 on CPU, a few per process on CUDA

    @property
    def source(self) -> CocoSource:
        """The detection data set this names (``data_root`` must be set)."""
        if not self.data_root:
            raise ConfigError("dataset.common.data_root is not set")
        return CocoSource(self.data_root, self.img_prefix, self.ann_prefix)


@dataclass(frozen=True)
class StepConfig:
    """One pipeline step, normalised."""

    name: str
    role: str
    dataset: DatasetConfig
    trainer: TrainConfig
    model_desc: dict
    pretrained_model_file: str | None = None
    models_folder: str | None = None
    convert_pretrained: bool = False
    freeze_swap_keys: bool = False
    search: dict | None = None          # SearchSettings keyword arguments
    codes: tuple = ()                      # search_space ranges (backbone codes or neck codes)
    top_k: int | None = None
    image_size: int | None = None          # reignition input size (None: 224 folder, 64 object crops)
    recalibrate_images: int = 64           # reignition: detection images for BN recalibration (0 = off)
    head_iters: int = 0                    # reignition: FPN + heads fine-tune iterations (0 = off)


@dataclass(frozen=True)
class RunConfig:
    """A whole run: working directory, seed, workers, device, whether equal-budget controls are
    trained (``control``) and the steps in order."""

    workdir: str
    seed: int
    workers: int
    device: str | None
    steps: tuple[StepConfig, ...]
    ignored: tuple[str, ...] = ()      # Vega keys (and keys of a role) not used, each logged once
    source: str = "<dict>"
    control: bool = True
    warnings: tuple[str, ...] = ()     # legal but surprising settings, each logged once as a warning

    def step(self, role: str) -> StepConfig | None:
        return next((s for s in self.steps if s.role == role), None)
