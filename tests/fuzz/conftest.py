"""Shared by the fuzzing modules."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _node_id(request: pytest.FixtureRequest) -> None:
    """schemathesis' pytest plugin renames the test per operation through `node._nodeid`,
    which pytest 9 no longer has: give it one to write to."""
    request.node._nodeid = request.node.nodeid
