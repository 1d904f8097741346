"""``python -m src.train ARGS`` (or another entry module) as a real, separate process, minus the 6 s of imports.

Tests that are about processes (exit statuses, SIGTERM, SIGKILL mid-write, workers left behind) need a process
of their own per run, but importing torch, torchvision and Lightning costs ~6 s of CPU each time. A
multiprocessing forkserver imports the entry modules once; every run is then forked from it, before any
torch op ran (so no OpenMP pool is inherited), and runs the module as ``__main__`` exactly as ``python -m``
would: its own pid, argv, cwd, environment, stdout/stderr, signals and exit status.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ENTRY_MODULES = ["src.train", "src.eval", "src.predict", "src.export", "src.audit"]
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(ENTRY_MODULES)


def _main(module: str, args: list[str], cwd: str, env: dict[str, str], out: str, err: str) -> None:
    """The forked child: become ``python -m module args`` (``module`` "-c:<code>": ``python -c code args``)
    with stdout/stderr in files, then exit as it would."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        if fd == 2 and err == out:
            os.dup2(1, 2)  # one file, one offset: lines interleave as on a terminal
            continue
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = ["-c" if module.startswith("-c:") else module, *args]
    # the forkserver made this process the multiprocessing way; a `python -m` run on Linux forks its workers
    multiprocessing.set_start_method("fork", force=True)
    sys.modules.pop(module, None)  # as under `python -m`: the module runs as __main__ only
    code = 0
    try:
        if module.startswith("-c:"):
            main = types.ModuleType("__main__")  # what `python -c` runs the code in (pickling finds it there)
            sys.modules["__main__"] = main
            exec(compile(module[3:], "<string>", "exec"), main.__dict__)
        else:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if not isinstance(stop.code, int | None):
            print(stop.code, file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # what interpreter exit runs (logging flushes, writers closing)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class ForkedRun:
    """A started entry-module run with the parts of ``subprocess.Popen`` tests use."""

    def __init__(self, module: str, args: list[str], cwd: Path, env: dict[str, str], out: Path, err: Path) -> None:
        self.args = [sys.executable, *(["-c", module[3:]] if module.startswith("-c:") else ["-m", module]), *args]
        self.out, self.err = out, err
        self._process = _CONTEXT.Process(target=_main, args=(module, list(args), str(cwd), env, str(out), str(err)))
        # multiprocessing would re-run this process's main module (pytest's) in the child first: hide it
        main = sys.modules["__main__"]
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            self._process.start()
        finally:
            sys.modules["__main__"] = main
        self.pid = self._process.pid

    @property
    def returncode(self) -> int | None:
        """Exit status; -N when signal N ended it (as Popen reports)."""
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return self._process.exitcode

    def kill(self) -> None:
        self._process.kill()

    def output(self) -> tuple[str, str]:
        return (
            self.out.read_text(encoding="utf-8", errors="replace"),
            self.err.read_text(encoding="utf-8", errors="replace"),
        )


def start(module: str, *args: str, cwd: Path, env: dict[str, str] | None = None, log: Path | None = None) -> ForkedRun:
    """Start ``python -m module args`` (``module`` "-c:<code>": ``python -c code args``) in ``cwd``; stdout and
    stderr both go to ``log`` when given."""
    env = dict(os.environ if env is None else env)
    if log is None:
        folder = Path(tempfile.mkdtemp(prefix="forkrun-"))
        out, err = folder / "stdout", folder / "stderr"
    else:
        out = err = log
        log.write_text("")  # there from the start, as Popen's stdout file would be
    return ForkedRun(module, list(args), cwd, env, out, err)


def run(
    module: str, *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``subprocess.run([python, -m, module, *args], capture_output=True, text=True)``, forked."""
    proc = start(module, *args, cwd=cwd, env=env)
    started = time.monotonic()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)
        raise subprocess.TimeoutExpired(proc.args, time.monotonic() - started) from None
    stdout, stderr = proc.output()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def warm_up() -> None:
    """Start the forkserver (it imports ENTRY_MODULES in the background); the first run then starts at once."""
    from multiprocessing import forkserver

    forkserver.ensure_running()
