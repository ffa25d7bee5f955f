"""The embedded model's conversion cache: publishing a finished conversion when processes race for it."""
from pathlib import Path

import pytest

from adapters.models import publish_dir


def _conversion(path: Path, tag: str) -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_text(tag)
    (path / "tokenizer.json").write_text(tag)
    return path


def test_publish_moves_the_conversion_into_place(tmp_path):
    tmp = _conversion(tmp_path / "m.partial-a", "a")
    publish_dir(tmp, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_text() == "a" and not tmp.exists()


def test_publish_keeps_the_copy_of_a_process_that_finished_first(tmp_path):
    # two runs of a study converted the model at once: the second must neither fail nor pull the first's
    # copy from under it
    first = _conversion(tmp_path / "m.partial-a", "a")
    second = _conversion(tmp_path / "m.partial-b", "b")
    publish_dir(first, tmp_path / "m")
    publish_dir(second, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_text() == "a"
    assert second.exists()  # left to the caller to remove


def test_publish_replaces_an_unfinished_copy(tmp_path):
    stale = tmp_path / "m"
    stale.mkdir()
    (stale / "config.json").write_text("{}")  # no weights: an interrupted older conversion
    publish_dir(_conversion(tmp_path / "m.partial-a", "a"), stale)
    assert (stale / "model.safetensors").read_text() == "a" and not (stale / "config.json").exists()


def test_publish_reports_a_real_failure(tmp_path):
    with pytest.raises(OSError):
        publish_dir(tmp_path / "missing", tmp_path / "m")


def test_cache_file_is_written_whole_or_not_at_all(tmp_path):
    import torch
    from safetensors.torch import load_file

    from adapters.models import save_cache_file

    path = tmp_path / "stats" / "layer.safetensors"
    save_cache_file({"mom2": torch.eye(2)}, path, metadata={"count": "2"})
    assert torch.equal(load_file(str(path))["mom2"], torch.eye(2))
    with pytest.raises(ValueError):  # safetensors refuses a non-contiguous tensor mid-save
        save_cache_file({"mom2": torch.ones(3, 2).T}, path)
    assert torch.equal(load_file(str(path))["mom2"], torch.eye(2))  # the earlier entry is intact
    assert [p.name for p in path.parent.iterdir()] == ["layer.safetensors"]  # no temp file left behind
