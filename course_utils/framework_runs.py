"""Axolotl and LLaMA-Factory run for real, each in its own virtual environment (lesson 11).

Neither framework fits in the course environment (their pins clash with ours), so `make axolotl`
and `make llamafactory` (or one `make frameworks`) build ``.venv-axolotl/`` and
``.venv-llamafactory/`` beside ``.venv/``. `run_framework()` writes the framework's YAML (from
`course_utils.framework_configs`, the one description both YAMLs come from), runs its CLI there
as a subprocess, prints each loss line as it comes and measures the run: wall time, seconds per
step (the Trainer's own ``train_runtime``), the peak resident memory of the whole process tree
(sampled from /proc every 0.2 s; without /proc, getrusage's largest single child) and the
adapter's size. `load_adapter()` loads the adapter it wrote with plain PEFT in the course
environment. When the environments are missing, the lesson shows the last measured table
(`load_measurements()`, ``data/frameworks_measured.json``).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
import resource
import signal
import subprocess
import threading
import time
from pathlib import Path

from peft import PeftModel

from course_utils import framework_configs

FRAMEWORKS = ("axolotl", "llamafactory")
ROOT = Path(__file__).resolve().parent.parent
MEASURED = Path(__file__).resolve().parent / "data" / "frameworks_measured.json"
STAMP = ".course-installed"  # written by the Makefile once an environment is complete
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
LOSS = re.compile(r"""['"]loss['"]:\s*['"]?([-+0-9.eE]+|nan)""")
RUNTIME = re.compile(r"""['"]train_runtime['"]:\s*['"]?([0-9.eE+]+)""")
PROGRESS = re.compile(r"""['"](loss|train_runtime)['"]:""")


def _check(framework: str) -> None:
    """Raise for a framework the course does not run."""
    if framework not in FRAMEWORKS:
        raise ValueError(f"Unknown framework {framework!r}: choose one of {', '.join(FRAMEWORKS)}.")


def venv_dir(framework: str, root: Path = ROOT) -> Path:
    """The folder of a framework's virtual environment (it may not exist)."""
    _check(framework)
    return Path(root) / f".venv-{framework}"


def env_python(framework: str, root: Path = ROOT) -> Path | None:
    """The Python of a framework's finished environment, or None when `make` has not built it."""
    folder = venv_dir(framework, root)
    python = folder / "bin" / "python"
    return python if python.exists() and (folder / STAMP).exists() else None


def make_command(framework: str) -> str:
    """The one command that builds a framework's environment."""
    _check(framework)
    return f"make {framework}"


def missing_message(framework: str) -> str:
    """The one sentence that says how to get a missing environment."""
    return (
        f"The {framework} environment is missing: run `{make_command(framework)}` in the course "
        "folder once (several minutes, a few GB)."
    )


def version(framework: str, root: Path = ROOT) -> str | None:
    """The installed version of a framework in its environment, or None when it is missing."""
    folder = venv_dir(framework, root)
    paths = [str(p) for p in folder.glob("lib/python3*/site-packages")]
    found = list(importlib.metadata.distributions(name=framework, path=paths))  # the pip name
    return found[0].version if found else None


