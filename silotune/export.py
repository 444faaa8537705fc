"""Exporting a federation's final global model for serving: a PEFT folder, a merged model, or GGUF.

- ``peft``: the adapter folder, ``PeftModel.from_pretrained(base, folder)`` loads it (vLLM serves LoRA
  adapters in this format);
- ``merged``: a full Hugging Face model folder with the adapter merged into the base weights
  (``AutoModelForCausalLM.from_pretrained(folder)``; any serving stack);
- ``gguf``: the merged model as one GGUF file for llama.cpp, written with the ``gguf`` package's
  writer: Llama tensor names (``gguf.TensorNameMap``), the Q/K row permutation llama.cpp's own
  converter applies, the tokenizer metadata copied from a base GGUF file (for the built-in models the
  SmolLM2 GGUF they were converted from), and f16 or q8_0 weights (norms stay f32, as llama.cpp's
  converter keeps them).

The final adapter is rebuilt from the federation's stored global, checked against the sha256 that the
federation's state records (under CKKS: the publishing silo's decrypted folder). Every output is
written to a temporary sibling and renamed into place: a stopped export leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from silotune.adapters import AdapterModel
from silotune.config import FederationConfig
from silotune.errors import ConfigError, StoreError
from silotune.federation.commit import load_state
from silotune.methods import get_method, stacked
from silotune.methods.base import Payload
from silotune.methods.peft_methods import merge_adapter
from silotune.modeling import BUILTIN_MODELS, cache_root, load_tokenizer, resolve_model_path, smollm2_gguf
from silotune.protection import scheme_for
from silotune.publish import register_final
from silotune.store import FederationLayout, ObjectStore, get_tensors
from silotune.tracking import Tracker

ExportFormat = Literal["peft", "merged", "gguf"]
GgufType = Literal["f16", "q8_0"]
FORMATS: tuple[str, ...] = ("peft", "merged", "gguf")
GGUF_TYPES: tuple[str, ...] = ("f16", "q8_0")


@contextmanager
def _atomic_path(dest: Path) -> Iterator[Path]:
    """A temporary sibling of ``dest`` that replaces it only when the block completes."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent)) / dest.name
    try:
        yield tmp
        if dest.is_dir():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def write_final_adapter(config: FederationConfig, store: ObjectStore, dest: Path) -> Path:
    """The federation's latest global adapter as a PEFT folder at ``dest`` (checked against its sha256)."""
    state = load_state(store, config.federation_id)
    if state is None:
        raise ConfigError(f"no federation {config.federation_id!r} in {store.describe()}")
    if state.completed_rounds == 0:
        raise ConfigError(f"federation {config.federation_id!r} has completed no round: nothing to export")
    with _atomic_path(dest) as tmp:
        if scheme_for(config).publishes_at_silo:  # CKKS: only the publishing silo could decrypt it
            prefix = FederationLayout(config.federation_id).published(config.ckks_publisher, "")
            keys = [k for k in store.list(prefix) if not k.endswith("/")]
            if not keys:
                raise StoreError(
                    f"no published adapter under {prefix}: the publishing silo has not published"
                )
            tmp.mkdir()
            for key in keys:
                (tmp / key.rsplit("/", 1)[-1]).write_bytes(store.get(key))
        else:
            tensors = get_tensors(store, state.global_ref.key, expected_sha256=state.global_ref.sha256)
            if stacked.is_merged(tensors):  # a stacked federation: its merged update as an exact LoRA
                base = resolve_model_path(config.model.name_or_path)
                stacked.write_lora_folder(tensors, config.lora, str(base), tmp)
                load_tokenizer(base).save_pretrained(tmp)
            else:
                adapter = AdapterModel.create(config.model, config.lora, seed=0, method=config.method)
                adapter.save_pretrained(tmp, tensors)
    return dest


