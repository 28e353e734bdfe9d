"""The Automation API helpers that `fab rollout --apply` uses.

They drive the real `pulumi` CLI: where it is not installed, the end-to-end test is skipped
with that reason, and what runs is the refusal a user without the CLI sees.
"""

from __future__ import annotations

import shutil

import pytest
import yaml

import awsapi.classic
import awsapi.parameters
from core import record as records
from infra import automation
from tests.conftest import settings_from


def test_without_the_cli_apply_refuses_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(automation.PulumiError, match="the pulumi CLI is not installed"):
        automation.up("lab")


@pytest.mark.skipif(not automation.cli_available(), reason="the pulumi CLI is not installed here: "
                    "the Automation API cannot run (it drives the CLI)")
def test_up_attaches_the_policy_once_every_backend_is_ready(aws, tmp_path):
    # A copy of the project whose lab stack points at this test's loopback AWS endpoint.
    project = tmp_path / "project"
    project.mkdir()
    for name in ("Pulumi.yaml", "__main__.py", "core", "infra"):
        src = automation.PROJECT_DIR / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, project / name)
    (project / ".venv").symlink_to(automation.PROJECT_DIR / ".venv")
    instance = "i-0123456789abcdef0"
    doc = yaml.safe_load((automation.PROJECT_DIR / "Pulumi.lab.yaml").read_text())
    doc["config"]["aws:endpoints"] = [{s: aws.url for s in ("ec2", "elb", "ssm", "sts")}]
    doc["config"]["wsgate:loadBalancer"]["instances"] = [instance]
    (project / "Pulumi.lab.yaml").write_text(yaml.safe_dump(doc))
    (tmp_path / "state").mkdir()
    env_vars = {"PULUMI_BACKEND_URL": f"file://{tmp_path / 'state'}", "PULUMI_CONFIG_PASSPHRASE": "lab-only"}
    with pytest.raises(automation.PulumiError, match="stack 'lab' does not exist"):
        automation.up("lab", work_dir=project, env_vars=env_vars)  # select, never create
    from pulumi import automation as auto

    auto.create_stack(stack_name="lab", work_dir=str(project), opts=auto.LocalWorkspaceOptions(env_vars=env_vars))

    s = settings_from("lab", **{k: v for k, v in doc["config"].items()
                                if k.startswith(("aws:endpoints", "wsgate:loadBalancer"))})
    awsapi.parameters.write_record(s, records.build("lab", list(s.ports.proxied), {instance: "d" * 64}))
    outputs = automation.up("lab", work_dir=project, env_vars=env_vars)
    assert outputs["proxyProtocolGate"] == "open"
    assert awsapi.classic.header_ports(s) == [18080, 18081]
