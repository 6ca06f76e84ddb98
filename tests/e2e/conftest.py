"""Fixtures for the local-stack tests: a moto server on loopback shared by the module's tests."""

import pytest

from localstack.moto import MotoServer


@pytest.fixture(scope="module")
def moto_server():
    server = MotoServer().start()
    yield server
    server.stop()


@pytest.fixture
def aws(moto_server):
    """A moto server emptied for this test."""
    moto_server.reset()
    return moto_server
