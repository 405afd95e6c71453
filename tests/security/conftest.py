"""`token`: the process's security configured with a token (TOKEN) for the test, restored after."""

from __future__ import annotations

import pytest

from fabric import security

TOKEN = "security-test-token"


@pytest.fixture
def token():
    saved = security.current()
    security.configure(security.SecurityConfig(token=TOKEN))
    yield TOKEN
    security.configure(saved)
