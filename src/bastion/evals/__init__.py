"""Evals through the gateway: suites, scorers, runs stored in the database, comparisons with
paired bootstrap confidence intervals (docs/evals.md)."""
