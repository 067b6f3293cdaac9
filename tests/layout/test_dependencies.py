"""Apps depend one way: dashboard → diagnostics → workflows, never back."""

import ast
from pathlib import Path

import pytest
from django.conf import settings

ROOT = Path(settings.BASE_DIR)
# app: the apps it must never import
FORBIDDEN = {
    "workflows": {"diagnostics", "dashboard"},
    "diagnostics": {"dashboard"},
}


def imported_top_level_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("app", sorted(FORBIDDEN))
def test_app_never_imports_the_apps_that_depend_on_it(app):
    offenders = [
        f"{path.relative_to(ROOT)} imports {', '.join(sorted(found))}"
        for path in sorted((ROOT / app).rglob("*.py"))
        if (found := imported_top_level_packages(path) & FORBIDDEN[app])
    ]
    assert offenders == []


def test_the_check_sees_an_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from diagnostics.models import Finding\n")
    assert "diagnostics" in imported_top_level_packages(module)
