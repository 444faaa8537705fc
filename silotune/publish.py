"""Publishing the final global adapter in PEFT format."""

from __future__ import annotations

import tempfile
from pathlib import Path

from silotune.adapters import AdapterModel, TensorDict
from silotune.config import FederationConfig
from silotune.methods import stacked
from silotune.promotion import holdout_tags
from silotune.records import FederationState
from silotune.store import FederationLayout, ObjectStore, get_tensors
from silotune.tracking import Tracker


def publish_final(
    adapter: AdapterModel,
    state: FederationState,
    store: ObjectStore,
    tracker: Tracker,
    final: TensorDict | None = None,
    *,
    publisher: str | None = None,
) -> str:
    """Write the final global adapter as a PEFT folder to ``federations/<fid>/final/`` and to MLflow.

    Under CKKS a silo (``publisher``) decrypts it and writes to its own prefix,
    ``published/<silo>/<fid>/final/``. Returns the store prefix of the folder.
    ``PeftModel.from_pretrained(base, folder)`` loads it back.
    """
    layout = FederationLayout(state.federation_id)

    def where(name: str) -> str:
        return layout.published(publisher, name) if publisher else layout.final(name)

    if final is None:  # plaintext global; under CKKS a silo decrypts it and passes ``final``
        final = get_tensors(store, state.global_ref.key, expected_sha256=state.global_ref.sha256)
    with tempfile.TemporaryDirectory() as tmp:
        if stacked.is_merged(final):  # a stacked federation: its merged update as an exact LoRA (by SVD)
            folder = stacked.write_lora_folder(
                final, adapter.lora_spec, str(adapter.model_path), Path(tmp) / "adapter"
            )
            adapter.tokenizer.save_pretrained(folder)
        else:
            folder = adapter.save_pretrained(Path(tmp) / "adapter", final)
        for f in sorted(folder.iterdir()):
            if f.is_file():
                store.put(where(f.name), f.read_bytes())
        tracker.log_folder(state.tracking_run_id, folder, "adapter")
    return where("")


def registered_name(config: FederationConfig) -> str:
    """The registered model that receives the federation's final adapter."""
    return config.tracking.registered_model or f"silotune-{config.federation_id}"


def register_final(
    config: FederationConfig,
    state: FederationState,
    tracker: Tracker,
    *,
    artifact_path: str = "adapter",
    kind: str = "lora-adapter",
) -> str | None:
    """Register the published adapter in the model registry with its lineage; returns the version.

    It becomes the champion only through the promotion gate (``tracking.promotion``). A merged export
    (``kind='merged'``, :mod:`silotune.export`) goes to its own registered model, ``<name>-merged``.
    """
    name = registered_name(config) + ("" if kind == "lora-adapter" else f"-{kind}")
    tags = {
        "silotune.federation_id": config.federation_id,
        "silotune.rounds": str(state.completed_rounds),
        "silotune.silos": ",".join(s.name for s in config.silos),
        "silotune.config_hash": config.fingerprint(),
        "silotune.global_sha256": state.global_ref.sha256,
        "silotune.base_model": config.model.name_or_path,
    }
    # The promotion gate compares these with the champion's (silotune.promotion).
    last = state.history[-1] if state.history else None
    tags.update(holdout_tags(last.global_eval if last else None, sorted(last.eval) if last else []))
    return tracker.register_adapter(
        state.tracking_run_id, artifact_path, name, tags, promotion=config.tracking.promotion, kind=kind
    )
