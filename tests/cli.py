"""`stuck-runs ARGS` run in this process, answering like the real process does.

A process per command cost the suite most of its time (an interpreter start and the imports, ~0.7 s
a call, thousands of calls). `run` calls the console script's own entry (`scheduler.cli:main`)
with what the process would have had and returns a `subprocess.CompletedProcess`:

- the environment is exactly `env` for the call (os.environ, bytes values included), the working
  directory `cwd` (where `.env` is read), stdin empty;
- stdout and stderr apart, at the Python level and at the file descriptors (whatever a child
  process or C code writes lands where it would); loguru starts as in a fresh process (its default
  sink on stderr) and is left as it was found;
- the exit code the process gives: `sys.exit`'s code, 1 and Python's "Traceback" on stderr for an
  exception that escapes (so `"Traceback" not in stderr` still fails when one does);
- what the process would have closed at exit is closed: every engine created during the call is
  disposed and its connections closed, so no session outlives the command.

Commands that run until a signal (daemon, serve, demo) stay real processes: a refusal at their
start-up is tested as the operator meets it, and a bug that lets one start cannot hang the suite.
Calls are serialized; a test calls `run` from its own thread.
"""

from __future__ import annotations

import faulthandler
import io
import os
import subprocess
import sys
import tempfile
import threading
import traceback
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from loguru import logger

REPO = Path(__file__).resolve().parent.parent
PROGRAM = "stuck-runs"
LONG_RUNNING = frozenset({"daemon", "serve", "demo"})
_one_at_a_time = threading.Lock()

Environment = Mapping[str, "str | bytes"]


def run(
    args: Sequence[str], *, env: Environment | None = None, cwd: str | Path | None = None, timeout: float | None = None
) -> subprocess.CompletedProcess[str]:
    """`stuck-runs *args` with environment `env` (None: this process's) in `cwd`."""
    args = [str(a) for a in args]
    if LONG_RUNNING.intersection(args[: args.index("--")] if "--" in args else args):
        return run_process(args, env=env, cwd=cwd, timeout=timeout)
    with _one_at_a_time, _watchdog(timeout), _environment(env), _directory(cwd), _closes_what_it_opened():
        with _captured() as (out, err):
            with _fresh_loguru(), _stdin_empty():
                code = _call_main(args)
    return subprocess.CompletedProcess([PROGRAM, *args], code, out.getvalue(), err.getvalue())


def run_process(
    args: Sequence[str], *, env: Environment | None = None, cwd: str | Path | None = None, timeout: float | None = None
) -> subprocess.CompletedProcess[str]:
    """The same command in a real process of the console script."""
    return subprocess.run(
        [str(Path(sys.executable).with_name(PROGRAM)), *args],
        env=None if env is None else {**env, "PYTHONPATH": str(REPO)},
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _call_main(args: list[str]) -> int:
    from scheduler.cli import main

    try:
        main(args)
    except SystemExit as exc:
        return _exit_code(exc.code)
    except BaseException:  # noqa: BLE001 - what the interpreter does with an exception that escapes
        traceback.print_exc()
        return 1
    return 0


def _exit_code(code: object) -> int:
    """What the interpreter makes of `sys.exit(code)`."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


@contextmanager
def _watchdog(timeout: float | None) -> Iterator[None]:
    """A command that hangs past `timeout` ends the worker with every thread's stack, as a
    subprocess's timeout would have ended the test; a hang never stalls the suite."""
    if timeout:
        faulthandler.dump_traceback_later(timeout, exit=True)
    try:
        yield
    finally:
        if timeout:
            faulthandler.cancel_dump_traceback_later()


@contextmanager
def _environment(env: Environment | None) -> Iterator[None]:
    saved = dict(os.environb)
    if env is not None:
        os.environb.clear()
        for name, value in env.items():
            os.environb[os.fsencode(name)] = value if isinstance(value, bytes) else os.fsencode(value)
    try:
        yield
    finally:
        os.environb.clear()
        os.environb.update(saved)


@contextmanager
def _directory(cwd: str | Path | None) -> Iterator[None]:
    saved = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(saved)


@contextmanager
def _captured() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    """stdout and stderr, each to its own file, at sys.* and at fds 1 and 2, read back as text
    (UTF-8; stderr with backslashreplace, as Python's own stderr on a pipe)."""
    out_text, err_text = io.StringIO(), io.StringIO()
    with tempfile.TemporaryFile() as out_file, tempfile.TemporaryFile() as err_file:
        saved_streams = sys.stdout, sys.stderr
        for stream in saved_streams:
            stream.flush()
        saved_fds = os.dup(1), os.dup(2)
        os.dup2(out_file.fileno(), 1)
        os.dup2(err_file.fileno(), 2)
        sys.stdout = io.TextIOWrapper(os.fdopen(os.dup(1), "wb"), encoding="utf-8", errors="strict", newline=None)
        sys.stderr = io.TextIOWrapper(
            os.fdopen(os.dup(2), "wb"), encoding="utf-8", errors="backslashreplace", line_buffering=True
        )
        try:
            yield out_text, err_text
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.close()  # flushes what the command left buffered, as exit does
                except (OSError, ValueError):
                    pass
            sys.stdout, sys.stderr = saved_streams
            os.dup2(saved_fds[0], 1)
            os.dup2(saved_fds[1], 2)
            for fd in saved_fds:
                os.close(fd)
            for file, text, errors in ((out_file, out_text, "strict"), (err_file, err_text, "backslashreplace")):
                file.seek(0)
                text.write(file.read().decode("utf-8", errors).replace("\r\n", "\n"))


@contextmanager
def _stdin_empty() -> Iterator[None]:
    """stdin at end of file, for the command and for any process it starts (fd 0)."""
    saved, saved_fd = sys.stdin, os.dup(0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdin = open(os.devnull)  # noqa: SIM115 - closed below
    try:
        yield
    finally:
        sys.stdin.close()
        sys.stdin = saved
        os.dup2(saved_fd, 0)
        os.close(saved_fd)


@contextmanager
def _fresh_loguru() -> Iterator[None]:
    """loguru as a new process has it (the default sink, on this call's stderr), then as it was."""
    core = logger._core
    with core.lock:
        saved, saved_level, saved_patcher = core.handlers, core.min_level, core.patcher
        core.handlers, core.min_level = {}, float("inf")
    logger.add(sys.stderr)
    try:
        yield
    finally:
        logger.remove()  # stops only this call's sinks: the saved ones are not in the table
        with core.lock:
            core.handlers, core.min_level, core.patcher = saved, saved_level, saved_patcher


@contextmanager
def _closes_what_it_opened() -> Iterator[None]:
    """Every engine created during the call is disposed afterwards and any connection it still
    has checked out is closed, as the process's exit would have."""
    engines: list[weakref.ref[sa.Engine]] = []
    connections: list[object] = []
    original = sa.engine.Engine.__init__

    def recorded(self: sa.Engine, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)
        engines.append(weakref.ref(self))
        sa.event.listen(self.pool, "connect", lambda dbapi, _record: connections.append(dbapi))

    sa.engine.Engine.__init__ = recorded  # type: ignore[method-assign]
    try:
        yield
    finally:
        sa.engine.Engine.__init__ = original  # type: ignore[method-assign]
        for ref in engines:
            engine = ref()
            if engine is not None:
                engine.dispose()
        for dbapi in connections:
            if not getattr(dbapi, "closed", True):
                dbapi.close()
