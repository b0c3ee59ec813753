"""Two-rank torchrun launches for the tests: a free loopback port each time (a fixed one collides with another
run on the machine) and one thread per rank (two ranks share CI's two cores)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def two_ranks(*target: str, timeout: float) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc_per_node=2 ... *target` (a script and its arguments, or `-m MODULE
    ...`) on gloo's loopback rendezvous; its output captured as text."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={port}", *target]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
