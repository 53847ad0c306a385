"""course_utils.env: device, dtype, colab, seeding, profile and the report."""

import logging
import sys

import pytest
import torch

from course_utils import env


def test_pick_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert env.pick_device().type == "cpu"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert env.pick_device().type == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert env.pick_device().type == "cuda"


def test_pick_device_rejects_a_device_that_is_not_there(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="not available on this machine"):
        env.pick_device("cuda")
    with pytest.raises(TypeError, match="device name"):
        env.pick_device(3)
    assert env.pick_device("cpu").type == "cpu"


def test_default_dtype_is_fp32_on_cpu_and_half_precision_on_gpu(monkeypatch):
    assert env.default_dtype("cpu") == torch.float32
    assert env.default_dtype("mps") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert env.default_dtype("cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # e.g. a Colab T4
    assert env.default_dtype("cuda") == torch.float16
    with pytest.raises(ValueError, match="Unknown device type"):
        env.default_dtype("meta")


def test_in_colab_reads_the_loaded_modules(monkeypatch):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    assert env.in_colab() is False
    monkeypatch.setitem(sys.modules, "google.colab", object())
    assert env.in_colab() is True


def test_seed_everything_makes_random_numbers_repeat():
    env.seed_everything(123)
    first = torch.rand(5)
    env.seed_everything(123)
    assert torch.equal(first, torch.rand(5))
    env.seed_everything(124)
    assert not torch.equal(first, torch.rand(5))


@pytest.mark.parametrize("bad", [-1, 1.5, "0", True])
def test_seed_everything_rejects_bad_seeds(bad):
    with pytest.raises(ValueError, match="non-negative integer"):
        env.seed_everything(bad)


def test_profile_defaults_to_full_and_reads_the_variable(monkeypatch):
    monkeypatch.delenv("COURSE_PROFILE", raising=False)
    assert env.profile() == "full"
    assert env.by_profile(full=200, ci=5) == 200
    monkeypatch.setenv("COURSE_PROFILE", "CI")
    assert env.profile() == "ci"
    assert env.by_profile(full=200, ci=5) == 5


def test_profile_rejects_an_unknown_value(monkeypatch):
    monkeypatch.setenv("COURSE_PROFILE", "fast")
    with pytest.raises(ValueError, match="not a known profile"):
        env.profile()


def test_package_versions_reports_missing_packages():
    versions = env.package_versions(("torch", "no-such-package-xyz"))
    assert versions["torch"] == torch.__version__
    assert versions["no-such-package-xyz"] == "not installed"


def test_environment_report_and_print(capsys):
    report = env.environment_report()
    for key in ("python", "device", "dtype", "profile", "torch", "transformers", "peft", "trl"):
        assert key in report, key
    assert report["device"] == env.pick_device().type
    assert report["dtype"] == str(env.default_dtype()).removeprefix("torch.")
    assert env.memory_gb() > 0.5
    printed = env.print_report()
    out = capsys.readouterr().out
    assert printed.keys() == report.keys()
    assert "transformers" in out and str(report["transformers"]) in out


def test_bitsandbytes_advice_to_install_hub_kernels_is_dropped_and_other_warnings_kept(caplog):
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        logger.warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure "
            "you already `pip install kernels`",
            "No module named 'kernels'",
        )
        logger.warning("some other bitsandbytes warning")
    messages = [record.getMessage() for record in caplog.records]
    assert messages == ["some other bitsandbytes warning"]


def _without_spin_setting() -> dict:
    """This process's environment without the OpenMP spin setting (as a plain shell has it)."""
    import os

    return {k: v for k, v in os.environ.items() if k not in env.OPENMP_SPIN}


def test_the_openmp_setting_line_sets_what_is_missing_and_keeps_what_is_set(tmp_path):
    import subprocess

    target = env.install_openmp_setting(tmp_path)
    assert target.name == env.OPENMP_PTH and target.read_text() == env.openmp_spin_line()
    probe = (
        f"import site, os; site.addsitedir({str(tmp_path)!r}); print(os.environ['GOMP_SPINCOUNT'])"
    )
    clean = _without_spin_setting()
    run = subprocess.run(
        [sys.executable, "-S", "-c", probe], env=clean, capture_output=True, text=True
    )
    assert run.stdout.strip() == env.OPENMP_SPIN["GOMP_SPINCOUNT"], run.stderr
    mine = subprocess.run(
        [sys.executable, "-S", "-c", probe],
        env={**clean, "GOMP_SPINCOUNT": "7"},
        capture_output=True,
        text=True,
    )
    assert mine.stdout.strip() == "7"
    with pytest.raises(FileNotFoundError, match="site-packages"):
        env.install_openmp_setting(tmp_path / "missing")


def test_every_python_of_the_course_environment_gets_the_setting_before_torch_loads():
    """`make model` installed the .pth: a script and a Jupyter kernel started without it have it."""
    import subprocess

    from jupyter_client.manager import start_new_kernel

    clean = _without_spin_setting()
    script = "import os, sys; print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", script], env=clean, capture_output=True, text=True)
    assert run.stdout.split() == [env.OPENMP_SPIN["GOMP_SPINCOUNT"], "False"], run.stderr
    manager, client = start_new_kernel(kernel_name="python3", env=clean)
    try:
        seen = []
        client.execute_interactive(
            "import os; print(os.environ.get('GOMP_SPINCOUNT'))",
            output_hook=lambda msg: seen.append(msg["content"].get("text", "")),
            timeout=60,
        )
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    assert "".join(seen).strip() == env.OPENMP_SPIN["GOMP_SPINCOUNT"]
    assert env.openmp_spin_missing() == []
