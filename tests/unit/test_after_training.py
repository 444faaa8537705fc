"""After the federation: export (PEFT, merged, GGUF) and personalisation at a silo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from silotune.config import dump_config, parse_config
from silotune.errors import ConfigError
from silotune.export import export_federation
from silotune.federation import aggregate_round, commit_round, start_federation, train_silo
from silotune.personalize import compare_on_holdout, personalize_silo
from silotune.store import FederationLayout, LocalStore, get_tensors


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_adapter, demo_data):
    """A one-round federation of the tiny model (one silo), through the library's round functions."""
    tmp = tmp_path_factory.mktemp("after")
    lab = demo_data["lab"]
    cfg = parse_config(
        {
            "federation_id": "after",
            "seed": 3,
            "model": {"name_or_path": "tiny-llama", "max_seq_len": 128},
            "lora": {"r": 4},
            "train": {"local_steps": 3, "batch_size": 4, "learning_rate": 0.05},
            "silos": [
                {
                    "name": "lab",
                    "train_path": str(lab["train"]),
                    "eval_path": str(lab["eval"]),
                    "private_dir": str(tmp / "lab-private"),
                }
            ],
            "evaluation": {"max_examples": 16},
            "store": {"root": str(tmp / "store")},
            "tracking": {"kind": "none"},
        }
    )
    store = LocalStore(cfg.store.root)
    state = start_federation(cfg, store, tiny_adapter)
    rec = train_silo(cfg, "lab", 0, state.global_ref, store, tiny_adapter, progress=False)
    agg = aggregate_round(cfg, store, 0, state.global_ref, [rec])
    commit_round(cfg, store, state, 0, [rec], [], agg)
    final = get_tensors(store, FederationLayout(cfg.federation_id).global_adapter(1))
    return cfg, store, final


@pytest.fixture(scope="module")
def merged_folder(trained, tmp_path_factory) -> Path:
    cfg, store, _ = trained
    return export_federation(cfg, store, tmp_path_factory.mktemp("export") / "merged", fmt="merged")


def _ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer.encode("Classify the note: chest pain on exertion, troponin raised.")])


def test_merged_export_equals_base_plus_adapter(trained, merged_folder: Path, tiny_adapter) -> None:
    from transformers import AutoModelForCausalLM

    _, _, final = trained
    folder = merged_folder
    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = _ids(tiny_adapter.tokenizer)
    tiny_adapter.load_state(final)
    tiny_adapter.model.eval()
    with torch.no_grad():
        expected = tiny_adapter.model(input_ids=ids).logits
        with tiny_adapter.model.disable_adapter():
            base = tiny_adapter.model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert (expected - base).abs().max() > 1e-3  # the adapter changes the model
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not any(k.startswith("base_model") or "lora" in k for k in merged.state_dict())
    assert (folder / "tokenizer.json").is_file()


