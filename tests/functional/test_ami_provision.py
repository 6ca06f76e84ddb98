"""The AMI's provisioning script, run for real into a throwaway root (DESTDIR) with the CPU variant;
then an instance's boot as far as this machine allows: the installed nlpfleet-boot reads inference
user data, resolves the active model from SSM (a moto server), and the installed server, started
from the installed unit's own command line and environment files, answers /readyz and classifies.

Differences from the real AMI build (docs/deploy.md): the venv is layered over this project's
venv (NLPFLEET_BASE_SITE, pip --no-index: every pin is checked against packages on disk instead
of downloading torch), no OS packages, CloudWatch agent or service user, and systemd does not run
the units: the test reads their ExecStart/EnvironmentFile and runs that command, with the image's
absolute paths (/opt/nlpfleet, /var/lib/nlpfleet, /run/nlpfleet) mapped into DESTDIR.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGE_PATHS = ("/opt/nlpfleet", "/var/lib/nlpfleet", "/var/log/nlpfleet", "/run/nlpfleet", "/etc/nlpfleet")
PACKAGES = ("chalicelib", "inference", "training", "localstack", "nlpfleet")


def build_wheel(dest: Path) -> Path:
    """The project wheel, built from a copy of the sources (the packer recipe builds it the same
    way with `pip wheel --no-deps`)."""
    src = dest / "src"
    src.mkdir()
    shutil.copy(REPO / "pyproject.toml", src)
    for pkg in PACKAGES:
        if (REPO / pkg).is_dir():
            shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = dest / "dist"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dist),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = dist.glob("nlpfleet-*.whl")
    return wheel


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Provision into DESTDIR from a staging folder laid out as Packer uploads it
    (ami/ with dist/ holding the wheel and constraints.txt), so the script finds both itself."""
    work = tmp_path_factory.mktemp("ami")
    staging = work / "nlpfleet-ami"
    shutil.copytree(REPO / "ami", staging, ignore=shutil.ignore_patterns("dist", "__pycache__"))
    wheel = build_wheel(work)
    (staging / "dist").mkdir()
    shutil.copy(wheel, staging / "dist")
    shutil.copy(REPO / "constraints.txt", staging / "dist" / "constraints.txt")
    destdir = work / "root"
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(work),
        "DESTDIR": str(destdir),
        "NLPFLEET_VARIANT": "cpu",
        "NLPFLEET_SRC": str(staging),
        "NLPFLEET_PYTHON": sys.executable,
        "NLPFLEET_BASE_SITE": sysconfig.get_paths()["purelib"],
        "NLPFLEET_IMAGE_NAME": "nlpfleet-cpu-test",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    r = subprocess.run(
        ["bash", str(staging / "scripts" / "provision.sh")],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "smoke: onnxruntime" in r.stdout + r.stderr
    return destdir


def in_root(root: Path, value: str) -> str:
    """Map the image's absolute paths into DESTDIR (what systemd on the image would not need)."""
    for p in IMAGE_PATHS:
        value = value.replace(p, str(root) + p)
    return value


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        env[key] = shlex.split(value)[0] if value else ""
    return env


def unit(root: Path, name: str) -> dict[str, list[str]]:
    fields: dict[str, list[str]] = {}
    for line in (root / "etc/systemd/system" / name).read_text().splitlines():
        m = re.match(r"^(\w+)=(.*)$", line)
        if m:
            fields.setdefault(m[1], []).append(m[2])
    return fields


def test_image_layout_units_and_configuration(root):
    units = root / "etc/systemd/system"
    assert {p.name for p in units.glob("nlpfleet-*.service")} == {
        "nlpfleet-boot.service",
        "nlpfleet-inference.service",
        "nlpfleet-agent.service",
        "nlpfleet-job.service",
    }
    # only the role selector starts at boot; it starts the units of the instance's role
    wants = units / "multi-user.target.wants"
    assert [p.name for p in wants.iterdir()] == ["nlpfleet-boot.service"]
    assert os.readlink(wants / "nlpfleet-boot.service") == "/etc/systemd/system/nlpfleet-boot.service"
    for name in ("nlpfleet-inference.service", "nlpfleet-agent.service", "nlpfleet-job.service"):
        u = unit(root, name)
        assert u["User"] == ["nlpfleet"], name
        assert u["EnvironmentFile"] == ["/etc/nlpfleet/image.env", "/run/nlpfleet/nlpfleet.env"], name
        assert u["ExecStart"][0].startswith("/opt/nlpfleet/venv/bin/"), name
    assert unit(root, "nlpfleet-job.service")["SuccessAction"] == ["poweroff"]

    image_env = read_env_file(root / "etc/nlpfleet/image.env")
    assert image_env["NLPFLEET_IMAGE_VARIANT"] == "cpu"
    assert image_env["NLPFLEET_TRT_CACHE_DIR"] == "/var/lib/nlpfleet/trt-cache"
    assert (root / "var/lib/nlpfleet/trt-cache").is_dir()  # on the root EBS volume, not tmpfs
    assert image_env["NLPFLEET_SCRATCH"] == "/var/lib/nlpfleet/scratch"  # job work space, not /tmp

    cwa = json.loads((root / "opt/nlpfleet/share/cloudwatch-agent.json").read_text())
    files = cwa["logs"]["logs_collected"]["files"]["collect_list"]
    assert {f["file_path"] for f in files} == {
        f"/var/log/nlpfleet/{n}.log" for n in ("inference", "agent", "job")
    }
    assert {f["log_group_name"] for f in files} == {"/nlpfleet/@STAGE@/instances"}
    assert "nvidia_gpu" not in cwa["metrics"]["metrics_collected"]  # cpu variant

    constraints = (root / "opt/nlpfleet/share/constraints.txt").read_text()
    ort = re.search(r"^onnxruntime==(\S+)$", constraints, re.M)[1]
    assert f"onnxruntime-gpu=={ort}" in constraints  # the GPU twin pinned to the same version


def test_installed_venv_runs_the_wheel_not_the_checkout(root, tmp_path):
    python = root / "opt/nlpfleet/venv/bin/python"
    r = subprocess.run(
        [str(python), "-c", "import inference, chalicelib, training, onnxruntime; print(inference.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith(str(root / "opt/nlpfleet/venv/lib"))
    scripts = {p.name for p in (root / "opt/nlpfleet/venv/bin").iterdir()}
    assert {"nlpfleet-instance", "nlpfleet-train"} <= scripts
    # the agent unit's module (the fleet's server supervisor) is installed and runs
    agent = subprocess.run([str(python), "-m", "inference.agent", "--help"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    assert agent.returncode == 0 and "--user-data" in agent.stdout, agent.stderr
    boot = (root / "opt/nlpfleet/bin/nlpfleet-boot").read_text().splitlines()[0]
    assert boot == "#!/opt/nlpfleet/venv/bin/python"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def aws(monkeypatch):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    creds = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for k, v in creds.items():
        monkeypatch.setenv(k, v)
    try:
        yield endpoint, creds
    finally:
        server.stop()


def test_boot_picks_the_inference_role_and_the_installed_unit_serves_the_active_model(
    root, aws, trained_artifact, tmp_path
):
    import boto3

    endpoint, creds = aws
    # What the control plane does when a model lands: the active-model parameter.
    ssm = boto3.client("ssm", endpoint_url=endpoint, region_name="us-east-1")
    manifest = json.loads((trained_artifact / "manifest.json").read_text())
    record = {"name": manifest.get("name", "m"), "version": manifest.get("version", "1"),
              "uri": str(trained_artifact), "manifest_sha256": "x"}  # fmt: skip
    ssm.put_parameter(Name="/nlpfleet/dev/active-model", Value=json.dumps(record), Type="String")

    port = _free_port()
    user_data = tmp_path / "user-data.json"
    user_data.write_text(
        json.dumps(
            {
                "role": "inference",
                "bucket": "nlpfleet-dev-data",
                "table": "nlpfleet-dev-jobs",
                "region": "us-east-1",
                "stage": "dev",
                "active_model_param": "/nlpfleet/dev/active-model",
                "port": port,
                "endpoint_url": endpoint,
            }
        )  # fmt: skip
    )
    venv_python = str(root / "opt/nlpfleet/venv/bin/python")
    base_env = {"PATH": "/usr/bin:/bin", **creds}
    r = subprocess.run(
        [
            venv_python,
            str(root / "opt/nlpfleet/bin/nlpfleet-boot"),
            "--user-data",
            str(user_data),
            "--root",
            str(root),
            "--no-start",
        ],  # fmt: skip
        cwd=tmp_path,
        env=base_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "role=inference" in r.stdout
    assert "units=nlpfleet-agent.service" in r.stdout  # the agent runs the server in the fleet
    cwa = json.loads((root / "run/nlpfleet/cloudwatch-agent.json").read_text())
    assert (
        cwa["logs"]["logs_collected"]["files"]["collect_list"][0]["log_group_name"]
        == "/nlpfleet/dev/instances"
    )

    # The standalone server unit's command line (the same server command the agent runs as its
    # child), with its environment files, as systemd would run it.
    u = unit(root, "nlpfleet-inference.service")
    env = dict(base_env)
    for f in u["EnvironmentFile"]:
        env.update(read_env_file(Path(in_root(root, f))))
    assert env["NLPFLEET_MODEL_URI"] == str(trained_artifact)
    (exec_start,) = u["ExecStart"]
    argv = [in_root(root, a) for a in shlex.split(re.sub(r"\$\{(\w+)\}", lambda m: env[m[1]], exec_start))]
    env = {k: in_root(root, v) for k, v in env.items()}
    log = (root / "var/log/nlpfleet/inference.log").open("w")
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        status = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, (root / "var/log/nlpfleet/inference.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=5) as resp:
                    status = resp.status
                    break
            except OSError:
                time.sleep(0.5)
        assert status == 200, (root / "var/log/nlpfleet/inference.log").read_text()[-3000:]

        labels = json.loads((trained_artifact / "labels.json").read_text())
        req = urllib.request.Request(
            f"{base}/v1/classify",
            data=json.dumps(
                {"inputs": ["I still have not received my new card, when will it arrive?"]}
            ).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            body = json.loads(resp.read())
        (result,) = body["results"]
        assert result["label"] in labels
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    assert proc.returncode == 0  # SIGTERM drains and exits cleanly (the unit's KillSignal)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NLPFLEET_VARIANT": "tpu"}, "NLPFLEET_VARIANT must be gpu or cpu"),
        ({"NLPFLEET_VARIANT": "cpu"}, "expected one nlpfleet wheel"),
    ],
)
def test_provisioning_refuses_a_bad_variant_or_a_missing_wheel_before_touching_anything(
    tmp_path, env, message
):
    (tmp_path / "staging").mkdir()
    r = subprocess.run(
        ["bash", str(REPO / "ami" / "scripts" / "provision.sh")],
        env={
            "PATH": os.environ["PATH"],
            "DESTDIR": str(tmp_path / "root"),
            "NLPFLEET_SRC": str(tmp_path / "staging"),
            **env,
        },  # fmt: skip
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    assert message in r.stderr
    assert not (tmp_path / "root").exists()
