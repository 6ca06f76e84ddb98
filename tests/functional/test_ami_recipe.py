"""The AMI recipe passes the checks Debian's packer 1.6.6 and shellcheck can make offline.

`make test` installs both (Makefile `tools` target) before running the suite.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
AMI = REPO / "ami"
TEMPLATE = AMI / "nlpfleet.pkr.hcl"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make tools` (Debian packages packer and shellcheck)")
    return path


def _run(*cmd: str) -> subprocess.CompletedProcess:
    # packer validate runs offline and needs no AWS credentials; CHECKPOINT_DISABLE keeps it from
    # asking HashiCorp for a newer version.
    env = {"PATH": "/usr/bin:/bin", "CHECKPOINT_DISABLE": "1", "HOME": tempfile.gettempdir()}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_packer_validates_the_template(variant):
    r = _run(_tool("packer"), "validate", "-var", f"variant={variant}", str(TEMPLATE.relative_to(REPO)))
    assert r.returncode == 0, r.stdout + r.stderr


def test_packer_rejects_an_unknown_variant():
    r = _run(_tool("packer"), "validate", "-var", "variant=tpu", str(TEMPLATE.relative_to(REPO)))
    assert r.returncode != 0
    assert "variant must be gpu or cpu" in r.stdout + r.stderr


def test_packer_files_are_formatted():
    packer = _tool("packer")
    for hcl in sorted(AMI.glob("*.pkr.hcl")):
        r = _run(packer, "fmt", "-check", "-diff", str(hcl.relative_to(REPO)))
        assert r.returncode == 0, f"{hcl.name} is not `packer fmt` clean:\n{r.stdout}{r.stderr}"


def test_validated_file_has_no_plugin_block_and_gp3_sets_throughput_and_iops():
    text = TEMPLATE.read_text()
    assert not re.search(r"required_plugins\s*\{", text)  # 1.6.6 rejects it: it is in plugins.pkr.hcl
    assert re.search(r"required_plugins\s*\{", (AMI / "plugins.pkr.hcl").read_text())
    assert 'volume_type           = "gp3"' in text
    assert "throughput" in text and "iops" in text
    assert "encrypt_boot    = true" in text


def test_shell_scripts_pass_shellcheck():
    scripts = sorted(str(p.relative_to(REPO)) for p in AMI.rglob("*.sh"))
    assert scripts, "no provisioning scripts found"
    r = _run(_tool("shellcheck"), "--severity=style", *scripts)
    assert r.returncode == 0, r.stdout + r.stderr


def test_shell_provisioners_pass_their_environment_through_sudo():
    # A custom execute_command without {{ .Vars }} silently drops environment_vars (the variant).
    blocks = re.findall(r'provisioner "shell" \{(.*?)\n  \}', TEMPLATE.read_text(), re.S)
    assert blocks
    for block in blocks:
        m = re.search(r'execute_command\s*=\s*"([^"]*)"', block)
        if m:
            assert "{{ .Vars }}" in m[1], m[1]
    provision = next(b for b in blocks if "provision.sh" in b)
    assert "NLPFLEET_VARIANT=${var.variant}" in provision
