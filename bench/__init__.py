"""Benchmarks: ``python -m bench.overhead``, ``python -m bench.audit_shipper`` (README.md)."""
