"""Where a detection data set lives (no torch: configs and light tasks name data sets freely)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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

    def load(self, split: str, train: bool, seed: int = 0, masks: bool = False,
             semantic: bool = False) -> CocoDetection:
        """``split`` (``train``/``val``) as a :class:`~spnas.data.coco.CocoDetection`
        (``masks``: with the instance masks in the targets; ``semantic``: with the label maps)."""
        from .coco import load_split
        return load_split(self.root, split, train, seed, self.img_prefix, self.ann_prefix, masks=masks,
                          semantic=semantic)

    def layout(self) -> list[tuple[str, bool]]:
        """The locations the COCO layout needs, as ``(path or URI, is_folder)``: per split
        (train, val) its annotation file and its image folder."""
        root = self.root.rstrip("/")
        out = []
        for split in ("train", "val"):
            out.append((f"{root}/annotations/{self.ann_prefix}_{split}{self.img_prefix}.json", False))
            out.append((f"{root}/{split}{self.img_prefix}/", True))
        return out

    def missing(self) -> list[str]:
        """What the layout lacks, one message per location (empty: complete). Reads no data:
        one existence check per file or folder (an object store answers from its index)."""
        from pathlib import Path

        from ..storage import exists, is_uri
        out = []
        for loc, folder in self.layout():
            if is_uri(loc):
                found = exists(loc)
            else:
                p = Path(loc)
                found = p.is_dir() and any(p.iterdir()) if folder else p.is_file()
            if not found:
                out.append(f"{'image folder' if folder else 'annotation file'} {loc} is missing"
                           + (" or empty" if folder else ""))
        return out

    def local(self) -> CocoSource:
        """The same source with a URI root replaced by its local (cached) copy."""
        from ..storage import is_uri, local_path
        return CocoSource(str(local_path(self.root)), self.img_prefix, self.ann_prefix) if is_uri(self.root) else self

    def manifest(self) -> dict[str, Any]:
        """The data set's version: every file under ``root`` as ``[relative key, fingerprint,
        bytes]`` (sorted), and ``version``, the SHA-256 of that list (first 16 hex digits).
        In an object store the fingerprint is the object's ETag (one listing, no download); in a
        local folder it is the SHA-256 of annotation files (``.json``) and ``size`` for the rest
        (images are not read). Two data sets with the same version have the same files."""
        import hashlib
        from pathlib import Path

        from ..storage import Store, is_uri, parse_uri
        from ..storage.client import walk_files
        root = self.root.rstrip("/")
        files: list[list[Any]] = []
        if is_uri(root):
            bucket, key = parse_uri(root + "/")
            with Store.from_env() as st:
                files = [[o.key[len(key):], o.etag, o.size] for o in st.list(bucket, key, root + "/")]
        else:
            base = Path(root)
            for p in walk_files(base):
                size = p.stat().st_size
                mark = hashlib.sha256(p.read_bytes()).hexdigest() if p.suffix == ".json" else "size"
                files.append([p.relative_to(base).as_posix(), mark, size])
        files.sort()
        digest = hashlib.sha256("\n".join(f"{k}\t{m}\t{n}" for k, m, n in files).encode()).hexdigest()[:16]
        return {"root": self.root, "version": digest, "objects": len(files),
                "bytes": sum(int(n) for _, _, n in files), "files": files}
