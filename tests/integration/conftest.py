from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def prefect_api():
    """A temporary Prefect API on 127.0.0.1 with its own database, for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
