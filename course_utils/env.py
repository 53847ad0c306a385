"""Where the course runs: device, dtype, profile, seeds and a report of the machine.

Lesson 00, and every lesson after it.

Every lesson picks its device and dtype here, so the same notebook runs on a laptop CPU (fp32:
bf16 matmuls are ~27x slower there) and on a Colab GPU (bf16, or fp16 on a T4 that lacks bf16).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import platform
import random
import sys
import sysconfig
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")

#: libgomp's spin-wait, in turns, for every process of the course's virtual environment. Its
#: default (~300,000 turns after each parallel region) starves the waited-for thread on 2 cores
#: shared with a browser: 24 greedy answers took 333 s without this setting, 43 s with it.
OPENMP_SPIN = {"GOMP_SPINCOUNT": "10000"}
#: The file, in the environment's site-packages, that sets OPENMP_SPIN when Python starts.
OPENMP_PTH = "course_openmp.pth"
PROFILES = ("full", "ci")
PROFILE_VARIABLE = "COURSE_PROFILE"
REPORTED_PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "datasets",
    "accelerate",
    "bitsandbytes",
    "unsloth",
    "course-utils",
)


class _NoHubKernelAdvice(logging.Filter):
    """Drop bitsandbytes' advice to `pip install kernels` (a hub download) on AVX512-BF16 CPUs."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep every record but the one about the optional kernels-community CPU kernel."""
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


# bitsandbytes 0.50 logs that warning whenever peft imports it on a CPU with AVX512-BF16: its
# optional bf16 inference kernel comes from the Hugging Face hub, which the course never needs
# (4-bit layers compute in fp32 here) and an offline laptop cannot reach. A learner would see a
# warning in every lab telling them to install something that cannot help, so it is dropped.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoHubKernelAdvice())


def pick_device(prefer: str | None = None) -> torch.device:
    """Return the best device here: cuda, then mps, then cpu (or `prefer` if it is available)."""
    if prefer is not None:
        if not isinstance(prefer, str | torch.device):
            raise TypeError(f"prefer must be a device name like 'cpu' or 'cuda' (got {prefer!r}).")
        device = torch.device(prefer)
        if not device_available(device):
            raise ValueError(
                f"Device {device.type!r} is not available on this machine; "
                f"call pick_device() with no argument to get {pick_device().type!r}."
            )
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def device_available(device: torch.device | str) -> bool:
    """Say whether `device` (cpu, cuda, mps) can be used on this machine."""
    kind = torch.device(device).type
    if kind == "cpu":
        return True
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return (
            getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
        )
    return False


def default_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """Return the training dtype for `device`: fp32 on CPU/MPS, bf16 on CUDA (fp16 if no bf16)."""
    kind = torch.device(device).type if device is not None else pick_device().type
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if kind in ("cpu", "mps"):
        return torch.float32
    raise ValueError(f"Unknown device type {kind!r}; use 'cpu', 'cuda' or 'mps'.")


def in_colab() -> bool:
    """Say whether this code runs inside Google Colab."""
    return "google.colab" in sys.modules


def seed_everything(seed: int = 0) -> int:
    """Seed Python, NumPy and torch (CPU and GPU) so a lesson gives the same numbers twice."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer (got {seed!r}); try seed=0.")
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover - numpy comes with torch here
        pass
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    return seed


def profile() -> str:
    """Return the course profile from COURSE_PROFILE: 'full' (default, for learners) or 'ci'."""
    value = os.environ.get(PROFILE_VARIABLE, "full").strip().lower() or "full"
    if value not in PROFILES:
        raise ValueError(
            f"{PROFILE_VARIABLE}={value!r} is not a known profile; set it to one of {PROFILES} "
            f"or unset it."
        )
    return value


def by_profile(*, full: T, ci: T) -> T:
    """Return `full` for learners and `ci` under COURSE_PROFILE=ci (same code, smaller sizes)."""
    return ci if profile() == "ci" else full


def package_versions(names: tuple[str, ...] = REPORTED_PACKAGES) -> dict[str, str]:
    """Return the installed version of each package (without importing it), or 'not installed'."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def memory_gb() -> float | None:
    """Return this machine's total RAM in GB, or None where it cannot be read."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return None


def environment_report() -> dict[str, object]:
    """Return what this lesson runs on: Python, OS, CPU, RAM, device, dtype, GPU and versions."""
    device = pick_device()
    ram = memory_gb()
    report: dict[str, object] = {
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "cpu cores": os.cpu_count(),
        "torch threads": torch.get_num_threads(),
        "RAM (GB)": round(ram, 1) if ram is not None else "unknown",
        "device": device.type,
        "dtype": str(default_dtype(device)).replace("torch.", ""),
        "colab": in_colab(),
        "profile": profile(),
        "OpenMP spin": os.environ.get("GOMP_SPINCOUNT", "libgomp default (slow on 2 busy cores)"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        report["gpu"] = props.name
        report["gpu memory (GB)"] = round(props.total_memory / 1e9, 1)
    report.update(package_versions())
    return report


def openmp_spin_line() -> str:
    """The one line of a ``.pth`` file that sets OPENMP_SPIN (unless set already) at start-up."""
    settings = ", ".join(f"({k!r}, {v!r})" for k, v in OPENMP_SPIN.items())
    return f"import os; [os.environ.setdefault(k, v) for k, v in ({settings},)]\n"


def install_openmp_setting(site_packages: str | os.PathLike | None = None) -> Path:
    """Write OPENMP_PTH into the environment's site-packages; return its path.

    Python runs a ``.pth`` line that starts with ``import`` at every start-up, before any code of
    ours, so every way of opening the course in this environment (``make course``, a plain
    ``jupyter lab``, VS Code, a script) gets the setting before torch loads libgomp; a value the
    learner set keeps winning.
    """
    folder = Path(site_packages if site_packages is not None else sysconfig.get_paths()["purelib"])
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; pass the environment's site-packages.")
    target = folder / OPENMP_PTH
    target.write_text(openmp_spin_line())
    return target


def openmp_spin_missing() -> list[str]:
    """Return the OPENMP_SPIN variables this process lacks (empty when the setting reached it)."""
    return [name for name in OPENMP_SPIN if name not in os.environ]


def print_report() -> dict[str, object]:
    """Print the environment report as an aligned two-column table and return it."""
    report = environment_report()
    width = max(len(key) for key in report)
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")
    return report


def main(argv: list[str] | None = None) -> int:
    """``python -m course_utils.env --install-openmp-setting``: the setting for every start-up."""
    parser = argparse.ArgumentParser(prog="python -m course_utils.env", description=main.__doc__)
    parser.add_argument("--install-openmp-setting", action="store_true", required=True)
    parser.parse_args(argv)
    print(
        f"[course_utils] {' '.join(f'{k}={v}' for k, v in OPENMP_SPIN.items())} for every "
        f"Python of this environment: {install_openmp_setting()}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
