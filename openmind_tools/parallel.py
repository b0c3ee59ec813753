"""Map a function over many items on a dask cluster (or in this process), through a bounded window.

At most `window` tasks are in flight (dask's `as_completed`, refilled by one `client.map` once half
are done), so the driver holds a window of futures rather than one per item of a 114k-volume job, and a caller that
journals each result as it arrives loses at most the window to a kill -9. A task whose worker died
(out-of-memory kill, a crash in a native library) is retried alone at the end, so the tasks that merely
ran beside it still succeed, and one that kills its worker alone becomes `on_error(item, error)`.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from tqdm.auto import tqdm

from openmind_tools.errors import ConfigError, MachineError

HANDSHAKE_S = 10.0  # how long a --scheduler address may take to connect and greet


@contextmanager
def dask_client(workers: int, scheduler: str | None = None, memory_limit: str = "auto") -> Iterator[Any]:
    """A Client of the scheduler at `scheduler`, or of a local cluster of `workers` single-threaded processes.

    A scheduler address is probed first (`check_scheduler`): dask's own connect bounds the TCP connect but not the
    handshake, so a port that accepts and never answers hung, and a web server there (the dashboard port by
    mistake) had its reply read as a 3 EiB frame length.
    """
    from dask.distributed import Client, LocalCluster

    if scheduler:
        check_scheduler(scheduler)
        try:
            client = Client(scheduler, timeout=f"{HANDSHAKE_S}s")
        except (OSError, TimeoutError, ValueError) as e:
            raise ConfigError(f"--scheduler {scheduler}: cannot connect ({e})") from None
        with client:
            yield client
        return
    environ = dict(os.environ)  # dask's nannies set OMP_NUM_THREADS=1 etc. in this process for their workers
    try:
        with (
            LocalCluster(n_workers=workers, threads_per_worker=1, memory_limit=memory_limit, dashboard_address=None)
            as cluster,
            Client(cluster) as client,
        ):  # fmt: skip
            yield client
    finally:  # ...which would leave every later subprocess (a trainer started from the same Python) on one thread
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        os.environ.update(environ)


def check_scheduler(address: str, timeout: float | None = None) -> None:
    """Refuse (ConfigError) an address where no dask scheduler answers within `timeout` s: a dask server greets a
    new connection first, with an 8-byte frame length, then a small handshake message. tls:// and other protocols
    are left to dask."""
    timeout = HANDSHAKE_S if timeout is None else timeout
    protocol, _, rest = address.rpartition("://")
    if protocol not in ("", "tcp"):
        return
    host, _, port = rest.rpartition(":")
    try:
        port_number = int(port)
    except ValueError:
        raise ConfigError(f"--scheduler {address}: expected tcp://HOST:PORT") from None
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", port_number), timeout=timeout) as conn:
            greeting = b""
            while len(greeting) < 8:
                chunk = conn.recv(8 - len(greeting))
                if not chunk:
                    raise ConfigError(f"--scheduler {address}: the server closed the connection without the "
                                      "greeting a dask scheduler sends: is it one?")  # fmt: skip
                greeting += chunk
    except TimeoutError:
        raise ConfigError(f"--scheduler {address}: no dask scheduler answered within {timeout:g} s (the port "
                          "accepts connections but sends nothing: is it a dask scheduler?)") from None  # fmt: skip
    except OSError as e:
        raise ConfigError(f"--scheduler {address}: cannot connect ({e.strerror or e})") from None
    (length,) = struct.unpack("Q", greeting)
    if not 0 < length < 1 << 20:
        raise ConfigError(f"--scheduler {address}: the server there is not a dask scheduler (it sent "
                          f"{greeting!r} where dask sends a message length)")  # fmt: skip


def default_window(client: Any) -> int:
    """16 tasks per worker thread, the most a kill can lose.

    Measured on 2 workers: real heads convert as fast as with every task submitted at once; 2,000 tiny
    (16^3) volumes took 1.2-1.4x as long, where 4 per thread took 1.5x.
    """
    threads = sum(client.nthreads().values()) if client is not None else 1
    return 16 * max(threads, 1)


def run_tasks(
    fn: Callable,
    items: list,
    client: Any,
    *,
    progress: bool,
    what: str,
    unit: str = "vol",
    on_error: Callable | None = None,
    window: int | None = None,
    **kwargs: Any,
) -> Iterator[Any]:
    """Yield `fn(item, **kwargs)` for every item as the results complete (in this process if `client` is None)."""
    bar = tqdm(total=len(items), desc=what, unit=unit, disable=not progress)
    with bar:
        if client is None:
            for item in items:
                yield fn(item, **kwargs)
                bar.update()
            return
        from dask.distributed import KilledWorker, as_completed

        window = window or default_window(client)
        pending = iter(items)
        item_of: dict[str, Any] = {}

        def submit(count: int) -> list[Any]:  # one client.map per refill: one message, kwargs sent once
            chunk = list(itertools.islice(pending, count))
            futures = client.map(fn, chunk, pure=False, **kwargs) if chunk else []
            item_of.update((future.key, item) for future, item in zip(futures, chunk, strict=True))
            return futures

        running = as_completed(submit(window))
        died = []
        for future in running:
            item = item_of.pop(future.key)
            try:
                result, error = future.result(), None
            except Exception as e:
                result, error = None, e
            future.release()  # the driver keeps no result it has handed on
            if len(item_of) <= window // 2:  # refill before handing the result on: workers never wait for it
                for refill in submit(window - len(item_of)):
                    running.add(refill)
            if error is not None:
                if on_error is None:
                    raise error
                died.append(item)
                continue
            bar.update()
            yield result
        for item in died:
            try:
                result = client.submit(fn, item, pure=False, **kwargs).result()
            except KilledWorker as e:  # it killed its worker alone: the input's fault
                result = on_error(item, e)
            except Exception as e:  # the scheduler or a worker connection was lost: the machine's
                raise MachineError(f"the dask cluster failed while running {what} ({type(e).__name__}: {e}); "
                                   "check the workers and rerun the same command: it resumes") from e  # fmt: skip
            bar.update()
            yield result
