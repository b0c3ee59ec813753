"""What converting from and to object storage costs per volume, against local disk, side by side in one run.

    .venv/bin/python benchmarks/s3_overhead.py [--rounds 2] [--workers 2] [--dir /tmp/openmind_s3]

The demo corpus is converted (both stores) on one dask LocalCluster of `--workers` processes, alternately
local folder -> local folder and s3:// -> s3:// through a moto server on loopback (the corpus uploaded there
first), `--rounds` times each, into fresh outputs. Prints seconds per volume (median over rounds, cluster start
excluded) and the ratio. moto answers in this process on the same cores, so the ratio counts the requests'
CPU (signing, HTTP, moto's own work) and no network latency: a real S3 adds round trips, which the workers'
parallelism hides as long as there are enough of them.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import s3fs
from dask.distributed import Client, LocalCluster
from moto.server import ThreadedMotoServer

from openmind_tools.convert import convert
from openmind_tools.demo import write_demo_corpus


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2, help="conversions per side (default 2)")
    p.add_argument("--workers", type=int, default=2, help="dask worker processes (default 2)")
    p.add_argument("--dir", type=Path, default=Path("/tmp/openmind_s3"), help="scratch folder (deleted)")
    args = p.parse_args(argv)
    shutil.rmtree(args.dir, ignore_errors=True)
    corpus = write_demo_corpus(args.dir / "corpus")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"endpoint_url": f"http://{host}:{port}", "key": "bench", "secret": "bench"}
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("corpus")
    fs.mkdir("stores")
    fs.put(str(corpus), "corpus/openmind", recursive=True)
    seconds: dict[str, list[float]] = {"local disk": [], "S3 (moto)": []}
    volumes = 0
    try:
        with (
            LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=None) as cluster,
            Client(cluster) as client,
        ):  # fmt: skip
            for round_ in range(args.rounds):
                for side in seconds:
                    if side == "local disk":
                        root, out, extra = corpus, args.dir / f"out{round_}", {}
                    else:
                        root, out, extra = (
                            "s3://corpus/openmind",
                            f"s3://stores/out{round_}",
                            {"storage_options": options},
                        )
                    start = time.perf_counter()
                    summary = convert(root, out, client=client, progress=False, **extra)
                    seconds[side].append(time.perf_counter() - start)
                    volumes = summary.converted
    finally:
        server.stop()
        shutil.rmtree(args.dir, ignore_errors=True)
    per_volume = {side: statistics.median(s) / volumes for side, s in seconds.items()}
    print(f"{volumes} volumes, {args.workers} workers, {args.rounds} rounds (median)\n")
    print("| from -> to | s per volume | ratio |\n|---|---:|---:|")
    for side, value in per_volume.items():
        print(f"| {side} | {value:.3f} | {value / per_volume['local disk']:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
