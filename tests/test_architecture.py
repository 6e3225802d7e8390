"""The core's shape: `oppu/` never imports Streamlit, and no module reaches into another module's privates."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = sorted((ROOT / "oppu").rglob("*.py"))
APP = sorted([*(ROOT / "dashboard").rglob("*.py"), *(ROOT / "pages").rglob("*.py")])


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """(imported module, imported names) of every import statement, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            yield module, tuple(alias.name for alias in node.names)


def test_the_walk_finds_the_code():
    assert len(CORE) > 20 and len(APP) > 5


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_core_never_imports_streamlit(path):
    bad = [module for module, _ in _imports(path) if module.split(".")[0] == "streamlit"]
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}: the core must run without the dashboard"


@pytest.mark.parametrize("path", CORE + APP, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_another_modules_private_names(path):
    here = _module_name(path)
    bad = [f"{module}.{name}" for module, names in _imports(path) for name in names
           if name.startswith("_") and not name.startswith("__") and module != here
           and module.split(".")[0] in ("oppu", "dashboard", "pages", "bench")]
    assert not bad, (f"{path.relative_to(ROOT)} imports private names {bad}: make them public in their module "
                     "or move the code that needs them there")


def test_the_check_catches_a_private_import(tmp_path, monkeypatch):
    # The rule above must be able to fail: a crafted module importing a private name is flagged.
    fake = ROOT / "oppu" / "_architecture_probe.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "from oppu.train import _pad_id\n"
                        if self == fake else Path.read_bytes(self).decode())
    found = [(m, n) for m, n in _imports(fake)]
    assert found == [("oppu.train", ("_pad_id",))]
    with pytest.raises(AssertionError, match="private names"):
        test_no_module_imports_another_modules_private_names(fake)
