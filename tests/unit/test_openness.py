"""Model descriptors and the paper's Table 1 as config validation."""

from __future__ import annotations

import pytest

from silotune.config import _PLACEMENT_FIELDS, parse_config
from silotune.errors import ConfigError
from silotune.openness import (
    BUILTIN_DESCRIPTORS,
    PRIVACY_REASON,
    Openness,
    check_licence,
    check_table1,
    resolve_descriptor,
)


def _cfg(**over):
    base = {
        "federation_id": "f",
        "model": {"name_or_path": "tiny-llama"},
        "silos": [{"name": "a", "train_path": "a.jsonl"}],
        "tracking": {"kind": "none"},
    }
    base.update(over)
    return base


def test_smollm2_is_open_source_apache_with_open_data() -> None:
    d = resolve_descriptor("smollm2-135m-instruct", None)
    assert d.openness is Openness.OPEN_SOURCE and d.licence == "Apache-2.0" and d.open_training_data
    assert resolve_descriptor("/some/local/folder", None).openness is Openness.OPEN_WEIGHT


@pytest.mark.parametrize(
    ("descriptor", "method", "objective", "allowed"),
    [
        ("llama-3.1-8b", "full", "sft", True),
        ("llama-3.1-8b", "qlora", "dpo", True),
        ("hosted-finetune-api", "full", "sft", False),
        ("hosted-finetune-api", "lora", "sft", True),  # partial: exactly what the provider exposes
        ("hosted-finetune-api", "ia3", "sft", False),
        ("hosted-finetune-api", "lora", "dpo", False),  # RLHF/DPO: ✗ on gray-box
        ("chat-api", "prompt_tuning", "sft", False),
        ("chat-api", "lora", "sft", False),
    ],
)
def test_table1(descriptor: str, method: str, objective: str, allowed: bool) -> None:
    assert (check_table1(BUILTIN_DESCRIPTORS[descriptor], method, objective) == []) is allowed


def test_config_refuses_weights_methods_on_closed_models_with_reasons() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(
            _cfg(model={"name_or_path": "tiny-llama", "descriptor": "chat-api"}, method={"name": "full"})
        )
    msg = str(err.value)
    assert (
        "full fine-tuning (full) needs the model's weights, which a black-box model (chat-api) does not expose"
        in msg
    )
    assert "refusing to use the remote model" in msg and "never leaves the silo" in msg


def test_config_refuses_sending_silo_data_to_a_remote_api() -> None:
    with pytest.raises(
        ConfigError, match=r"refusing to use the remote model https://api\.example\.com/v1"
    ) as err:
        parse_config(_cfg(model={"name_or_path": "https://api.example.com/v1"}))
    assert PRIVACY_REASON[:60] in str(err.value)
    # A gray-box provider's fine-tuning API is refused for the same reason, even for a method it offers.
    with pytest.raises(ConfigError, match="hosted-finetune-api \\(provider\\)"):
        parse_config(_cfg(model={"name_or_path": "x", "descriptor": "hosted-finetune-api"}))


def test_inline_descriptor_and_unknown_name() -> None:
    cfg = parse_config(
        _cfg(
            model={
                "name_or_path": "tiny-llama",
                "descriptor": {
                    "openness": "open-weight",
                    "licence": "custom",
                    "permissive": False,
                    "weights": "local",
                },
            }
        )
    )
    assert cfg.model.descriptor["licence"] == "custom"
    with pytest.raises(ConfigError, match="unknown model descriptor 'gpt-9'; known: chat-api"):
        parse_config(_cfg(model={"name_or_path": "tiny-llama", "descriptor": "gpt-9"}))


def test_llama_700m_monthly_user_clause() -> None:
    d = BUILTIN_DESCRIPTORS["llama-3.1-8b"]
    assert check_licence(d, monthly_active_users=1e6) == []
    (p,) = check_licence(d, monthly_active_users=800e6)
    assert "700 million monthly active users" in p
    assert (
        check_licence(BUILTIN_DESCRIPTORS["mistral-7b"], monthly_active_users=800e6, permissive_only=True)
        == []
    )


def test_default_config_fingerprint_is_unchanged_by_the_new_fields() -> None:
    """Federations started before methods/objectives/descriptors existed still resume."""
    import hashlib
    import json

    cfg = parse_config(_cfg())
    payload = cfg.model_dump(
        mode="json",
        exclude={"rounds", "tracking", "tags", "evaluation", "store", "method", "objective", "orchestration"},
    )
    payload["model"].pop("descriptor")
    payload["security"].pop("coordinator_key"), payload["security"].pop("publisher")
    payload["security"].pop("secagg_complete_up_to")  # sparse masking graph, added later
    for s in payload["silos"]:
        s.pop("method"), s.pop("objective"), s.pop("public_key"), s.pop("device")
    payload["aggregation"].pop("silos_per_round")  # client sampling, added later
    payload["aggregation"].pop("lora_merge")  # stacking of LoRA ranks, added later
    payload["aggregation"].pop("algorithm")  # SCAFFOLD, added later
    for key in [*_PLACEMENT_FIELDS, "device"]:  # placement and speed levers, added later
        payload["train"].pop(key, None)
    old = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    assert cfg.fingerprint() == old
    assert parse_config(_cfg(method={"name": "qlora"})).fingerprint() != old
