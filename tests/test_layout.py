"""The code's shape: layers that point one way, and product code that never depends on the lab or
the tests.

core (pure) <- awsapi (the AWS edge) <- infra (Pulumi) and remote (Fabric/SSH), which never
import each other; the applier Pulumi provides is loaded by name (remote.applier).
"""

from __future__ import annotations

import ast

import pytest

from tests.conftest import PROJECT_DIR

# package -> the first-party packages it may import
ALLOWED = {
    "core": {"core"},
    "awsapi": {"core", "awsapi"},
    "infra": {"core", "awsapi", "infra"},
    "remote": {"core", "awsapi", "remote"},
}
FIRST_PARTY = {"core", "awsapi", "infra", "remote", "lab", "tests", "benchmarks"}
PURE_FORBIDDEN = {"pulumi", "pulumi_aws", "paramiko", "fabric", "invoke", "botocore", "boto3"}


def imports(package: str) -> list[tuple[str, str]]:
    """(file, imported module) for every import statement of a package's modules."""
    out = []
    for path in sorted((PROJECT_DIR / package).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                out += [(path.name, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                out.append((path.name, node.module or ""))
    return out


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_layers_point_one_way(package):
    for name, module in imports(package):
        top = module.split(".")[0]
        if top in FIRST_PARTY:
            assert top in ALLOWED[package], f"{package}/{name} imports {module}"


def test_the_core_is_pure():
    for name, module in imports("core"):
        assert module.split(".")[0] not in PURE_FORBIDDEN, f"core/{name} imports {module}"


def test_every_package_is_checked():
    packages = {p.parent.name for p in PROJECT_DIR.glob("*/__init__.py")} | {
        p.name for p in PROJECT_DIR.iterdir() if p.is_dir() and any(p.glob("*.py")) and p.name in ALLOWED}
    assert packages - {"lab", "tests", "benchmarks"} <= set(ALLOWED)
