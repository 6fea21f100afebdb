"""Several processes of one command, started by factedit itself (``factedit audit --processes N``).

The parent checks the input first (the command's own checks, run before spawning), so that a
mistake is one line and exit 2, as in one process. It then starts N copies of the command
with the environment ``torchrun`` or ``accelerate launch`` would give them (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``; gloo on CPU). Process 0 shows its output
and progress; the others' error output is kept apart and shown only if one of them is the
first to fail. When one process fails the others are stopped (they would wait for it), and
the parent exits with the failed process's code.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import click


def command_args(ctx: click.Context, skip: tuple[str, ...] = ("processes",)) -> list[str]:
    """The command line of ``ctx``'s command as given, without the ``skip`` options: every
    option whose value is not its default."""
    args = [ctx.info_name]
    for p in ctx.command.params:
        if not isinstance(p, click.Option) or p.name in skip:
            continue
        value = ctx.params.get(p.name)
        if value is None or value == p.default or (p.multiple and not value):
            continue
        opt = max(p.opts, key=len)
        if p.is_flag:
            args += [opt] if value else []
        elif p.multiple:
            args += [x for v in value for x in (opt, str(v))]
        else:
            args += [opt, str(value)]
    return args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _last_error(path: Path) -> str | None:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.startswith("error: ")]
    return lines[-1] if lines else None


def run_processes(args: list[str], n: int, echo: Callable[[str], None]) -> int:
    """Run ``python -m factedit ARGS`` in ``n`` processes; their exit code (0 when all succeed,
    else the first failure's)."""
    env = {**os.environ, "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    with tempfile.TemporaryDirectory(prefix="factedit-processes-") as tmp:
        logs = [Path(tmp) / f"rank{r}.err" for r in range(n)]
        procs = []
        try:
            for r in range(n):
                err = None if r == 0 else open(logs[r], "w")  # noqa: SIM115 - closed with the process
                procs.append((subprocess.Popen([sys.executable, "-m", "factedit", *args], stderr=err,
                                               env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}), err))
            return _wait(procs, logs, echo)
        finally:
            for p, err in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
                if err is not None:
                    err.close()


def _wait(procs: list, logs: list[Path], echo: Callable[[str], None]) -> int:
    while True:
        codes = [p.poll() for p, _ in procs]
        failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            r = failed[0]
            if r != 0:  # the same mistake fails every process: give process 0 a moment to say it
                try:
                    procs[0][0].wait(timeout=3)
                except subprocess.TimeoutExpired:
                    pass
                if procs[0][0].returncode not in (None, 0):
                    r = 0
            for p, _ in procs:
                if p.poll() is None:
                    p.terminate()
            code = procs[r][0].returncode
            if r != 0:  # process 0 said nothing about it: say it once here
                procs[r][1].flush()
                echo(_last_error(logs[r]) or f"error: process {r} of {len(procs)} exited with code {code}; "
                                             "rerun with --processes 1 to see its output")
            return code
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.1)
