"""Shared fixtures: a tiny Llama + tokenizer saved to a folder (loadable via `ModelConfig(name=folder)`) and tiny
LaMP_2M task data built in code.

The tiny model has 2 layers and hidden size 32, so a training step or a generation takes milliseconds. Its
byte-level BPE tokenizer is trained here on the fixture texts and carries a ChatML template like SmolLM2's
(`<|im_end|>` closes a turn), so chat templating and end-of-turn handling are exercised as with the real model.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `dtype="auto"` means float32 here on every CPU: the suite's fp32 exactness checks must not change with the CPU's
# bf16 support (tests/test_precision.py covers the measured policy and bf16 runs explicitly).
os.environ.setdefault("OPPU_AUTO_DTYPE", "float32")

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

TAGS = ("comedy", "action", "romance", "classic", "fantasy")
WORDS = ("space", "ship", "love", "city", "dragon", "war", "laugh", "old", "film", "hero", "night", "river")


def _description(i: int, user: int) -> str:
    return " ".join(WORDS[(i * 3 + user + j) % len(WORDS)] for j in range(6))


def make_user(uid: str, n_items: int, n_queries: int, offset: int = 0, dated: bool = True, profile=None):
    """A LaMP_2M user whose tag depends on the item (so there is something to learn); deterministic."""
    from oppu.data import Item, Query, User
    from oppu.tasks import get_task

    task = get_task("LaMP_2M")
    history = tuple(
        Item(id=f"{uid}-h{i}", fields={"description": _description(i, offset), "tag": TAGS[(i + offset) % 3]},
             date=f"2020-01-{i + 1:02d}" if dated else None)
        for i in range(n_items))
    queries = tuple(
        Query(id=f"{uid}-q{j}", input=task.make_input(_description(j + 1, offset)), gold=TAGS[(j + 1 + offset) % 3],
              date="2021-01-01" if dated else None)
        for j in range(n_queries))
    return User(id=uid, history=history, queries=queries, profile_text=profile)


@pytest.fixture(scope="session")
def tiny_users():
    """(train users, test users) of a tiny LaMP_2M dataset; test users have different history sizes."""
    train = tuple(make_user(f"t{i}", 6, 2, offset=i) for i in range(3))
    test = (make_user("alice", 8, 2, offset=1), make_user("bob", 6, 2, offset=2),
            make_user("carol", 4, 1, offset=0, profile="most popular tag: comedy"))
    return train, test


@pytest.fixture(scope="session")
def tiny_task_data(tiny_users):
    from oppu.data import TaskData

    train, test = tiny_users
    return TaskData(task="LaMP_2M", train_users=train, test_users=test, problems=(), source="<tests>",
                    fingerprint="tinyfixture00000")


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory, tiny_users):
    """The tiny dataset written in the OPPU layout: `DATA_DIR/LaMP_2M/...`."""
    from oppu.data import write_oppu

    root = tmp_path_factory.mktemp("data")
    train, test = tiny_users
    write_oppu("LaMP_2M", train, test, root)
    return root


def _corpus(tiny_users) -> list[str]:
    from oppu.tasks import TASKS

    train, test = tiny_users
    texts = [CHATML, "Answer with only the tag. User profile: Past items of this user:"]
    for task in TASKS.values():
        texts += [task.question, task.input_template, task.profile_instruction]
    for user in (*train, *test):
        texts += [" ".join(item.fields.values()) for item in user.history]
        texts += [q.input + " " + (q.gold or "") for q in user.queries]
    return texts


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_users):
    """A 2-layer Llama (hidden 32) and a ChatML byte-level BPE tokenizer, saved with save_pretrained."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_corpus(tiny_users), vocab_size=400, min_frequency=1, special_tokens=specials,
                            show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|im_start|>",
                                        eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                        unk_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
                         initializer_range=0.3)  # large init: outputs vary with the prompt and adapter
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture()
def tiny_model(tiny_model_dir):
    """A freshly loaded tiny (model, tokenizer); function-scoped because tests wrap it in adapters."""
    from oppu.config import ModelConfig
    from oppu.model import load_model

    return load_model(ModelConfig(name=str(tiny_model_dir), device="cpu"))


@pytest.fixture()
def env(tmp_path, monkeypatch, tiny_data_dir):
    """The dashboard's four folders in tmp (what `dashboard.state` reads); data is the tiny LaMP_2M fixture.
    Test modules that need other folders define their own `env`."""
    folders = {"OPPU_DATA": tiny_data_dir, "OPPU_DB": tmp_path / "oppu.duckdb", "OPPU_JOBS": tmp_path / "jobs",
               "OPPU_ARTIFACTS": tmp_path / "artifacts"}
    for name, value in folders.items():
        monkeypatch.setenv(name, str(value))
    return folders


# -- no job worker outlives its test ---------------------------------------------------------------------------
def _job_workers_under(folder: str) -> list[int]:
    """Pids of live `oppu worker` processes whose job root lies under `folder` (their command lines read from
    /proc: Linux only; liveness, zombies and this process's own children included, as the job runner judges it)."""
    from oppu.jobs.lifecycle import pid_alive

    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if ("worker" in argv and "--root" in argv and argv[argv.index("--root") + 1].startswith(folder)
                and pid_alive(int(entry))):
            pids.append(int(entry))
    return pids


@pytest.fixture(autouse=True)
def no_job_worker_left_behind(request, tmp_path_factory):
    """A test that starts job workers waits for them (or cancels them): one left running keeps a core busy
    during the tests after it (a retried job once ran the real pipeline for six minutes in the background,
    slowing every test after it), so it is killed here and the test errors."""
    yield
    if not os.path.isdir("/proc"):
        return
    base = str(tmp_path_factory.getbasetemp())
    deadline = time.monotonic() + 10.0  # a worker writing its last state is given a moment
    while (left := _job_workers_under(base)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:  # a worker leads its own process group (start_new_session); either may be gone already
        for kill in (os.killpg, os.kill):
            with contextlib.suppress(ProcessLookupError):
                kill(pid, signal.SIGKILL)
    if left:
        pytest.fail(f"{request.node.nodeid} left {len(left)} job worker(s) running (killed): wait for them or "
                    "cancel them before the test ends")
