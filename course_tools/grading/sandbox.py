"""What keeps one student's code from the others: an audit hook in the kernel, limits, a snapshot.

Inside the kernel a Python audit hook refuses writes and deletions outside the kernel's own
working folder, starting processes, signalling others, ``os._exit``, and reading the solutions,
the gradebook or other learners' notebooks; the worker runs with resource limits, in its own
process group; the instructor's folders are compared with a snapshot after each student and
restored if they changed. Not a security boundary against a determined attacker (C code, through
ctypes, bypasses an audit hook): on Linux the OS sandbox (``isolation``, bubblewrap) is the
boundary, and this guard is the fallback where bubblewrap is missing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from .config import MAX_FILE_BYTES, SANDBOX_HIDDEN, SANDBOX_LOG, SANDBOX_WRITABLE

_SPAWN_EVENTS = frozenset(
    {
        "subprocess.Popen",
        "os.system",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "os.fork",
        "os.forkpty",
        "os.startfile",
        "pty.spawn",
    }
)


#: event -> [(index of a path argument, index of its dir_fd argument or None)]
_PATH_EVENTS = {
    "os.remove": [(0, 1)],
    "os.rmdir": [(0, 1)],
    "os.mkdir": [(0, 2)],
    "os.rename": [(0, 2), (1, 3)],
    "os.link": [(0, 2), (1, 3)],
    "os.symlink": [(1, 2)],
    "os.chmod": [(0, 2)],
    "os.chown": [(0, 3)],
    "os.utime": [(0, 3)],
    "os.truncate": [(0, None)],
    "os.chflags": [(0, None)],
    "os.lchflags": [(0, None)],
    "os.lchmod": [(0, None)],
    "os.setxattr": [(0, None)],
    "os.removexattr": [(0, None)],
    "os.mkfifo": [(0, None)],
    "os.mknod": [(0, None)],
    "shutil.rmtree": [(0, 1)],
    "shutil.move": [(0, None), (1, None)],
    "shutil.copyfile": [(1, None)],
    "shutil.copytree": [(1, None)],
    "shutil.chown": [(0, None)],
    "sqlite3.connect": [(0, None)],
}


#: events that remove or move their path: a writable folder itself may not be their target
_REMOVE_EVENTS = frozenset({"os.remove", "os.rmdir", "os.rename", "shutil.rmtree", "shutil.move"})


_READ_EVENTS = frozenset({"os.listdir", "os.scandir", "glob.glob", "os.walk"})


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def _fd_path(fd: int) -> str | None:
    """The path an open file descriptor refers to, where the OS tells (Linux, macOS)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        pass
    try:
        import fcntl

        if hasattr(fcntl, "F_GETPATH"):
            raw = fcntl.fcntl(fd, fcntl.F_GETPATH, bytes(1024))
            return raw.split(b"\0", 1)[0].decode()
    except (OSError, ValueError):
        pass
    return None


def install_sandbox(
    writable: Sequence[str | os.PathLike] | None = None,
    hidden: Sequence[str | os.PathLike] | None = None,
) -> tuple[list[str], list[str]]:
    """Refuse, for the rest of this process, writes outside ``writable`` and reads of ``hidden``.

    Reading stays allowed inside ``writable`` even when a hidden folder contains it.

    Also refuses starting processes, signalling other processes and ``os._exit`` (a dead
    kernel would lose the whole notebook's grades). By default ``writable`` is
    the current folder plus the folders in $COURSE_GRADING_WRITABLE, and ``hidden`` the paths in
    $COURSE_GRADING_HIDDEN. The grader calls this at the start of every grading kernel. Deleting
    or renaming a writable folder itself (not just what is inside it) is refused too. Python
    cannot take an audit hook back, so this lasts until the process ends.
    """
    for value, name in ((writable, "writable"), (hidden, "hidden")):
        if isinstance(value, str | bytes | os.PathLike) or not (
            value is None or isinstance(value, Sequence)
        ):
            raise TypeError(f"{name} must be a list of folders, got {value!r}; e.g. [os.getcwd()].")
    if writable is None:
        writable = [os.getcwd(), *_from_env(SANDBOX_WRITABLE)]
    if hidden is None:
        hidden = _from_env(SANDBOX_HIDDEN)
    guard = _AuditGuard(writable, hidden, os.environ.get(SANDBOX_LOG, ""))
    sys.addaudithook(guard.hook)
    _refuse_os_exit(guard)
    return list(guard.roots), list(guard.secret)


