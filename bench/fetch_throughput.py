"""Object fetch throughput from a local S3 server: objects/s and MB/s, cold and from the cache.

What it measures: `fd2_core.data.object_fetch.fetch_objects` (the worker's fetch of a job's
admitted objects) against moto's S3 server on this machine, for many small images and for a few
large objects, first with an empty cache (every object downloaded, ETag-checked and written
atomically) and then again with the cache warm (hard links only). The server is local, so the
figures bound the client side (threads, cache writes), not a network.

    .venv/bin/python bench/fetch_throughput.py                 # 2 000 × 8 KB and 4 × 25 MB
    .venv/bin/python bench/fetch_throughput.py --small 200 --large 1 --large-mb 5   # quick
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests" / "support"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from s3_server import s3_server  # noqa: E402

from fd2_core.data.object_fetch import ObjectCache, fetch_objects  # noqa: E402
from fd2_core.data.object_store import ObjectStore  # noqa: E402
from fd2_core.data.object_uris import parse_object_uri  # noqa: E402


def measure(store: ObjectStore, bucket: str, prefix: str, cache: ObjectCache, out: Path, workers: int):
    objects = store.list(parse_object_uri(f"s3://{bucket}/{prefix}/"), limit=10**6)
    relative = [o.key.removeprefix(f"{prefix}/") for o in objects]
    start = time.perf_counter()
    progress = fetch_objects(store, bucket, objects, cache, out, relative, workers=workers)
    seconds = time.perf_counter() - start
    return progress, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=2000, help="small objects")
    parser.add_argument("--small-kb", type=int, default=8)
    parser.add_argument("--large", type=int, default=4, help="large objects")
    parser.add_argument("--large-mb", type=int, default=25)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder, s3_server(Path(folder) / "logs") as server:
        for name, value in server.env().items():
            os.environ[name] = value
        client = server.client()
        client.create_bucket(Bucket="bench")
        for i in range(args.small):
            client.put_object(Bucket="bench", Key=f"small/c{i % 20}/{i}.jpg", Body=os.urandom(args.small_kb * 1024))
        for i in range(args.large):
            client.put_object(Bucket="bench", Key=f"large/c{i % 2}/{i}.bin", Body=os.urandom(args.large_mb * 1024**2))
        store = ObjectStore()
        print("| objects | workers | cache | seconds | objects/s | MB/s |")
        print("|---|---|---|---|---|---|")
        for prefix, label in (("small", f"{args.small} × {args.small_kb} KB"),
                              ("large", f"{args.large} × {args.large_mb} MB")):
            cache = ObjectCache(Path(folder) / f"cache-{prefix}", max_bytes=10**11)
            for run, state in ((1, "cold"), (2, "cached")):
                progress, seconds = measure(store, "bench", prefix, cache, Path(folder) / f"out-{prefix}-{run}",
                                            args.workers)
                print(f"| {label} | {args.workers} | {state} | {seconds:.2f} | {progress.done / seconds:,.0f} | "
                      f"{progress.bytes_done / 1e6 / seconds:,.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
