"""What recording a call in the Prometheus histogram costs, per call.

``python -m benchmarks.metrics_cost [--calls 200000]``

Every servicer call goes through ``observe_call`` (server/errors.py). Timed
in a loop against a baseline in the same process: a function of the same
shape that records nothing. Once in this process (one server process:
values in memory), once in a child with ``PROMETHEUS_MULTIPROC_DIR`` set
(``--workers N``: values in memory-mapped files the parent sums). One line::

    metrics: <A> us a call in one process, <B> us with worker files (baseline <C> us)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import timeit
from collections.abc import Sequence


def _time(calls: int) -> tuple[float, float]:
    """(us a call recorded, us a call of the baseline), best of three."""
    from onecard.server.metrics import observe_call

    async def call() -> None:  # the closure a servicer hands to guarded()
        return None

    def nothing(_call: object, _code: str, _seconds: float) -> None:
        return None

    rec = min(timeit.repeat(lambda: observe_call(call, "OK", 0.004), number=calls, repeat=3))
    base = min(timeit.repeat(lambda: nothing(call, "OK", 0.004), number=calls, repeat=3))
    return rec / calls * 1e6, base / calls * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.metrics_cost", description=__doc__)
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_time(args.calls)))
        return 0
    one, base = _time(args.calls)
    with tempfile.TemporaryDirectory(prefix="onecard-metrics-") as d:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.metrics_cost",
                "--child",
                "--calls",
                str(args.calls),
            ],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": d},
        )
    files, _ = json.loads(out.stdout)
    print(
        f"metrics: {one:.2f} us a call in one process, {files:.2f} us with worker files "
        f"(baseline {base:.2f} us)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
