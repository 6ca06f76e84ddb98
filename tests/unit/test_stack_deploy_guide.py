"""docs/deploy.md shows only commands the repository supports: the files it names exist, the
Packer variables and stack parameters it sets are declared, the stack outputs it reads exist, and
every `nlpfleet` CLI line parses with the real CLI."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from cfnlint.decode import decode

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "deploy.md"
# Outputs `chalice package` adds to the merged template (its REST API).
CHALICE_OUTPUTS = {"EndpointURL", "RestAPIId", "APIHandlerName", "APIHandlerArn"}
# Produced by the commands themselves, not checked in.
GENERATED = ("ami/dist", "out/")


def commands() -> list[str]:
    text = GUIDE.read_text()
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" # ")[0].strip()
            if line and not line.startswith("#"):
                cmds.append(line)
    # inline commands in the prose
    cmds += [c for c in re.findall(r"`([^`\n]+)`", text) if c.startswith((".venv/bin/", "packer ", "aws "))]
    return cmds


def _words(cmd: str) -> list[str]:
    cmd = re.sub(r"\$\((?:[^()]|\([^()]*\))*\)", "SUBST", cmd)  # $(...) command substitutions
    cmd = re.sub(r"\$\{?(\w+)\}?", r"\1", cmd)
    return shlex.split(cmd)


@pytest.fixture(scope="module")
def template() -> dict:
    tpl, matches = decode(str(REPO / "infra" / "nlpfleet.yaml"))
    assert not matches
    return tpl


def test_guide_has_the_steps_from_an_empty_account_to_teardown():
    text = GUIDE.read_text()
    for needle in ("packer build", "chalice package", "aws cloudformation deploy", "First job", "First rollout",
                   "Watch it scale", "delete-stack", "What was verified here"):  # fmt: skip
        assert needle in text, needle


def test_files_the_guide_names_exist():
    text = GUIDE.read_text()
    paths = set(re.findall(r"(?<![\w/.$])((?:ami|infra|docs|tests|\.chalice)/[\w./<>-]+\w)", text))
    assert "infra/nlpfleet.yaml" in paths and "ami/nlpfleet.pkr.hcl" in paths
    for p in sorted(paths):
        if p.startswith(GENERATED) or "<" in p:
            continue
        if "{" in p or "*" in p:
            continue
        assert (REPO / p).exists(), p


def test_packer_variables_the_guide_sets_are_declared():
    declared = set(re.findall(r'^variable "(\w+)"', (REPO / "ami" / "nlpfleet.pkr.hcl").read_text(), re.M))
    used = set()
    for cmd in commands():
        if cmd.startswith("packer build") or " packer build" in cmd:
            used |= set(re.findall(r"-var '?(\w+)=", cmd))
    used |= set(re.findall(r"-var '?(\w+)=", GUIDE.read_text()))
    assert {"variant", "region"} <= used
    assert used <= declared, used - declared


def test_stack_parameters_and_outputs_the_guide_uses_exist(template):
    params = set(template["Parameters"])
    outputs = set(template["Outputs"]) | CHALICE_OUTPUTS
    deploys = [c for c in commands() if c.startswith("aws cloudformation deploy") and "--template-file" in c]
    assert deploys
    for cmd in deploys:
        words = _words(cmd)
        overrides = words[words.index("--parameter-overrides") + 1 :]
        keys = {w.split("=", 1)[0] for w in overrides if "=" in w}
        assert {"Stage", "VpcId", "SubnetIds", "AmiId"} <= keys
        assert keys <= params, keys - params
    used_outputs = set(re.findall(r"OutputKey=='(\w+)'", GUIDE.read_text()))
    assert used_outputs and used_outputs <= outputs, used_outputs - outputs
    table_params = set(re.findall(r"^\| `(\w+)` \|", GUIDE.read_text(), re.M))
    assert table_params <= params, table_params - params


def test_nlpfleet_cli_lines_parse_with_the_real_cli():
    from nlpfleet.cli import build_parser

    lines = [c for c in commands() if c.startswith(".venv/bin/nlpfleet ")]
    assert len(lines) >= 4
    for cmd in lines:
        build_parser().parse_args(_words(cmd)[1:])  # SystemExit (a test error) if it does not parse


def test_chalice_package_line_merges_the_infra_template():
    (cmd,) = [c for c in commands() if "chalice package" in c and "--merge-template" in c]
    words = _words(cmd)
    assert words[words.index("--merge-template") + 1] == "infra/nlpfleet.yaml"
    assert words[words.index("--stage") + 1] == "STAGE"
