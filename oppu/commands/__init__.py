"""CLI command modules: each parses its arguments and calls the core; no logic of its own."""
