"""Benchmarks of OPPU Studio: each script measures a baseline and the project path in one process."""
