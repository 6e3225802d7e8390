"""Benchmarks of OPPU Studio: each script measures a baseline and the project path in one process (bench.versus:
one run of an older version of the code and one of the working tree, each in its own process, one after the
other)."""