def _from_env(name: str) -> list[str]:
    """The folders an environment variable lists (os.pathsep-separated)."""
    return [p for p in os.environ.get(name, "").split(os.pathsep) if p]


def _within(path: str, folders: tuple[str, ...], strictly: bool) -> bool:
    """Whether `path` lies inside one of `folders` (or is one of them, unless `strictly`)."""
    for folder in folders:
        if path == folder:
            if not strictly:
                return True
        elif path.startswith(folder.rstrip(os.sep) + os.sep):
            return True
    return False


def _resolve(path: object, dir_fd: object = None, follow: bool = True) -> str | None:
    """The real absolute path an audit event's path argument names (None if it names none)."""
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    elif isinstance(path, os.PathLike):
        path = os.fspath(path)
        path = os.fsdecode(path) if isinstance(path, bytes) else path
    if isinstance(path, int):
        return _fd_path(path)
    if not isinstance(path, str):
        return None
    if path == ":memory:" or path.startswith("file::memory:"):
        return ":memory:"
    if not os.path.isabs(path):
        no_fd = dir_fd is None or (isinstance(dir_fd, int) and dir_fd < 0)  # -1: none given
        base = os.getcwd() if no_fd else _fd_path(dir_fd)
        if base is None:
            return None
        path = os.path.join(base, path)
    if follow:
        return os.path.realpath(path)
    head, tail = os.path.split(os.path.abspath(path))
    return os.path.join(os.path.realpath(head), tail)


class _AuditGuard:
    """The audit hook's state and its decisions: what may be written, read, started, signalled."""

    ALLOWED_DEVICES = ("/dev/null", "/dev/zero", "/dev/tty", "/dev/stdout", "/dev/stderr")

    def __init__(self, writable, hidden, log_path: str) -> None:
        self.roots = tuple(os.path.realpath(os.fspath(p)) for p in writable)
        self.secret = tuple(os.path.realpath(os.fspath(p)) for p in hidden)
        self.log_path = log_path
        self.busy = threading.local()
        self.own_pid = os.getpid()

    def hidden_path(self, path: str | None) -> bool:
        """Inside a hidden folder and not inside a writable one (those stay readable)."""
        return bool(
            path
            and self.secret
            and _within(path, self.secret, strictly=False)
            and not _within(path, self.roots, strictly=False)
        )

    def refuse(self, what: str) -> None:
        """Note `what` in the grader's log, then raise PermissionError saying it was blocked."""
        if self.log_path:  # tell the grader even if the notebook catches the error
            try:
                with open(self.log_path, "a", encoding="utf-8") as log:
                    log.write(what.replace("\n", " ")[:300] + "\n")
            except OSError:
                pass
        raise PermissionError(f"the grader blocked {what}: graded notebooks may not do that.")

    def check_write(self, path: str | None, what: str, strictly: bool = False) -> None:
        """Refuse a write outside the writable folders (a few devices excepted)."""
        if path == ":memory:" or (path in self.ALLOWED_DEVICES):
            return
        if path is None or not _within(path, self.roots, strictly=strictly):
            self.refuse(f"{what} {path!r} (outside this notebook's folder)")

    def hook(self, event: str, args: tuple) -> None:
        """The audit hook: each event to its check (never re-entered by the checks' own calls)."""
        if getattr(self.busy, "active", False):
            return
        self.busy.active = True
        try:
            if event in _SPAWN_EVENTS:
                self.refuse(f"starting a process ({event})")
            elif event in ("os.kill", "os.killpg", "signal.pthread_kill"):
                self.on_signal(event, args)
            elif event == "open":
                self.on_open(args)
            elif event in _PATH_EVENTS:
                self.on_path_event(event, args)
            elif event in _READ_EVENTS and args:
                target = _resolve(args[0])
                if self.hidden_path(target):
                    self.refuse(f"listing {target!r}")
        finally:
            self.busy.active = False

    def on_signal(self, event: str, args: tuple) -> None:
        """Only "are you alive?" and "interrupt yourself" to this very process pass."""
        harmless = (0, signal.SIGINT)
        own = event == "signal.pthread_kill" or (event == "os.kill" and args[0] == self.own_pid)
        if not (own and len(args) > 1 and args[1] in harmless):
            self.refuse(f"sending a signal ({event}{tuple(args)})")

    def on_open(self, args: tuple) -> None:
        """Refuse opening a hidden file, or any file outside the writable folders for writing."""
        path, mode, flags = (tuple(args) + (None, None, 0))[:3]
        if isinstance(path, int):
            return
        writing = bool(mode and any(c in str(mode) for c in "wax+")) or bool(
            (flags or 0) & _WRITE_FLAGS
        )
        target = _resolve(path)
        if self.hidden_path(target):
            self.refuse(f"reading {target!r}")
        if writing:
            if mode is None and isinstance(path, str | bytes) and not os.path.isabs(path):
                self.refuse(f"os.open of the relative path {path!r} for writing")
            self.check_write(target, "writing")

    def on_path_event(self, event: str, args: tuple) -> None:
        """Check every path argument of an event that changes files (rename, remove, ...)."""
        follow = event in ("sqlite3.connect", "os.truncate", "shutil.copyfile")
        for index, fd_index in _PATH_EVENTS[event]:
            if index >= len(args):
                continue
            dir_fd = args[fd_index] if fd_index is not None and fd_index < len(args) else None
            target = _resolve(args[index], dir_fd, follow=follow)
            self.check_write(target, event, strictly=event in _REMOVE_EVENTS)


