"""Run a module as `python -m` would, then report this process's peak RSS.

    python -m tests.benchmarks.peak_rss daemon.cli reconcile --check --json

The peak is VmHWM from /proc/self/status: the high-water mark of this
program's own memory since it started (a new image starts a new mark, so a
parent that forked this process with a large heap does not count, as it
would in the parent's view of the child's ru_maxrss). It is written to
stderr as one JSON line, {"peak_rss_kib": N}, and the module's exit code is
kept, whether the module returns or ends the process with os._exit.
"""
from __future__ import annotations

import os
import runpy
import sys

import orjson


def peak_rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def report() -> None:
    sys.stderr.write(orjson.dumps({"peak_rss_kib": peak_rss_kib()}).decode() + "\n")
    sys.stderr.flush()


def main() -> None:
    module, args = sys.argv[1], sys.argv[2:]
    sys.argv = [module, *args]
    # the outboxd CLI ends with os._exit (no interpreter teardown): report on that way out too
    real_exit = os._exit

    def exit_reporting(code: int) -> None:
        report()
        real_exit(code)

    os._exit = exit_reporting
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    finally:
        report()
    sys.exit(code)


if __name__ == "__main__":
    main()
