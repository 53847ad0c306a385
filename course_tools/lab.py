"""``make course``: JupyterLab for a learner, opened on lesson 00 (``INSTRUCTOR=1``: everything).

A learner's view: the URL printed opens ``notebooks/00_start_here.ipynb``; the file browser
lists the lessons, the learner's own exercises (``my-work/``, brought up to date first by
``course_tools.my_work``), the README, docs, examples and the course package with its data card;
``solutions/`` (the model answers), ``exercises/`` (the pristine copies), tests, tools and build
artefacts are hidden, and nbgrader's instructor UI (the "Create Assignment" sidebar, the Nbgrader
menu and its server extensions) is off. The instructor's view lists every file and keeps
nbgrader. Both: no news pop-up and no update check (the course runs offline).

Hidden means left out of the file browser (Jupyter server's ``hide_globs``), not protected: the
files stay on disk, and a learner who opens ``solutions/`` by its path can read it.

    python -m course_tools.lab [--instructor] [--ip 127.0.0.1] [--port 8888] [-- jupyter args]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from course_tools import my_work

ROOT = Path(__file__).resolve().parents[1]
START = "notebooks/00_start_here.ipynb"
#: Names left out of a learner's file browser, at any depth (besides Jupyter's own defaults).
LEARNER_HIDES = (
    "solutions", "exercises", "tests", "bench", "course_tools", "instructors", "outputs",
    "conftest.py", "*.egg-info", "Makefile", "pyproject.toml", "requirements*.txt",
    "environment.yml", "CHANGELOG.md",
)  # fmt: skip
JUPYTER_HIDES = ("__pycache__", "*.pyc", "*.pyo", ".DS_Store", "*~")
#: nbgrader's server extensions (instructor tools), switched off for learners.
NBGRADER_SERVER = (
    "nbgrader.server_extensions.formgrader",
    "nbgrader.server_extensions.assignment_list",
    "nbgrader.server_extensions.course_list",
    "nbgrader.server_extensions.validate_assignment",
)
#: JupyterLab defaults for the course (a learner's own settings still win): no news, no update check.
QUIET = {
    "@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False}
}


def write_settings(folder: Path, instructor: bool) -> Path:
    """Write JupyterLab's app settings (defaults and disabled extensions) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "overrides.json").write_text(json.dumps(QUIET, indent=1) + "\n")
    disabled = [] if instructor else ["@jupyter/nbgrader"]
    (folder / "page_config.json").write_text(json.dumps({"disabledExtensions": disabled}) + "\n")
    return folder


def lab_command(
    instructor: bool, ip: str, port: int, settings: Path, extra: list[str]
) -> list[str]:
    """The `jupyter lab` command line of the learner's (or the instructor's) view."""
    command = [
        sys.executable, "-m", "jupyterlab", "--no-browser", f"--ip={ip}", f"--port={port}",
        f"--ServerApp.root_dir={ROOT}", f"--LabApp.default_url=/lab/tree/{START}",
        f"--LabApp.app_settings_dir={settings}", "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.handlers.announcements.NeverCheckForUpdate",
    ]  # fmt: skip
    if not instructor:
        command += [f"--ContentsManager.hide_globs={g}" for g in JUPYTER_HIDES + LEARNER_HIDES]
        command += [f"--ServerApp.jpserver_extensions={e}=False" for e in NBGRADER_SERVER]
    return command + extra


def main(argv: list[str] | None = None) -> int:
    """Bring my-work/ up to date, then replace this process with JupyterLab."""
    parser = argparse.ArgumentParser(prog="python -m course_tools.lab", description=__doc__)
    parser.add_argument("--instructor", action="store_true", help="show every file and nbgrader")
    parser.add_argument("--ip", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8888)
    parser.add_argument("extra", nargs="*", help="more jupyter lab arguments (after --)")
    args = parser.parse_args(argv)
    for line in my_work.update():
        print(line)
    view = "instructor" if args.instructor else "learner"
    settings = write_settings(ROOT / "outputs" / "jupyter" / view, args.instructor)
    command = lab_command(args.instructor, args.ip, args.port, settings, args.extra)
    print(f"Starting JupyterLab ({view}'s view): open the URL printed below (Ctrl+C stops it).")
    if not args.instructor:
        print(
            "Your exercises are in my-work/ (make exercises, make test and git pull never touch it)."
        )
    sys.stdout.flush()
    os.execv(command[0], command)
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
