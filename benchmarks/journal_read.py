"""How long a resumed run takes to read an object store's journal back: one GET at a time against the batches
of concurrent GETs `Journal` sends, side by side in one run.

    .venv/bin/python benchmarks/journal_read.py [--objects 2000] [--latency-ms 0 20]

`--objects` journal objects of 64 volume entries each (114k volumes leave about 6k) are written to a moto S3
server on loopback, then read back both ways, alternating, three times each (median). moto answers in this
process with no network between, so each `--latency-ms` value also adds that many milliseconds to every request
inside the server (a real S3 GET waits a round trip of 10-30 ms): the sequential read pays it per object, the
concurrent one per batch.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Iterator

import s3fs
from moto.server import ThreadedMotoServer

from openmind_tools.journal import JOURNAL_BATCH, JOURNAL_OBJECTS, Journal
from openmind_tools.storage import Place


class OneAtATime(Journal):
    """The journal read without batching: each object fetched in turn, parsed the same way."""

    def _lines(self) -> Iterator[str]:
        for name in self.objects.find():
            yield from Place(self.out.fs, name).read_bytes().decode(errors="replace").splitlines()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--objects", type=int, default=2000, help="journal objects (default 2000)")
    p.add_argument("--latency-ms", type=float, nargs="*", default=[0.0, 20.0], help="added per request")
    args = p.parse_args(argv)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"endpoint_url": f"http://{host}:{port}", "key": "bench", "secret": "bench"}
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("stores")
    entry = {"volume": {"id": "", "status": "ok", "shape": [160, 192, 160], "checksum": "0" * 16}}
    for n in range(args.objects):
        body = "".join(json.dumps({"volume": {**entry["volume"], "id": f"v{n:06d}-{i:02d}"}}) + "\n"
                       for i in range(JOURNAL_BATCH))  # fmt: skip
        fs.pipe_file(f"stores/out/{JOURNAL_OBJECTS}/{n:08d}.jsonl", body.encode())
    out = Place.of("s3://stores/out", options)
    readers = {"sequential": OneAtATime(out), "batched": Journal(out)}
    print(f"{args.objects} journal objects of {JOURNAL_BATCH} entries, moto on loopback\n")
    print("| added latency per request | one at a time s | batched s | speed-up |\n|---:|---:|---:|---:|")
    from moto.s3.responses import S3Response  # every request for an object passes through key_response

    original = S3Response.key_response
    try:
        for latency in args.latency_ms:

            def slow(self: S3Response, *a: object, _latency: float = latency, **k: object) -> object:
                time.sleep(_latency / 1e3)
                return original(self, *a, **k)

            S3Response.key_response = slow
            times: dict[str, list[float]] = {"sequential": [], "batched": []}
            for _ in range(3):
                for name, journal in readers.items():
                    start = time.perf_counter()
                    lines = sum(1 for _ in journal.entries())
                    times[name].append(time.perf_counter() - start)
                    assert lines == args.objects * JOURNAL_BATCH, (name, lines)
            seq, bat = (statistics.median(times[k]) for k in ("sequential", "batched"))
            print(f"| {latency:g} ms | {seq:.2f} | {bat:.2f} | {seq / bat:.1f}x |", flush=True)
    finally:
        S3Response.key_response = original
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
