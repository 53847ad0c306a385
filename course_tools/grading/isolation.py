"""Each student's kernel in an OS-level sandbox: bubblewrap, resource limits, no network.

On Linux with Debian's ``bubblewrap`` (``bwrap``; ``make grading-sandbox`` installs it), the
kernel that runs a submission starts inside ``bwrap`` (the kernelspec the grader writes for the
job wraps ipykernel's command line):

* the file system it sees is the system (``/usr``, ``/etc``), Python and the virtual environment,
  the course package and the model caches, all **read-only**, plus two writable folders of its
  own: its scratch folder (home, temporary files, the kernel's connection files) and the folder
  of its graded notebook. The solutions, the gradebook, other students' folders and the
  instructor's home are not there at all;
* no network (its own network namespace: not even 127.0.0.1), its own PID namespace (it cannot
  see or signal other processes), its own IPC and host name; it dies with the grader;
* resource limits (``prlimit``): memory (address space), CPU seconds, processes, file size, no
  core dumps. Run as root, the kernel drops to an unprivileged user of its own after the
  sandbox is built (``setpriv``): Linux never applies the process limit to root, and counts it
  per user (a fork bomb must not starve another student's kernel).

The kernel talks to the grader through Unix sockets in its scratch folder (ZeroMQ's ``ipc``
transport): TCP cannot cross the network namespace. Results leave the sandbox only as the
notebook the grader reads back from that kernel. Where bubblewrap is missing (macOS, a host
without user namespaces) grading runs with the in-process guard alone (``sandbox``) and says
once that it does not isolate students from each other.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from jupyter_client.manager import AsyncKernelManager
from traitlets import default

import course_utils
from course_utils.checks import positive_int

from .config import SANDBOX_SETTINGS

#: A root grader's kernel runs as user FIRST_UID + the grading worker's PID: a user of its own,
#: since Linux applies the process limit per user, and never to root.
FIRST_UID = 1_000_000


@dataclass(frozen=True)
class Limits:
    """Resource limits of one kernel."""

    memory_bytes: int = 12 * 1024**3  # address space: a kernel that trains reserves ~7 GB of it
    cpu_seconds: int = 1800
    processes: int = 256  # threads count: torch and ipykernel start a few dozen
    file_bytes: int = 512 * 1024**2

    def __post_init__(self) -> None:
        """Every limit is a positive whole number."""
        for name in ("memory_bytes", "cpu_seconds", "processes", "file_bytes"):
            positive_int(getattr(self, name), name, f"Limits({name}=...)")


DEFAULT_LIMITS = Limits()


@functools.cache
def available() -> bool:
    """True when bubblewrap, prlimit (and setpriv, for root) exist and can build a sandbox here."""
    if sys.platform != "linux" or not all(shutil.which(t) for t in ("bwrap", "prlimit")):
        return False
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        return False
    probe = ["bwrap", *_system_binds(), "--unshare-net", "--unshare-pid", "--", "true"]
    try:
        return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _system_binds() -> list[str]:
    """Read-only /usr and /etc, the merged-/usr links (/bin -> usr/bin), /proc, /dev, /tmp."""
    args = ["--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc"]
    for name in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(name):
            args += ["--symlink", os.readlink(name), name]
        elif os.path.isdir(name):
            args += ["--ro-bind", name, name]
    args += ["--ro-bind-try", "/sys", "/sys", "--proc", "/proc", "--dev", "/dev"]
    return args + ["--perms", "1777", "--tmpfs", "/tmp"]


def bwrap_command(readable: list[Path], writable: list[Path]) -> list[str]:
    """The bwrap command line: the system and `readable` read-only, `writable` read-write."""
    args = ["bwrap", "--die-with-parent", "--new-session", *_system_binds()]
    args += ["--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts"]
    for parent in _parents([*readable, *writable]):  # bwrap would make them 0700: unreadable
        args += ["--perms", "0755", "--dir", str(parent)]
    for path in readable:
        if Path(path).exists():
            args += ["--ro-bind", str(path), str(path)]
    for path in writable:
        args += ["--bind", str(path), str(path)]
    return args + ["--"]


def _parents(paths: list[Path]) -> list[Path]:
    """Every folder above `paths` (outside /usr, /etc and /tmp's new tmpfs), outermost first."""
    found = {}
    for path in paths:
        for parent in reversed(Path(path).parents):
            if parent != Path("/") and parent.parts[1] not in ("usr", "etc"):
                found[parent] = None
    return sorted(found, key=lambda p: len(p.parts))


def limits_command(limits: Limits) -> list[str]:
    """The prlimit command line that applies `limits` to what it starts."""
    return [
        "prlimit",
        f"--as={limits.memory_bytes}",
        f"--cpu={limits.cpu_seconds}",
        f"--nproc={limits.processes}",
        f"--fsize={limits.file_bytes}",
        "--core=0",
        "--",
    ]


def readable_paths(extra: list[Path]) -> list[Path]:
    """What a kernel reads: Python, the venv, the course code (an editable install's too), `extra`."""
    package = Path(course_utils.__file__).resolve().parent
    paths = [Path(sys.base_prefix), Path(sys.prefix), package, package.parent / "course_tools"]
    return [p for p in dict.fromkeys(p.resolve() for p in [*paths, *extra]) if p.exists()]


def kernel_uid() -> int | None:
    """The user this worker's kernel runs as (None: the grader's own, when it is not root)."""
    return FIRST_UID + os.getpid() if os.geteuid() == 0 else None


def sandboxed(
    kernel_cmd: list[str], readable: list[Path], writable: list[Path], limits: Limits
) -> list[str]:
    """`kernel_cmd` (ipykernel's command line) run inside the sandbox, with the limits."""
    drop, uid = [], kernel_uid()
    if uid is not None:
        drop = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
    return [*limits_command(limits), *bwrap_command(readable, writable), *drop, *kernel_cmd]


def hand_over(folders: list[Path]) -> None:
    """Give the kernel's writable folders to its own user when the grader runs as root."""
    uid = kernel_uid()
    if uid is None:
        return
    for folder in folders:
        for path in [folder, *folder.rglob("*")]:
            os.chown(path, uid, uid, follow_symlinks=False)


def settings_for(scratch: Path, sockets: Path, readable: list[Path], limits: Limits) -> str:
    """The JSON the grader passes to its kernel manager (in the SANDBOX_SETTINGS variable).

    `sockets` is a folder with a short path: a Unix socket's path may not exceed 107 bytes.
    """
    folders = {"scratch": str(scratch), "sockets": str(sockets)}
    return json.dumps({**folders, "readable": [str(p) for p in readable], "limits": asdict(limits)})


class SandboxedKernelManager(AsyncKernelManager):
    """A kernel manager that starts the kernel inside the sandbox that SANDBOX_SETTINGS describes.

    Its writable folders: the scratch folder and the folder the kernel starts in (the graded
    notebook's). ZeroMQ's ipc transport: the sockets are files in the scratch folder.
    """

    @default("transport")
    def _transport_default(self) -> str:
        return "ipc"

    @default("ip")
    def _ip_default(self) -> str:
        return str(Path(json.loads(os.environ[SANDBOX_SETTINGS])["sockets"]) / "kernel")

    @default("connection_file")
    def _connection_file_default(self) -> str:
        runtime = Path(json.loads(os.environ[SANDBOX_SETTINGS])["scratch"]) / "runtime"
        return str(runtime / f"kernel-{uuid.uuid4()}.json")

    async def _async_interrupt_kernel(self) -> None:
        """Interrupt by a message: a signal would reach bwrap outside, not the kernel inside."""
        if not self.has_kernel:
            raise RuntimeError("Cannot interrupt kernel. No kernel is running!")
        message = self.session.msg("interrupt_request", content={})
        self._connect_control_socket()
        self.session.send(self._control_socket, message)

    interrupt_kernel = _async_interrupt_kernel  # the async manager's methods are coroutines

    async def _async_launch_kernel(self, kernel_cmd: list[str], **kw) -> None:
        """Wrap ipykernel's command line in the sandbox, then launch it."""
        settings = json.loads(os.environ[SANDBOX_SETTINGS])
        scratch, cwd = Path(settings["scratch"]), Path(kw.get("cwd") or os.getcwd())
        writable = [scratch, Path(settings["sockets"]), cwd]
        hand_over(writable)
        if kernel_uid() is not None:  # the connection file holds the key: the kernel reads it
            os.chown(self.connection_file, kernel_uid(), kernel_uid())
        readable = [Path(p) for p in settings["readable"]]
        # its parent's PID means nothing in its own PID namespace (bwrap --die-with-parent instead)
        kernel_cmd = [*kernel_cmd, "--IPKernelApp.parent_handle=0"]
        command = sandboxed(kernel_cmd, readable, writable, Limits(**settings["limits"]))
        await super()._async_launch_kernel(command, **kw)
