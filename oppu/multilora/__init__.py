"""Many users' LoRA adapters served and trained in ONE batch: gathered multi-LoRA layers.

- `layer.py`: the per-module maths (`MultiLoraLinear`: a frozen `nn.Linear` plus stacked per-slot factors, each
  batch row routed to its own slot), LoRA dropout, the factors' dtype;
- `model.py`: the model surgery (`MultiLora`): slots by name, routing, PEFT-format state dicts and folders;
- `decode.py`: batched, KV-cached generation of a mixed-user batch (`generate_ids`, `generate_multi`);
- `train.py`: the multi-user batched trainer (`train_users_batched`, and `train_users`, a drop-in for
  `oppu.train.train_users`), every user's adapter as if trained alone.

Llama-style causal LMs (a decoder at `model.get_decoder()`, a linear `lm_head`) are what this is written and
tested for. No I/O besides adapter folders; no Streamlit.
"""

from oppu.multilora.decode import Pick, generate_ids, generate_multi, greedy, sampler
from oppu.multilora.layer import MultiLoraError, MultiLoraLinear, factor_dtype
from oppu.multilora.model import NO_ADAPTER, MultiLora
from oppu.multilora.train import TrainExample, row_seed, train_users, train_users_batched
from oppu.train import IGNORE_INDEX, linear_schedule, make_batches

__all__ = ["IGNORE_INDEX", "NO_ADAPTER", "MultiLora", "MultiLoraError", "MultiLoraLinear", "Pick", "TrainExample",
           "factor_dtype", "generate_ids", "generate_multi", "greedy", "linear_schedule", "make_batches", "row_seed",
           "sampler", "train_users", "train_users_batched"]
