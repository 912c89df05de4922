"""Fixtures the test files share: a run store per test module and a model hub that is never asked."""

from __future__ import annotations

import pytest

from nbtune.store import RunStore


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> RunStore:
    """An empty run store of this test module (its runs are shared by the module's tests)."""
    return RunStore(tmp_path_factory.mktemp("store"))


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No request to the model hub: what needs one fails instead of waiting on the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading any model (base or trained) fails the test."""
    from nbtune import models, training

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(training, "load_trained_model", refuse)
