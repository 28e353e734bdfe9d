"""The code's shape: product code never depends on the lab or the tests."""

from __future__ import annotations

import ast

import pytest

from tests.conftest import REPO


@pytest.mark.parametrize("package", ["core", "remote", "infra"])
def test_product_code_never_imports_the_lab_or_the_tests(package):
    for path in sorted((REPO / package).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.split(".")[0] not in ("lab", "tests"), f"{path.name} imports {name}"
