"""Where a detection data set lives (no torch: configs and light tasks name data sets freely)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .coco import CocoDetection


@dataclass(frozen=True)
class CocoSource:
    """A detection data set in the standard COCO layout: where it lives and how its files are
    named (Vega's ``img_prefix``/``ann_prefix``). ``root`` is a local path or an
    ``s3://``/``minio://`` URI (fetched once into the cache)."""

    root: str
    img_prefix: str = "2017"
    ann_prefix: str = "instances"

    def load(self, split: str, train: bool, seed: int = 0) -> CocoDetection:
        """``split`` (``train``/``val``) as a :class:`~spnas.data.coco.CocoDetection`."""
        from .coco import load_split
        return load_split(self.root, split, train, seed, self.img_prefix, self.ann_prefix)

    def local(self) -> CocoSource:
        """The same source with a URI root replaced by its local (cached) copy."""
        from ..storage import is_uri, local_path
        return CocoSource(str(local_path(self.root)), self.img_prefix, self.ann_prefix) if is_uri(self.root) else self
