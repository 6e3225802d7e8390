"""`oppu data convert|validate|download` and `oppu evaluate` through the CLI entry point."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from oppu.__main__ import main

FIXTURES = Path(__file__).parent / "fixtures" / "lamp"
DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"


def _json(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_convert_then_validate(tmp_path, capsys):
    rc = main(["data", "convert", "--task", "LaMP_2M", "--questions", str(FIXTURES / "LaMP_2M_dev_questions.json"),
               "--outputs", str(FIXTURES / "LaMP_2M_dev_outputs_bare.json"), "--out", str(tmp_path),
               "--test-users", "2"])
    out, err = capsys.readouterr()
    assert rc == 0 and "2 test users, 2 other users, 5 queries" in out and "question 110" in err
    assert main(["data", "validate", str(tmp_path / "LaMP_2M")]) == 0
    assert "ok: no problems" in capsys.readouterr().out


def test_convert_reports_the_leaking_items_it_dropped(tmp_path, capsys):
    rc = main(["data", "convert", "--task", "LaMP_2M", "--questions", str(FIXTURES / "LaMP_2M_leaky_questions.json"),
               "--outputs", str(FIXTURES / "LaMP_2M_leaky_outputs.json"), "--out", str(tmp_path), "--test-users", "1"])
    out, err = capsys.readouterr()
    assert rc == 0 and "1 leaking history item(s) dropped" in out and "dropped 1 history item(s)" in err


def test_validate_lists_one_line_per_problem_and_exits_1(capsys):
    rc = main(["data", "validate", str(FIXTURES / "LaMP_2M_dev_questions.json"), "--task", "LaMP_2M"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 1 and len(lines) >= 5 and all("LaMP_2M_dev_questions.json" in line for line in lines)


def test_validate_demo_folder_is_clean(capsys):
    assert main(["data", "validate", str(DEMO)]) == 0


def test_evaluate_prints_the_metric_object(tmp_path, capsys):
    golds = _json(tmp_path / "g.json", {"task": "LaMP_2M", "golds": [{"id": "1", "output": "comedy"},
                                                                      {"id": "2", "output": "action"}]})
    preds = _json(tmp_path / "p.json", [{"id": "2", "output": "action"}, {"id": "1", "output": "Comedy."}])
    assert main(["evaluate", "--task", "LaMP_2M", "--golds", str(golds), "--preds", str(preds)]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == 0.5
    assert main(["evaluate", "--task", "LaMP_2M", "--golds", str(golds), "--preds", str(preds), "--normalize"]) == 0
    # Macro-F1 averages over all 15 labels, as the official evaluation does: 2 perfect classes -> 2/15.
    assert json.loads(capsys.readouterr().out) == {"accuracy": 1.0, "f1": pytest.approx(2 / 15)}


@pytest.mark.parametrize("preds, message", [
    ([{"id": "1", "output": "comedy"}], "without a prediction: 2"),
    ({"task": "LaMP_3", "golds": []}, "not LaMP_2M"),
    ("not json", "JSON"),
])
def test_evaluate_errors_are_one_line_without_traceback(tmp_path, preds, message):
    golds = _json(tmp_path / "g.json", [{"id": "1", "output": "comedy"}, {"id": "2", "output": "action"}])
    pred_path = tmp_path / "p.json"
    if isinstance(preds, str):
        pred_path.write_text(preds)
    else:
        _json(pred_path, preds)
    proc = subprocess.run([sys.executable, "-m", "oppu", "evaluate", "--task", "LaMP_2M", "--golds", str(golds),
                           "--preds", str(pred_path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 1 and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_convert_bad_file_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "q.json"
    bad.write_bytes(b"\xff\xfe garbage")
    rc = main(["data", "convert", "--task", "LaMP_2M", "--questions", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "not UTF-8" in err and len(err.strip().splitlines()) == 1
    assert err.startswith("oppu data convert: error: ")


@pytest.fixture
def lamp_server(tmp_path):
    """A local http.server serving a fixture copy of the official download tree for LaMP_2M."""
    root = tmp_path / "site"
    for split in ("train", "dev"):
        folder = root / "LaMP_2" / "new" / split
        folder.mkdir(parents=True)
        shutil.copy(FIXTURES / "LaMP_2M_dev_questions.json", folder / f"{split}_questions.json")
        shutil.copy(FIXTURES / "LaMP_2M_dev_outputs.json", folder / f"{split}_outputs.json")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None  # type: ignore[assignment]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_download_from_a_local_server(tmp_path, lamp_server, capsys):
    rc = main(["data", "download", "--task", "LaMP_2M", "--out", str(tmp_path / "raw"), "--base-url", lamp_server])
    assert rc == 0
    folder = tmp_path / "raw" / "LaMP_2M"
    assert sorted(p.name for p in folder.iterdir()) == ["dev_outputs.json", "dev_questions.json",
                                                        "train_outputs.json", "train_questions.json"]
    assert (folder / "dev_questions.json").read_bytes() == (FIXTURES / "LaMP_2M_dev_questions.json").read_bytes()


def test_download_missing_file_and_offline_are_clear_errors(tmp_path, lamp_server, capsys):
    assert main(["data", "download", "--task", "LaMP_3", "--out", str(tmp_path), "--base-url", lamp_server]) == 2
    assert "HTTP 404" in capsys.readouterr().err
    assert main(["data", "download", "--task", "LaMP_3", "--out", str(tmp_path), "--base-url",
                 "http://127.0.0.1:9/"]) == 2
    err = capsys.readouterr().err
    assert "cannot download" in err and "by hand" in err
    assert not list((tmp_path / "LaMP_3").glob("*.part"))
