"""Shared fixtures: a tiny random LLaMA saved as a local model directory (no downloads)."""
import pytest
import torch

from revive_plugin.eval.testing import save_tiny_llama


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def enabled(tmp_path, monkeypatch):
    """enable_easyedit() on the CPU with a fresh $REVIVE_CACHE for the test; disabled afterwards."""
    from revive_plugin.adapters import easyedit

    monkeypatch.setenv("REVIVE_CACHE", str(tmp_path / "cache"))
    easyedit.enable_easyedit(device="cpu")
    yield
    easyedit.disable_easyedit()


@pytest.fixture(scope="module")
def one_thread():
    """The tiny model gains nothing from threads, and on a busy 2-core box they make it 10x slower.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
