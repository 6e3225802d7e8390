"""Several processes write the results store while another reads it: no lock error, no lost or duplicated row."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from oppu.store import Store

WRITER = textwrap.dedent("""
    import sys
    from oppu.store import Store
    path, writer, batches, per_batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    store = Store(path)
    store.create_run("run-" + writer, {"methods": ["none"]}, task="LaMP_2M", model="m", data_fingerprint="f",
                     code_version="c")
    for b in range(batches):
        rows = [{"run_id": "run-" + writer, "task": "LaMP_2M", "user_id": f"u{b}", "query_id": f"q{i}",
                 "method": "none", "k": 1, "peft": "lora", "retriever": "bm25", "prompt": "p", "raw_output": "o",
                 "output": "o", "gold": "o", "retrieved_ids": ["a"], "retrieved_scores": [1.0],
                 "history_size": b, "correct": 1.0} for i in range(per_batch)]
        store.add_predictions(rows)
        store.add_predictions(rows[: per_batch // 2])  # a resume rewriting half a batch: must not duplicate
        store.add_user_metrics("run-" + writer, f"u{b}", "none", {"accuracy": 1.0}, history_size=b)
        store.add_train_curve("run-" + writer, f"u{b}", "user", [(1, 1.0), (2, 0.5)])
    store.finish_run("run-" + writer, {"none": {"accuracy": 1.0}})
""")

READER = textwrap.dedent("""
    import json, sys, time
    from oppu.store import Store
    store = Store(sys.argv[1])
    print("ready", flush=True)  # the writers start only once the reader is polling
    deadline, expected = time.monotonic() + 60, int(sys.argv[2])
    polls, seen, errors = 0, [], []
    while time.monotonic() < deadline and (not seen or seen[-1] < expected):
        try:
            seen.append(store.counts()["predictions"])
            store.latest_runs(10)
            polls += 1
        except Exception as err:  # the test asserts there are none
            errors.append(repr(err))
        time.sleep(0.01)
    print(json.dumps({"polls": polls, "seen": seen, "errors": errors}))
""")


def test_three_writers_and_a_polling_reader(tmp_path):
    path = str(tmp_path / "shared.duckdb")
    Store(path)
    batches, per_batch, writers = 12, 20, 3
    expected = writers * batches * per_batch
    reader = subprocess.Popen([sys.executable, "-c", READER, path, str(expected)], stdout=subprocess.PIPE, text=True)
    assert reader.stdout.readline().strip() == "ready"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, path, str(w), str(batches), str(per_batch)],
                              stderr=subprocess.PIPE, text=True) for w in range(writers)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    out, _ = reader.communicate(timeout=60)
    report = json.loads(out)
    assert report["errors"] == []
    # The reader polled while the writers ran (how often depends on the machine's load, so only a floor).
    assert report["polls"] >= 3
    assert report["seen"] == sorted(report["seen"])  # a reader never sees rows vanish mid-rewrite
    assert report["seen"][-1] == expected
    store = Store(path)
    assert store.prediction_count() == expected
    counts = store.counts()
    assert counts["runs"] == writers and counts["train_points"] == writers * batches * 2
    for w in range(writers):
        assert store.done_users(f"run-{w}") == {f"u{b}" for b in range(batches)}
        assert store.runs().set_index("run_id").loc[f"run-{w}", "status"] == "done"
