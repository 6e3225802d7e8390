"""oppu.errors: every user-facing error derives from OppuError, and the CLI reports any of them in one line."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import duckdb

from oppu.__main__ import main
from oppu.errors import OppuError

OPPU = Path(__file__).resolve().parents[1] / "oppu"


def _error_classes() -> dict[str, type]:
    """Every `class ...Error` defined in oppu/, imported from the module that defines it."""
    found = {}
    for path in sorted(OPPU.rglob("*.py")):
        names = [node.name for node in ast.parse(path.read_text()).body
                 if isinstance(node, ast.ClassDef) and node.name.endswith("Error")]
        if names:
            parts = path.relative_to(OPPU.parent).with_suffix("").parts
            module = importlib.import_module(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
            found.update({f"{module.__name__}.{name}": getattr(module, name) for name in names})
    return found


def test_every_error_class_of_oppu_is_an_oppu_error():
    classes = _error_classes()
    assert {"oppu.config.ConfigError", "oppu.data.DataError", "oppu.jobs.folder.JobError",
            "oppu.store.StoreError", "oppu.tasks.UnknownTaskError"} <= set(classes)
    assert [name for name, cls in classes.items() if not issubclass(cls, OppuError)] == []


def test_errors_keep_their_builtin_base_and_message():
    from oppu.data import DataError, UnknownUserError
    from oppu.tasks import UnknownTaskError, get_task

    assert issubclass(DataError, ValueError) and issubclass(UnknownUserError, KeyError)
    try:
        get_task("LaMP_9")
    except UnknownTaskError as exc:
        assert str(exc).startswith("unknown task 'LaMP_9'")  # no KeyError quotes around the message


def test_cli_reports_a_store_error_in_one_line(tmp_path, capsys):
    # `oppu results` caught ValueError only: a store written by a newer oppu ended in a StoreError traceback.
    db = tmp_path / "newer.duckdb"
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
    con.execute("INSERT INTO meta VALUES ('schema_version', '99')")
    con.close()
    assert main(["results", "--db", str(db)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("oppu results: error: ") and "newer than this code" in err
    assert len(err.strip().splitlines()) == 1


def test_cli_names_the_action_of_a_failing_command(tmp_path, capsys):
    assert main(["jobs", "show", "20250101-000000-abcdef", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("oppu jobs show: error: no job 20250101-000000-abcdef")