def merged_model(config: FederationConfig, adapter_dir: Path) -> Any:
    """The base model (float32) with the adapter in ``adapter_dir`` merged into its weights."""
    method = get_method(config.method.name)
    base_path = resolve_model_path(config.model.name_or_path)
    if method.payload is not Payload.ADAPTER:
        raise ConfigError(
            f"method {config.method.name!r} exchanges {method.payload.value}, not an adapter: "
            "export it with --format peft (the trained model folder)"
        )
    return merge_adapter(adapter_dir, base_path)


def write_merged(config: FederationConfig, adapter_dir: Path, dest: Path) -> Path:
    """A Hugging Face model folder with the adapter merged in, and the base model's tokenizer."""
    from transformers import AutoTokenizer  # ~1 s to import

    model = merged_model(config, adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(config.model.name_or_path))
    with _atomic_path(dest) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return dest


def permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's rotary layout (halves) → llama.cpp's (interleaved pairs), per head.

    The same row permutation as ``LlamaModel.permute`` in llama.cpp's ``convert_hf_to_gguf.py``.
    """
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _rope_theta(cfg: Any) -> float:
    theta = getattr(cfg, "rope_theta", None)
    params = getattr(cfg, "rope_parameters", None) or {}
    if theta is None:
        theta = params.get("rope_theta", 10000.0)
    if (params.get("rope_type") or "default") != "default":
        raise ConfigError(f"GGUF export supports plain RoPE only, not rope parameters {params}")
    return float(theta)


def gguf_tensors(model: Any) -> dict[str, np.ndarray]:
    """The merged Llama model's weights under llama.cpp's tensor names (float32, Q/K permuted)."""
    import gguf  # only GGUF exports need it

    cfg = model.config
    if cfg.model_type != "llama":
        raise ConfigError(f"GGUF export supports Llama-architecture models, not {cfg.model_type!r}")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    out: dict[str, np.ndarray] = {}
    for key, value in model.state_dict().items():
        if cfg.tie_word_embeddings and key == "lm_head.weight":
            continue  # llama.cpp uses token_embd when there is no output tensor
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConfigError(f"GGUF export: no llama.cpp name for tensor {key!r}")
        data = value.detach().to(torch.float32).cpu().numpy()
        if key.endswith("q_proj.weight"):
            data = permute_qk(data, cfg.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            data = permute_qk(data, cfg.num_key_value_heads)
        out[name] = data
    return out


def tokenizer_fields(path: Path) -> dict[str, tuple[int, int | None, Any]]:
    """The ``tokenizer.*`` metadata of a GGUF file: name → (value type, array item type, value).

    Parsing a GGUF file's 100k vocabulary strings takes seconds, so the fields are kept as JSON in
    silotune's cache, keyed by the file's path, size and modification time (converted once, like the
    built-in model itself).
    """
    import gguf  # only GGUF exports need it

    st = Path(path).stat()
    key = hashlib.sha256(f"{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_root() / "gguf-tokenizers" / f"{key}.json"
    if cached.is_file():
        return {k: (v[0], v[1], v[2]) for k, v in json.loads(cached.read_text()).items()}
    fields: dict[str, tuple[int, int | None, Any]] = {}
    for field in gguf.GGUFReader(path).fields.values():
        if field.name.startswith("tokenizer."):
            sub = int(field.types[1]) if field.types[0] == gguf.GGUFValueType.ARRAY else None
            fields[field.name] = (int(field.types[0]), sub, field.contents())
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}")
    tmp.write_text(json.dumps(fields))
    os.replace(tmp, cached)
    return fields


def write_gguf(
    config: FederationConfig,
    model: Any,
    dest: Path,
    *,
    tensor_type: GgufType = "f16",
    tokenizer_gguf: Path | None = None,
) -> Path:
    """One GGUF file of the merged model that llama.cpp loads (architecture ``llama``)."""
    import gguf  # only GGUF exports need it

    if tensor_type not in GGUF_TYPES:
        raise ConfigError(f"unknown GGUF tensor type {tensor_type!r}; known: {', '.join(GGUF_TYPES)}")
    if tokenizer_gguf is None:
        if config.model.name_or_path not in BUILTIN_MODELS:
            raise ConfigError(
                "GGUF export needs the tokenizer of a GGUF file of the base model (--tokenizer-gguf) for "
                f"{config.model.name_or_path!r}; the built-in models use the SmolLM2 GGUF they came from"
            )
        tokenizer_gguf = smollm2_gguf()
    cfg = model.config
    tensors = gguf_tensors(model)
    fields = tokenizer_fields(tokenizer_gguf)
    size = len(fields.get("tokenizer.ggml.tokens", (0, None, []))[2])
    if size != tensors["token_embd.weight"].shape[0]:
        raise ConfigError(
            f"{tokenizer_gguf}: its tokenizer has {size} tokens, the model's embedding "
            f"{tensors['token_embd.weight'].shape[0]} rows: not the base model's tokenizer"
        )
    qtype = gguf.GGMLQuantizationType.Q8_0 if tensor_type == "q8_0" else gguf.GGMLQuantizationType.F16
    file_type = gguf.LlamaFileType.MOSTLY_Q8_0 if tensor_type == "q8_0" else gguf.LlamaFileType.MOSTLY_F16
    with _atomic_path(dest) as tmp:
        writer = gguf.GGUFWriter(tmp, arch="llama")
        writer.add_name(f"silotune {config.federation_id}")
        writer.add_context_length(cfg.max_position_embeddings)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_block_count(cfg.num_hidden_layers)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_head_count(cfg.num_attention_heads)
        writer.add_head_count_kv(cfg.num_key_value_heads)
        writer.add_rope_dimension_count(
            getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        )
        writer.add_rope_freq_base(_rope_theta(cfg))
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_file_type(int(file_type))
        for name, (vtype, sub, value) in fields.items():
            writer.add_key_value(
                name,
                value,
                gguf.GGUFValueType(vtype),
                sub_type=gguf.GGUFValueType(sub) if sub is not None else None,
            )
        for name, data in tensors.items():
            # 1-D tensors (norms) and rows not a multiple of the quant block stay float32, as in llama.cpp
            if data.ndim == 1:
                writer.add_tensor(name, data.astype(np.float32))
            elif qtype == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(name, data.astype(np.float16))
            elif data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
                writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
            else:
                writer.add_tensor(name, data.astype(np.float16))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return dest


def export_federation(
    config: FederationConfig,
    store: ObjectStore,
    out: Path,
    *,
    fmt: ExportFormat = "peft",
    tensor_type: GgufType = "f16",
    tokenizer_gguf: Path | None = None,
) -> Path:
    """Export the final global model to ``out``: a folder, or for gguf ``out/<id>.<type>.gguf``."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; known: {', '.join(FORMATS)}")
    out = Path(out)
    if fmt == "peft":
        return write_final_adapter(config, store, out)
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir = write_final_adapter(config, store, Path(tmp) / "adapter")
        if fmt == "merged":
            return write_merged(config, adapter_dir, out)
        model = merged_model(config, adapter_dir)
    return write_gguf(
        config,
        model,
        out / f"{config.federation_id}.{tensor_type}.gguf",
        tensor_type=tensor_type,
        tokenizer_gguf=tokenizer_gguf,
    )


def register_merged(
    config: FederationConfig, store: ObjectStore, folder: Path, tracker: Tracker
) -> str | None:
    """Log a merged export to the federation's MLflow run and register it as a version of
    ``<registered model>-merged`` (through the same promotion gate as the adapter); returns the version."""
    state = load_state(store, config.federation_id)
    if state is None or state.tracking_run_id is None:
        raise ConfigError(
            f"federation {config.federation_id!r} has no MLflow run to register the export with"
        )
    tracker.log_folder(state.tracking_run_id, folder, "merged")
    return register_final(config, state, tracker, artifact_path="merged", kind="merged")
