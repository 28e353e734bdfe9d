"""The GitHub workflows: actionlint-clean, and the preview covers every AWS environment."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import PROJECT_DIR

WORKFLOWS = PROJECT_DIR / ".github" / "workflows"


def actionlint() -> str:
    found = shutil.which("actionlint", path=str(Path(sys.executable).parent)) or shutil.which("actionlint")
    assert found, "actionlint is not installed: make test installs it from requirements-dev.txt"
    return found


def test_workflows_pass_actionlint():
    files = sorted(str(p) for p in WORKFLOWS.glob("*.yml"))
    assert len(files) >= 2
    result = subprocess.run([actionlint(), "-no-color", *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text("on: push\njobs:\n  x:\n    runs-on: ubuntu-latest\n    steps:\n"
                      "      - run: echo ${{ github.event.nope.bad }\n")
    result = subprocess.run([actionlint(), "-no-color", str(broken)], capture_output=True, text=True)
    assert result.returncode != 0


def test_preview_posts_a_comment_for_every_aws_stack():
    wf = yaml.safe_load((WORKFLOWS / "preview.yml").read_text())
    assert "pull_request" in wf[True]  # YAML reads the `on:` key as True
    job = wf["jobs"]["preview"]
    stacks = set(job["strategy"]["matrix"]["stack"])
    aws_envs = {p.name.split(".")[1] for p in PROJECT_DIR.glob("Pulumi.*.yaml")} - {"lab"}
    assert stacks == aws_envs
    pulumi_step = next(s for s in job["steps"] if s.get("uses", "").startswith("pulumi/actions@"))
    assert pulumi_step["with"]["command"] == "preview"
    assert pulumi_step["with"]["comment-on-pr"] is True
    steps = [s.get("uses", s.get("run", "")) for s in job["steps"]]
    assert steps.index(next(s for s in steps if "pip install" in s)) < steps.index(pulumi_step["uses"])
    assert wf["permissions"]["id-token"] == "write"


def test_ci_workflow_runs_the_test_command():
    wf = yaml.safe_load((WORKFLOWS / "ci.yml").read_text())
    runs = " ".join(s.get("run", "") for s in wf["jobs"]["test"]["steps"])
    assert "make test" in runs