def _refuse_os_exit(guard: _AuditGuard) -> None:
    """Replace os._exit (no audit event to catch: a killed kernel would lose every grade)."""
    real_exit = os._exit

    def refuse_exit(*args: object, **kwargs: object) -> None:
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("ipykernel."):  # its parent poller ends an orphaned kernel
            real_exit(*args, **kwargs)
        guard.refuse("ending the process with os._exit")

    os._exit = refuse_exit
    try:
        import posix

        posix._exit = refuse_exit
    except ImportError:  # pragma: no cover - Windows
        pass


def limit_resources() -> None:
    """In the child before exec: cap the size of any file it writes; no core dumps."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_BYTES, MAX_FILE_BYTES))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ImportError, ValueError, OSError):  # pragma: no cover - Windows, odd limits
        pass


def kill_group(process: subprocess.Popen, root: Path) -> None:
    """Kill a worker, its process group, and the kernel it started (in a session of its own)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, AttributeError):
        process.kill()
    marker = str(root)  # the kernel's command line names its connection file under root
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with the Jupyter stack
        return
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid != os.getpid() and marker in " ".join(proc.info["cmdline"] or []):
                proc.kill()
        except (psutil.Error, OSError):
            continue


def take_snapshot(folders: Iterable[Path]) -> dict[Path, bytes | None]:
    """Every file (bytes) and folder (None) under ``folders``."""
    state: dict[Path, bytes | None] = {}
    for folder in folders:
        if not folder.exists():
            continue
        state[folder] = None
        for path in folder.rglob("*"):
            if path.is_symlink() or path.is_file():
                state[path] = path.read_bytes() if path.is_file() else b""
            elif path.is_dir():
                state[path] = None
    return state


def snapshot_digest(state: dict[Path, bytes | None]) -> str:
    """A hash of a snapshot, cheap to compare."""
    h = hashlib.sha256()
    for path in sorted(state):
        h.update(str(path).encode())
        h.update(b"D" if state[path] is None else hashlib.sha256(state[path]).digest())
    return h.hexdigest()


def restore(state: dict[Path, bytes | None], folders: Iterable[Path]) -> list[str]:
    """Put the snapshot back; return what had changed."""
    changed = []
    current = take_snapshot(folders)
    for path in sorted(set(current) - set(state), key=lambda p: len(p.parts), reverse=True):
        changed.append(f"{path} was added")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    for path in sorted(state, key=lambda p: len(p.parts)):
        content = state[path]
        if content is None:
            if not path.is_dir():
                changed.append(f"{path} was removed")
                path.mkdir(parents=True, exist_ok=True)
        elif current.get(path) != content:
            changed.append(f"{path} was {'changed' if path in current else 'removed'}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
    return changed
