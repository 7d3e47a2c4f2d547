"""Data-set fetch from the embedded object store (SeaweedFS ``weed mini``) through spnas.storage.

Writes the demo data set (240 train + 60 val images, COCO layout), starts a private object store
on free loopback ports in a temporary folder, uploads the set, then fetches it

* cold (empty cache): every object downloaded; reports MB/s,
* warm (same cache): the goal is 0 bytes downloaded (ETags unchanged),
* after one object changed: exactly that object is downloaded again,
* one large random object (``--big-mb``, like a weights file): cold MB/s,

and checks the fetched folder equals the original byte for byte. The server is always stopped.

    python bench/storage_fetch.py [--train 240] [--val 60] [--workers 4] [--big-mb 64]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from spnas import storage
from spnas.data.demo import write_demo_dataset
from spnas.devtools import objectstore


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=240)
    ap.add_argument("--val", type=int, default=60)
    ap.add_argument("--workers", type=int, default=4, help="parallel downloads per fetch (default 4)")
    ap.add_argument("--big-mb", type=int, default=64, help="size of the one large object (weights-like) in MB")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="spnas-bench-storage-") as tmp:
        tmp = Path(tmp)
        data = write_demo_dataset(tmp / "demo", train=args.train, val=args.val)
        files = tree(data)
        total = sum(len(b) for b in files.values())
        print(f"data set      {len(files)} files, {total / 1e6:.2f} MB ({args.train} train + {args.val} val images)")
        store_dir = tmp / "store"
        info = objectstore.start(store_dir, port=objectstore.free_port_block(), buckets=["bench"])
        try:
            print(f"object store  weed mini at {info['endpoint']} ready in {info['seconds']:.2f} s")
            os.environ.update(objectstore.env(store_dir))
            uri = "s3://bench/datasets/demo"
            t0 = time.perf_counter()
            uploaded = storage.upload(data, uri)
            up = time.perf_counter() - t0
            print(f"upload        {len(uploaded)} objects in {up:.2f} s ({total / 1e6 / up:.1f} MB/s)")

            cache = tmp / "cache"
            cold = storage.FetchStats()
            t0 = time.perf_counter()
            folder = storage.fetch(uri, cache, stats=cold, workers=args.workers)
            t_cold = time.perf_counter() - t0
            same = tree(folder) == files
            print(f"fetch cold    {cold.downloaded}/{cold.objects} objects, {cold.bytes_downloaded / 1e6:.2f} MB "
                  f"in {t_cold:.2f} s = {cold.bytes_downloaded / 1e6 / t_cold:.1f} MB/s "
                  f"({cold.downloaded / t_cold:.0f} objects/s); content identical: {same}")

            warm = storage.FetchStats()
            t0 = time.perf_counter()
            storage.fetch(uri, cache, stats=warm, workers=args.workers)
            t_warm = time.perf_counter() - t0
            ok_warm = warm.bytes_downloaded == 0
            print(f"fetch warm    {warm.downloaded}/{warm.objects} objects, {warm.bytes_downloaded} bytes downloaded "
                  f"in {t_warm:.3f} s (goal 0 bytes: {'met' if ok_warm else 'MISSED'})")

            changed = sorted(files)[len(files) // 2]
            (data / changed).write_bytes(files[changed] + b"\n")
            storage.upload(data / changed, f"{uri}/{changed}")
            again = storage.FetchStats()
            t0 = time.perf_counter()
            storage.fetch(uri, cache, stats=again, workers=args.workers)
            t_again = time.perf_counter() - t0
            ok_again = again.downloaded == 1 and (folder / changed).read_bytes() == files[changed] + b"\n"
            print(f"fetch changed {again.downloaded}/{again.objects} objects, {again.bytes_downloaded} bytes "
                  f"in {t_again:.3f} s (goal: only the changed object: {'met' if ok_again else 'MISSED'})")

            big = tmp / "model_big.pth"
            big.write_bytes(os.urandom(args.big_mb * 1_000_000))
            storage.upload(big, "s3://bench/weights/model_big.pth")
            one = storage.FetchStats()
            t0 = time.perf_counter()
            got = storage.fetch("s3://bench/weights/model_big.pth", cache, stats=one)
            t_big = time.perf_counter() - t0
            same_big = got.read_bytes() == big.read_bytes()
            print(f"fetch large   1 object, {one.bytes_downloaded / 1e6:.1f} MB in {t_big:.2f} s = "
                  f"{one.bytes_downloaded / 1e6 / t_big:.0f} MB/s cold; content identical: {same_big}")
        finally:
            res = objectstore.stop(store_dir)
            print(f"object store  stopped ({res['signal']}) in {res['seconds']:.1f} s")
    return 0 if (same and ok_warm and ok_again and same_big) else 1


if __name__ == "__main__":
    sys.exit(main())
