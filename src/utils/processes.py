"""Worker processes that never outlive the run that started them, and SIGTERM as an exception.

A worker blocked on its task queue does not notice its parent was killed (kill -9 gives it no chance to
clean up): it would wait forever, holding its memory. On Linux the kernel can send the child a signal the
moment its parent dies (PR_SET_PDEATHSIG); workers call ``die_with_parent`` first thing.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from types import FrameType

from lightning.pytorch.utilities.exceptions import SIGTERMException

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent exits (Linux; elsewhere nothing happens).

    The parent may have died between the fork and this call: then this process ends at once.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    # the running program's own symbols include libc's prctl (find_library would spawn ldconfig per worker)
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def start_worker() -> None:
    """First act of a worker process (a pool's or a DataLoader's): die with its parent, and take SIGTERM the
    default way. A forked worker inherits the parent's Python SIGTERM handler, which may only note the signal:
    then ``Pool.terminate`` (the end of every ``with Pool()``) could never end a worker blocked on the task
    queue whose lock the parent holds, and the parent waited in ``join`` forever (seen in the preflight)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent()


def descendants(pid: int) -> list[int]:
    """Every living process below ``pid`` (children, their children, ...), read from /proc (Linux; elsewhere
    none): a library's workers may start helpers of their own that its parent never learns of."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]  # after the command name (may hold spaces)
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if state not in ("Z", "X"):  # a zombie has ended: only its exit status waits to be collected
            parents.setdefault(int(ppid), []).append(int(entry))
    found, todo = [], list(parents.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo += parents.get(child, [])
    return found


def kill_descendants(keep: set[int] | frozenset[int] = frozenset()) -> None:
    """SIGKILL every process below this one but those in ``keep`` (what ran before), then reap this one's
    own children."""
    import multiprocessing

    for pid in set(descendants(os.getpid())) - set(keep):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass  # ended meanwhile
    for child in multiprocessing.active_children():
        child.join(5)


def _raise_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM outside training: stop where the program stands, through the usual exception path.

    Inside ``Trainer.fit`` Lightning installs its own handler, which saves a checkpoint at the next batch
    end and calls this one too: it then only notes the signal (Lightning stops the run itself).
    """
    if signal.getsignal(signal.SIGTERM) is not _raise_sigterm:
        return
    raise SIGTERMException(143)


def stop_on_sigterm() -> None:
    """Make SIGTERM raise SIGTERMException in the main thread (data preparation, evaluation, prediction)."""
    signal.signal(signal.SIGTERM, _raise_sigterm)
