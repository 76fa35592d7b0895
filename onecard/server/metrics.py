"""Prometheus metrics: how long each call spends in the ledger, and what each flush holds.

Why these: a load generator's latency includes its own queues, the network
and both gRPC stacks. On the 2-core development machine the p99 a client
saw was several times the servicers' own (benchmarks.throughput prints
both), and that split can only be made from inside the server. The call
histogram starts when the servicer gets the parsed request and stops when it
returns the reply (after COMMIT); the flush histograms say how well group
commit is batching; the event loop's lag says whether the process itself
was the wait (a call, or a flush's next step, ready but not yet run).

With ``--workers N`` every worker records into files in a directory the
parent owns (prometheus_client's multiprocess mode, chosen by
``PROMETHEUS_MULTIPROC_DIR`` in the workers' environment), and the parent
serves the sum. No label carries a card number, a key or personal data.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from types import CodeType
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

from onecard.ledger.crypto.encoding import FieldError
from onecard.server.config import parse_host_port
from onecard.server.listen import is_worker

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Call durations, seconds: fine around the 25 ms a gate can wait.
_CALL_BUCKETS = (
    0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
    0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0,
)  # fmt: skip
_ITEM_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)

RPC_SECONDS = Histogram(
    "onecard_rpc_duration_seconds",
    "Time from a call reaching its servicer to its reply (after COMMIT)",
    ["method", "code"],
    buckets=_CALL_BUCKETS,
)
FLUSH_ITEMS = Histogram(
    "onecard_flush_items",
    "Requests or records in one group-commit transaction",
    ["committer"],
    buckets=_ITEM_BUCKETS,
)
FLUSH_SECONDS = Histogram(
    "onecard_flush_duration_seconds",
    "One group-commit transaction, MAC checks to COMMIT",
    ["committer"],
    buckets=_CALL_BUCKETS,
)

#: How often the event loop's lag is sampled. A timer every 10 ms costs next
#: to nothing and catches any stall long enough to matter to a gate.
LAG_INTERVAL = 0.01
LOOP_LAG_SECONDS = Histogram(
    "onecard_event_loop_lag_seconds",
    "How late a timer set every 10 ms ran: how long ready work waited for the event loop",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0),
)

QUEUED_ITEMS = Gauge(
    "onecard_queued_items",
    "Requests or records waiting for a group-commit transaction, sampled every 10 ms",
    ["committer"],
    multiprocess_mode="livesum",
)

UPLOAD_STREAMS_OPEN = Gauge(
    "onecard_upload_streams_open",
    "Upload streams open, each holding one of --max-upload-streams' places in its process",
    multiprocess_mode="livesum",
)

_METHODS: dict[CodeType, str] = {}


def method_of(call: Callable[..., Any]) -> str:
    """``TerminalServicer.Debit`` for the closure a servicer method hands to ``guarded``."""
    code = call.__code__
    name = _METHODS.get(code)
    if name is None:
        name = _METHODS[code] = call.__qualname__.split(".<locals>", 1)[0]
    return name


def observe_call(call: Callable[..., Any], code: str, seconds: float) -> None:
    RPC_SECONDS.labels(method_of(call), code).observe(seconds)


def observe_flush(committer: str, items: int, seconds: float) -> None:
    FLUSH_ITEMS.labels(committer).observe(items)
    FLUSH_SECONDS.labels(committer).observe(seconds)


async def sample_process(
    queued: Callable[[], dict[str, int]], interval: float = LAG_INTERVAL
) -> None:
    """Until cancelled, every ``interval``: the event loop's lag and the queues' depths.

    The depths (``queued()``: committer name -> items waiting) tell an
    operator who sees RESOURCE_EXHAUSTED which queue it came from; sampling
    them on this tick keeps the cost off every request.

    A timer runs only once the loop has finished what was ready before it,
    so its lateness is how long a call's next step could wait in this
    process. The p99 a client sees can then be split into the servicers'
    own time, this wait, and what lies outside the process (gRPC's threads,
    the network, the client). uvloop rounds timers to the millisecond, so
    lags under 1 ms are not told apart.
    """
    while True:
        began = time.perf_counter()
        await asyncio.sleep(interval)
        LOOP_LAG_SECONDS.observe(max(0.0, time.perf_counter() - began - interval))
        for committer, items in queued().items():
            QUEUED_ITEMS.labels(committer).set(items)


class MetricsServer:
    """The HTTP endpoint Prometheus scrapes (``/metrics``), on its own thread."""

    def __init__(self, listen: str, multiproc_dir: Path | None = None) -> None:
        host, port = parse_host_port("--metrics-listen", listen)
        registry = None
        if multiproc_dir is not None:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=str(multiproc_dir))  # type: ignore[no-untyped-call]
        kw: dict[str, Any] = {"registry": registry} if registry is not None else {}
        try:
            self._httpd, self._thread = start_http_server(port, addr=host, **kw)
        except OSError as exc:
            # Said as the operator's setting, not as a database or network outage.
            raise FieldError(
                "--metrics-listen", f"cannot listen on {listen}: {exc.strerror}"
            ) from exc
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self._httpd.server_port}/metrics"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def workers_dir(data_dir: Path) -> Path:
    """A fresh directory for the workers' metric files (an old run's would be summed in)."""
    path = data_dir / f"metrics-{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def recording_for_parent() -> bool:
    """True in a worker whose parent serves the metrics: it must not bind an endpoint."""
    return bool(os.environ.get(MULTIPROC_ENV)) and is_worker()


__all__ = [
    "MULTIPROC_ENV",
    "MetricsServer",
    "observe_call",
    "observe_flush",
    "recording_for_parent",
    "sample_process",
    "workers_dir",
]
