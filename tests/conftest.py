"""Shared fixtures: a tiny random LLaMA saved as a local model directory (no downloads)."""
import pytest

from revive_plugin.eval.testing import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    tok = tiny_tokenizer(add_bos=False)
    tok.unk_token = "<pad>"  # easyeditor's FT masks targets with `!= tok.unk_token_id`
    tiny_llama(vocab_size=len(tok), seed=0).save_pretrained(d)
    tok.save_pretrained(d)
    return d
