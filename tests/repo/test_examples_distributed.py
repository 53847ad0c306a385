"""examples/distributed_finetune.py's one-line errors, run as a learner runs it (lesson 09 runs it
for real on two processes: DDP against one process, FSDP against DDP, with its claims)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "distributed_finetune.py"
RENTALS = ROOT / "course_utils" / "data" / "rentals_train.jsonl"


def run_script(*args: str) -> subprocess.CompletedProcess:
    """Run the script in one process, offline, as `python examples/distributed_finetune.py ...`."""
    env = {"GOMP_SPINCOUNT": "10000", **os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(SCRIPT), "--model", "no-model-needed", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--steps", "0"], "--steps must be > 0, not 0"),
        (["--batch-size", "-2"], "--batch-size must be > 0, not -2"),
        (["--fsdp", "--output", "adapter"], "--output saves DDP runs only"),
        (["--steps", "400", "--batch-size", "4"], "400 steps of 4 need more chats"),
    ],
)
def test_a_bad_flag_stops_with_one_line(flags, message):
    result = run_script("--data", str(RENTALS), *flags, "--cpu")
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_a_bad_file_stops_with_its_line_number(tmp_path):
    bad = tmp_path / "chats.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    result = run_script("--data", str(bad))
    assert result.returncode != 0
    assert f"{bad}:1:" in result.stderr and "Traceback" not in result.stderr