def _llama_cpp_q_layout(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary layout, written out: within each head, row pairs (i, i + d/2) interleaved."""
    d = w.shape[0] // heads
    out = np.empty_like(w)
    for h in range(heads):
        block = w[h * d : (h + 1) * d]
        out[h * d : (h + 1) * d : 2] = block[: d // 2]
        out[h * d + 1 : (h + 1) * d : 2] = block[d // 2 :]
    return out


# q8_0 only: reading a GGUF back parses its 49k-token vocabulary (seconds); f16 passed the same test
# when it was written, and differs only in the writer's dtype (np.float16 instead of gguf.quants).
@pytest.mark.parametrize("tensor_type", ["q8_0"])
def test_gguf_export_reads_back_as_the_merged_model(
    trained, merged_folder: Path, tmp_path: Path, tensor_type: str
) -> None:
    import gguf
    from transformers import AutoModelForCausalLM

    cfg, store, _ = trained
    merged = AutoModelForCausalLM.from_pretrained(merged_folder, dtype=torch.float32).eval()
    path = export_federation(cfg, store, tmp_path / "gguf", fmt="gguf", tensor_type=tensor_type)
    reader = gguf.GGUFReader(path)
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert (
        fields["llama.block_count"].contents() == 2
        and fields["llama.attention.head_count_kv"].contents() == 2
    )
    assert len(fields["tokenizer.ggml.tokens"].data) == merged.config.vocab_size
    assert "tokenizer.chat_template" in fields
    tensors = {t.name: t for t in reader.tensors}
    hf = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
    }
    for i in range(2):
        for gg, name in {
            "attn_norm": "input_layernorm",
            "attn_q": "self_attn.q_proj",
            "attn_k": "self_attn.k_proj",
            "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj",
            "ffn_norm": "post_attention_layernorm",
            "ffn_gate": "mlp.gate_proj",
            "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj",
        }.items():
            hf[f"blk.{i}.{gg}.weight"] = f"model.layers.{i}.{name}.weight"
    assert set(tensors) == set(hf)  # tied embeddings: no output.weight
    sd = merged.state_dict()
    heads = {"attn_q": merged.config.num_attention_heads, "attn_k": merged.config.num_key_value_heads}
    for name, key in hf.items():
        t = tensors[name]
        want = sd[key].numpy()
        kind = name.split(".")[-2]
        if kind in heads:
            want = _llama_cpp_q_layout(want, heads[kind])
        assert tuple(int(n) for n in reversed(t.shape)) == want.shape, name  # GGUF lists dims innermost first
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        if want.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
        else:
            assert t.tensor_type.name == tensor_type.upper()
        # f16: 2^-11 relative; q8_0: half a step of 1/127 of each 32-block's largest magnitude
        tol = 1e-3 * np.abs(want).max() if tensor_type == "f16" else np.abs(want).max() / 127
        np.testing.assert_allclose(got, want, atol=tol, rtol=0, err_msg=name)


def test_unknown_format_and_unfinished_federation_are_one_line_errors(trained, tmp_path: Path) -> None:
    cfg, store, _ = trained
    with pytest.raises(ConfigError, match="unknown export format 'onnx'; known: peft, merged, gguf"):
        export_federation(cfg, store, tmp_path / "x", fmt="onnx")  # type: ignore[arg-type]
    other = cfg.model_copy(update={"federation_id": "never-ran"})
    with pytest.raises(ConfigError, match="no federation 'never-ran'"):
        export_federation(other, store, tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_personalisation_stays_at_the_silo_and_reports_both(trained, tiny_adapter) -> None:
    cfg, store, _ = trained
    before = {k: store.get(k) for k in store.list("")}
    rec = personalize_silo(cfg, "lab", store, tiny_adapter, steps=4)
    assert {k: store.get(k) for k in store.list("")} == before  # nothing new, nothing changed
    folder = Path(rec.folder)
    assert folder.is_relative_to(Path(cfg.silo("lab").private_folder))
    assert (folder / "adapter_model.safetensors").is_file() and rec.steps == 4
    metrics = compare_on_holdout(cfg, "lab", store, tiny_adapter)
    assert set(metrics) == {"global", "personalized"}
    assert metrics["global"]["num_examples"] == metrics["personalized"]["num_examples"] > 0
    assert metrics["personalized"]["loss"] < metrics["global"]["loss"], metrics
    # The silo's validation file (val.jsonl beside its training file) decided, and the adapter lowered it.
    assert rec.validation_path == str(Path(cfg.silo("lab").train_path).with_name("val.jsonl"))
    assert rec.kept == "personalized" and rec.validation_loss["personalized"] < rec.validation_loss["global"]


def test_personalisation_that_does_not_lower_the_validation_loss_keeps_the_global(
    trained, tiny_adapter, monkeypatch
) -> None:
    """A personalisation that does not lower the loss on the validation file (here: its update zeroed, so
    the two tie) is not kept: the silo keeps the global, and its folder holds exactly the global's tensors.
    (The tiny random model's loss falls under almost any update, so no real run here does worse.)"""
    from safetensors.torch import load as st_load

    import silotune.personalize as personalize_mod

    real = personalize_mod.train_local

    def no_gain(*args, **kw):
        delta, result = real(*args, **kw)
        return {k: torch.zeros_like(v) for k, v in delta.items()}, result

    monkeypatch.setattr(personalize_mod, "train_local", no_gain)
    cfg, store, final = trained
    rec = personalize_silo(cfg, "lab", store, tiny_adapter, steps=3)
    assert rec.kept == "global", rec.validation_loss
    assert rec.validation_loss["personalized"] == rec.validation_loss["global"]
    kept = st_load((personalize_mod.personalized_folder(cfg, "lab") / "state.safetensors").read_bytes())
    assert set(kept) == set(final)
    for k, v in final.items():
        torch.testing.assert_close(kept[k], v, rtol=0, atol=0)
    metrics = compare_on_holdout(cfg, "lab", store, tiny_adapter)
    assert metrics["personalized"] == metrics["global"]
    with pytest.raises(ConfigError, match=r"validation file /nope\.jsonl of silo 'lab' does not exist"):
        personalize_silo(cfg, "lab", store, tiny_adapter, steps=1, validation="/nope.jsonl")


def test_cli_exports_the_peft_adapter(trained, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from cli import app

    cfg, _, final = trained
    dump_config(cfg, tmp_path / "c.yaml")
    args = ["export", str(tmp_path / "c.yaml"), "--format", "peft", "--out", str(tmp_path / "peft")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    saved = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert (tmp_path / "peft" / "adapter_config.json").is_file() and len(saved) == len(final)
    for key, value in final.items():
        torch.testing.assert_close(saved[key], value, rtol=0, atol=0)
    res = CliRunner().invoke(app, [*args[:2], "--format", "onnx"])
    assert res.exit_code == 2 and "unknown export format 'onnx'" in res.output


def test_a_registered_version_carries_the_merged_export(trained, merged_folder: Path, tmp_path: Path) -> None:
    import shutil

    from silotune.export import register_merged
    from silotune.federation import load_state, save_state
    from silotune.tracking import MlflowTracker

    cfg, store, _ = trained
    shutil.copytree(cfg.store.root, tmp_path / "store")
    tracking = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "artifact_root": str(tmp_path / "art")}
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"kind": "mlflow", **tracking})})
    store = LocalStore(tmp_path / "store")
    tracker = MlflowTracker(cfg.tracking)
    state = load_state(store, cfg.federation_id)
    save_state(store, state.model_copy(update={"tracking_run_id": tracker.start(cfg, None)}))
    version = register_merged(cfg, store, merged_folder, tracker)
    mv = tracker.client.get_model_version("silotune-after-merged", version)
    assert (
        mv.tags["silotune.promotion"] == "champion"
        and mv.tags["silotune.global_sha256"] == state.global_ref.sha256
    )
    files = {Path(f.path).name for f in tracker.client.list_artifacts(mv.run_id, "merged")}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= files
