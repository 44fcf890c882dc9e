"""The bottom layer: types every capability shares (errors, the request, settings, time).

Nothing here imports a capability package; `tests/test_layers.py` fails if anything does, or if
any two packages of `bastion` import each other in a cycle.
"""