def write_inputs(framework: str, spec: framework_configs.RunSpec, workdir: Path) -> Path:
    """Write the framework's YAML (and LLaMA-Factory's dataset_info.json) into workdir."""
    workdir = Path(workdir).resolve()  # the framework runs inside it: relative paths would break
    workdir.mkdir(parents=True, exist_ok=True)
    if framework == "axolotl":
        config = framework_configs.axolotl_config(spec)
    else:
        info = framework_configs.llamafactory_dataset_info(spec)
        (workdir / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n")
        config = framework_configs.llamafactory_config(spec, str(workdir))
    path = workdir / f"{framework}.yaml"
    path.write_text(framework_configs.to_yaml(config))
    return path


def cli(framework: str, config: str, root: Path = ROOT) -> list[str]:
    """The framework's training command for one YAML file (run in the YAML's folder)."""
    bin_dir = venv_dir(framework, root) / "bin"
    if framework == "axolotl":
        return [str(bin_dir / "axolotl"), "train", config, "--launcher", "python"]
    return [str(bin_dir / "llamafactory-cli"), "train", config]


def shown(command: list[str], root: Path = ROOT) -> str:
    """The command as the lesson shows it: the venv's program relative to the course folder."""
    return " ".join([os.path.relpath(command[0], root), *command[1:]])


def run_env(framework: str, threads: int | None = None, root: Path = ROOT) -> dict[str, str]:
    """The subprocess's environment: its venv first on PATH, offline, no telemetry, N threads."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    bin_dir = venv_dir(framework, root) / "bin"
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        VIRTUAL_ENV=str(bin_dir.parent),
        OMP_NUM_THREADS=str(threads or os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1),
        GOMP_SPINCOUNT=os.environ.get("GOMP_SPINCOUNT", "10000"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        DO_NOT_TRACK="1",
        AXOLOTL_DO_NOT_TRACK="1",
        WANDB_MODE="disabled",
        DISABLE_VERSION_CHECK="1",
        CUDA_VISIBLE_DEVICES="",
        PYTHONUNBUFFERED="1",
    )
    return env


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants, from /proc (0 once it is gone)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry.name))
            rss[int(entry.name)] = int(fields[21]) * resource.getpagesize()
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        total += rss.get(current, 0)
        todo.extend(children.get(current, []))
    return total


def children_max_rss() -> int:
    """Largest RSS of any one finished child process (getrusage), where /proc is missing (macOS)."""
    kib_or_bytes = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return kib_or_bytes if platform.system() == "Darwin" else kib_or_bytes * 1024


def _watch_rss(pid: int, peak: list[int], done: threading.Event, every: float = 0.2) -> None:
    """Keep the largest process-tree RSS seen in peak[0] until done is set."""
    if not Path("/proc").is_dir():
        return
    while not done.is_set():
        peak[0] = max(peak[0], tree_rss(pid))
        done.wait(every)


def find_adapter(output_dir: Path) -> Path | None:
    """The folder holding the adapter's weights and config: output_dir, else its newest checkpoint."""
    output_dir = Path(output_dir)
    candidates = [output_dir, *output_dir.glob("checkpoint-*")]
    found = [c for c in candidates if all((c / name).exists() for name in ADAPTER_FILES)]
    return max(found, key=lambda c: (c == output_dir, c.stat().st_mtime)) if found else None


def parse_log(lines: list[str]) -> dict:
    """Losses and the Trainer's train_runtime from the lines a run printed."""
    losses = [float(m.group(1)) for line in lines for m in [LOSS.search(line)] if m]
    runtimes = [float(m.group(1)) for line in lines for m in [RUNTIME.search(line)] if m]
    return {"losses": losses, "train_runtime": runtimes[-1] if runtimes else None}


def _stream(process: subprocess.Popen, log: Path, echo: bool) -> list[str]:
    """Copy the process's output into log, printing each loss line as it comes."""
    lines = []
    with open(log, "w") as handle:
        for raw in process.stdout:
            for line in raw.replace("\r", "\n").splitlines():
                lines.append(line)
                handle.write(line + "\n")
                if echo and PROGRESS.search(line):
                    print(line.strip(), flush=True)
    return lines


def run_framework(
    framework: str,
    spec: framework_configs.RunSpec,
    workdir: Path,
    *,
    threads: int | None = None,
    echo: bool = True,
) -> dict:
    """Train spec with a framework in its own environment and return what the run measured."""
    _check(framework)
    if env_python(framework) is None:
        raise FileNotFoundError(missing_message(framework))
    workdir = Path(workdir).resolve()  # the framework runs inside it: relative paths would break
    command = cli(framework, write_inputs(framework, spec, workdir).name)
    start = time.perf_counter()
    process = subprocess.Popen(
        command,
        cwd=workdir,
        env=run_env(framework, threads),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,  # its own process group: an interrupted run is stopped whole
    )
    peak, done = [0], threading.Event()
    watcher = threading.Thread(target=_watch_rss, args=(process.pid, peak, done), daemon=True)
    watcher.start()
    try:
        lines = _stream(process, workdir / "train.log", echo)
        code = process.wait()
    finally:
        done.set()
        watcher.join()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    seconds = time.perf_counter() - start
    peak[0] = peak[0] or children_max_rss()
    if code != 0:
        tail = "\n".join(lines[-25:])
        raise RuntimeError(
            f"{framework} failed (exit {code}); its log is {workdir / 'train.log'}:\n{tail}"
        )
    adapter = find_adapter(Path(spec.output_dir))
    if adapter is None:
        raise RuntimeError(f"{framework} finished but wrote no adapter under {spec.output_dir}.")
    parsed = parse_log(lines)
    runtime = parsed["train_runtime"] or seconds
    return {
        "framework": framework,
        "version": version(framework),
        "adapter_dir": str(adapter),
        "seconds": round(seconds, 2),
        "seconds_per_step": round(runtime / spec.max_steps, 3),
        "peak_rss_bytes": peak[0],
        "adapter_bytes": (adapter / ADAPTER_FILES[0]).stat().st_size,
        "losses": parsed["losses"],
        "command": shown(command),
    }


def load_adapter(base_model, adapter_dir: Path):
    """Wrap base_model (in the course env) with a framework's adapter, using plain PEFT."""
    return PeftModel.from_pretrained(base_model, str(adapter_dir))


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo on Linux), else its architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """This machine in one line: platform, processor and CPU count."""
    return f"{platform.platform()}, {cpu_name()}, {os.cpu_count()} CPUs"


def save_measurements(rows: list[dict], path: Path = MEASURED) -> Path:
    """Write the measured table with its date, machine and versions as JSON (merging by framework)."""
    path = Path(path)
    old = {row["framework"]: row for row in (load_measurements(path) or {}).get("rows", [])}
    old.update({row["framework"]: row for row in rows})
    table = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "versions": {name: row.get("version") for name, row in sorted(old.items())},
        "rows": [old[name] for name in sorted(old)],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=2) + "\n")
    return path


def load_measurements(path: Path = MEASURED) -> dict | None:
    """The last measured table (date, machine, versions, rows), or None when none was saved."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None
