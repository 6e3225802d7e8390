"""OPPU Studio core: One PEFT Per User (Tan et al., EMNLP 2024) for the LaMP benchmark.

Modules are nouns, each owning one thing; nothing here imports Streamlit. Heavy libraries (torch, transformers)
are imported lazily by the modules that need them, so the CLI and the dashboard start fast.
"""

__version__ = "0.1.0"
