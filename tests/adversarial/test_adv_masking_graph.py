"""A malicious coordinator announces a masking graph that the round's roster does not fix (issue 14).

Above ``security.secagg_complete_up_to`` silos (default 32) each silo masks only with its k neighbours
of a sparse graph (Bell et al., CCS 2020). A coordinator that could choose the graph would surround a
victim with silos it controls (they hold the victim's shares and masks) or cut it off from honest
ones. Every silo derives the graph itself from the roster it accepted and the round id; the attack
here announces another graph, signed as the coordinator would sign it, and the defence is that the
victim's first protocol step refuses and nothing of the victim's (not even its advert) is written.

No Prefect server is needed: the silo's step runs through ``silotune.protection`` exactly as the
``protocol-step`` task calls it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

N = 40  # above the default complete-graph limit of 32: a sparse graph
VICTIM = "s007"
MALLORY = ("s031", "s032", "s033", "s034")  # silos the attacker controls


def _config(root: Path) -> Any:
    """40 silos; the config pins the coordinator's key, which the attacker holds (it signs its forgery)."""
    from silotune.config import parse_config
    from silotune.crypto.signing import SiloKeyPair, public_key_hex

    keys = root / "coordinator"
    pair = SiloKeyPair.generate()
    pair.save(keys / "coordinator.pem", keys / "coordinator.pub.pem", overwrite=True)
    return parse_config(
        {
            "federation_id": "adv-graph",
            "model": {"name_or_path": "tiny-llama"},
            "silos": [
                {
                    "name": f"s{i:03d}",
                    "train_path": "x.jsonl",
                    "private_dir": str(root / "silos" / f"s{i:03d}"),
                }
                for i in range(N)
            ],
            "security": {
                "protection": "secagg",
                "keys_dir": str(keys),
                "coordinator_key": public_key_hex(pair.public_key),
            },
            "store": {"root": str(root / "store")},
            "tracking": {"kind": "none"},
        }
    )


def _star(cfg: Any) -> bytes:
    """A graph in the format a silo would read, with the victim's neighbours all the attacker's."""
    names = sorted(s.name for s in cfg.silos)
    neighbours = {u: [v for v in names if v != u][:4] for u in names}
    neighbours[VICTIM] = list(MALLORY)
    doc = {
        "v": 1,
        "round": f"{cfg.federation_id}/0",
        "roster": names,
        "kind": "harary",
        "degree": 4,
        "seed": "00" * 32,
        "complete_up_to": 32,
        "neighbours": neighbours,
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _swapped(cfg: Any) -> bytes:
    """The honest graph with one of the victim's honest neighbours swapped for the attacker's silo."""
    from silotune.crypto.secagg import _dumps
    from silotune.protection.secagg import graph_of

    honest = graph_of(cfg, 0)
    doc = json.loads(honest.to_bytes())
    mine = [v for v in doc["neighbours"][VICTIM] if v not in MALLORY]
    doc["neighbours"][VICTIM] = sorted({*doc["neighbours"][VICTIM]} - {mine[0]} | {MALLORY[0]})
    del doc["v"]
    return _dumps(doc)


@pytest.mark.parametrize("forgery", ["star", "swapped"])
def test_announced_graph_other_than_the_rosters_is_refused(tmp_path: Path, forgery: str) -> None:
    from silotune.errors import SilotuneError
    from silotune.protection import run_silo_step
    from silotune.protection.base import sign_object
    from silotune.store import FederationLayout, LocalStore

    cfg = _config(tmp_path)
    store = LocalStore(cfg.store.root)
    layout = FederationLayout(cfg.federation_id)
    key = f"{layout.prefix}/rounds/00000/secagg/graph.json"
    data = _star(cfg) if forgery == "star" else _swapped(cfg)
    store.put(key, data)
    sign_object(cfg, store, key, data, round_=0, purpose="graph")  # the attacker holds the coordinator's key
    assert store.exists(key + ".sig"), "the forgery should carry the coordinator's valid signature"

    with pytest.raises(SilotuneError, match="masking graph"):
        run_silo_step(cfg, VICTIM, 0, "secagg-advertise", store)
    advert = layout.message(0, VICTIM, "secagg/advert")
    assert not store.exists(advert), f"{VICTIM} advertised under a graph the roster does not fix"

    # control: the graph the coordinator announces honestly is accepted, and the silo goes on
    from silotune.federation import open_round

    assert open_round(cfg, store, 0) == [key]
    run_silo_step(cfg, VICTIM, 0, "secagg-advertise", store)
    assert store.exists(advert)
