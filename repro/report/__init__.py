"""The report stage: `repro run` (notebook orchestration), notebook execution, rendering, doctor.

Importing this package loads no torch: a notebook group process imports only `notebook_exec`.
"""
