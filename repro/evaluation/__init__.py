"""Evaluation: predictions -> metrics, bootstrap and permutation statistics, verdicts, report tables, figures."""
