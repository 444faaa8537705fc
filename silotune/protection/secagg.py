"""Secure aggregation: pairwise masks (Bonawitz et al., CCS 2017), held against an active coordinator.

The cryptography is :mod:`silotune.crypto.secagg`; this module moves its messages through the
store and signs them. What makes it hold when the coordinator lies:

- The roster is pinned: the configured silos (whose keys the config pins and every silo signed
  through its acceptance of the config's fingerprint). The threshold ``t`` comes from the roster's
  size, never from how many adverts the coordinator shows. A silo reads adverts and shares only at
  the exact keys of roster members, and each must carry that member's signature.
- The survivor set is signed by the coordinator (when the config pins its key), and each silo
  answers at most one survivor set per round: its state is claimed under an exclusive lock and
  records the set it answered. With ``t > n/2`` the coordinator can never gather ``t`` answers
  treating a silo as dropped and ``t`` treating it as alive.
- Unmask answers are signed; the coordinator takes only roster members' answers.
- The masking graph (who masks with whom: every pair up to ``security.secagg_complete_up_to``
  silos, else a Harary graph of degree O(log n), Bell et al., CCS 2020) is derived by every silo
  from the round's roster and id (:func:`silotune.crypto.secagg.masking_graph`), never received.
  The coordinator announces it, signed, at ``rounds/<r>/secagg/graph.json`` and records it in the
  round's manifest; a silo refuses the round when the announced graph differs from its own
  derivation (a coordinator that announces none changes nothing: the silo masks over its own).
  A silo reads adverts and shares only from its neighbours and masks with them only.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from silotune.adapters import TensorDict
from silotune.aggregation import ClientUpdate, check_update
from silotune.aggregation.sampling import silos_of_round
from silotune.config import FederationConfig
from silotune.crypto.secagg import (
    MaskedUpdate,
    MaskingGraph,
    SecAggClient,
    SecAggParams,
    masking_graph,
    unmask_sum,
)
from silotune.errors import SilotuneError, StoreError, UpdateError
from silotune.keys import write_private
from silotune.protection.base import (
    AggregateRecord,
    AggregationJob,
    ObjectRef,
    ProtocolRefusal,
    SiloContext,
    check_weight,
    put_signed,
    read_json_object,
    read_signed,
    require_quorum,
    sign_object,
    uniform_weight,
    verify_coordinator,
)
from silotune.protection.none import read_plain_global, step_server, update_template
from silotune.store import FederationLayout, ObjectStore, get_tensors

MAX_MESSAGE_BYTES = 1 << 20  # adverts, shares and unmask answers are a few hundred bytes each
MAX_GRAPH_BYTES = 1 << 26  # the announced graph lists n * k names: ~35 kB at 128 silos, ~0.4 MB at 1,000

ADVERT, SHARES, UNMASK = "secagg/advert", "secagg/shares", "secagg/unmask"


def params_of(config: FederationConfig) -> SecAggParams:
    """The encoding for this federation: headroom for its number of silos (at least 64, as before)."""
    return SecAggParams(
        max_dropout_fraction=config.security.secagg_max_dropout, max_silos=max(64, len(config.silos))
    )


def round_id(config: FederationConfig, round_: int) -> str:
    return f"{config.federation_id}/{round_}"


def _roster(config: FederationConfig, round_: int) -> list[str]:
    """The round's roster: the configured silos, or the round's sample, as each silo draws it itself."""
    return silos_of_round(config, round_)


def graph_of(config: FederationConfig, round_: int) -> MaskingGraph:
    """The round's masking graph, from the roster and round id alone (silos and coordinator alike)."""
    return masking_graph(
        _roster(config, round_),
        round_id(config, round_),
        complete_up_to=config.security.secagg_complete_up_to,
    )


def _check_announced_graph(ctx: SiloContext, own: MaskingGraph) -> None:
    """Refuse the round if the coordinator announced a masking graph other than the silo's own."""
    key = ctx.layout.masking_graph(ctx.round)
    if not ctx.store.exists(key):
        return  # nothing announced: the silo masks over the graph it derived, as it always does
    try:
        data = ctx.store.get_bounded(key, MAX_GRAPH_BYTES)
        verify_coordinator(ctx.config, ctx.store, key, data, round_=ctx.round, purpose="graph")
        own.check_told(data, ctx.silo)
    except SilotuneError as exc:
        raise ProtocolRefusal(f"silo {ctx.silo!r} refuses round {ctx.round + 1}: {exc}") from None


def _state_path(ctx: SiloContext) -> Path:
    return ctx.vault.secagg_path(ctx.config.federation_id, ctx.round)


@contextmanager
def _claimed(ctx: SiloContext) -> Iterator[Path]:
    """The silo's state file of this round, held under an exclusive lock (one step at a time).

    Two concurrent runs of a step (a coordinator asking twice at once) would otherwise both read
    the state before either wrote what it answered.
    """
    path = _state_path(ctx)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _load(ctx: SiloContext, path: Path) -> SecAggClient:
    if not path.is_file():
        raise UpdateError(ctx.silo, f"no secure-aggregation state for round {ctx.round + 1}: advertise first")
    return SecAggClient.from_state(path.read_bytes())


def _read_peer(
    config: FederationConfig, store: ObjectStore, round_: int, peer: str, name: str, purpose: str
) -> bytes | None:
    """``peer``'s message at its exact key, its signature checked; None when it sent none."""
    key = FederationLayout(config.federation_id).message(round_, peer, name)
    if not store.exists(key):
        return None
    return read_signed(
        config, store, key, signer=peer, round_=round_, purpose=purpose, max_bytes=MAX_MESSAGE_BYTES
    )


def adverts(
    config: FederationConfig, store: ObjectStore, round_: int, among: Sequence[str] | None = None
) -> dict[str, bytes]:
    """The roster members' signed adverts of this round (an unsigned or forged one raises).

    ``among``: only these roster members' (a silo reads its holders' only: O(k) reads, not O(n)).
    """
    out = {}
    for peer in _roster(config, round_):
        if among is not None and peer not in among:
            continue
        blob = _read_peer(config, store, round_, peer, ADVERT, "advert")
        if blob is not None:
            out[peer] = blob
    return out


def read_survivors(config: FederationConfig, store: ObjectStore, round_: int) -> list[str]:
    key = FederationLayout(config.federation_id).survivors(round_)
    data = store.get_bounded(key, MAX_MESSAGE_BYTES)
    verify_coordinator(config, store, key, data, round_=round_, purpose="survivors")
    survivors = read_json_object(data, key)
    if not isinstance(survivors, list) or not all(isinstance(s, str) for s in survivors):
        raise StoreError(f"{key}: expected a list of silo names")
    return survivors


class SecAggScheme:
    name: ClassVar[str] = "secagg"
    extension: ClassVar[str] = "masked"
    steps_before_upload: ClassVar[tuple[str, ...]] = ("secagg-advertise", "secagg-share")
    steps_after_upload: ClassVar[tuple[str, ...]] = ("secagg-unmask",)
    publishes_at_silo: ClassVar[bool] = False

    # -- silo side ------------------------------------------------------------------------------

    def advertise(self, ctx: SiloContext) -> str:
        """Phase 0: fresh keys for this round; the signed advert goes to the silo's message prefix."""
        client = SecAggClient(
            ctx.silo,
            round_id=round_id(ctx.config, ctx.round),
            params=params_of(ctx.config),
            roster=ctx.roster,
            complete_up_to=ctx.config.security.secagg_complete_up_to,
        )
        _check_announced_graph(ctx, client.graph)
        advert = client.advertise()
        with _claimed(ctx) as path:
            write_private(path, client.state_bytes())
        key = ctx.layout.message(ctx.round, ctx.silo, ADVERT)
        put_signed(ctx, key, advert, purpose="advert")
        return key

    def share(self, ctx: SiloContext) -> list[str]:
        """Phase 1: encrypted Shamir shares of its secrets for each neighbour that advertised."""
        with _claimed(ctx) as path:
            client = _load(ctx, path)
            _check_announced_graph(ctx, client.graph)  # checked again: nothing secret has left yet
            try:
                received = adverts(ctx.config, ctx.store, ctx.round, among=client.graph.holders(ctx.silo))
            except SilotuneError as exc:
                raise ProtocolRefusal(f"silo {ctx.silo!r} refuses to share keys: {exc}") from None
            out = client.share_keys(received)
            write_private(path, client.state_bytes())
        keys = []
        for peer, blob in sorted(out.items()):
            key = ctx.layout.message(ctx.round, ctx.silo, f"{SHARES}/{peer}")
            put_signed(ctx, key, blob, purpose="share")
            keys.append(key)
        return keys

    def _inbox(self, ctx: SiloContext) -> dict[str, bytes]:
        """The share messages addressed to this silo by its neighbours (only they may send one)."""
        inbox = {}
        neighbours = graph_of(ctx.config, ctx.round).neighbours[ctx.silo]
        for peer in ctx.roster:
            if peer == ctx.silo or peer not in neighbours:
                continue
            blob = _read_peer(ctx.config, ctx.store, ctx.round, peer, f"{SHARES}/{ctx.silo}", "share")
            if blob is not None:
                inbox[peer] = blob
        return inbox

    def pack(self, ctx: SiloContext, delta: TensorDict) -> bytes:
        """Phase 2: the masked update (the silo weights itself by 1/len(silos))."""
        inbox = self._inbox(ctx)
        with _claimed(ctx) as path:
            client = _load(ctx, path)
            blob = client.mask_update(delta, inbox, weight=uniform_weight(ctx.config, ctx.round))
            write_private(path, client.state_bytes())
        return blob

    def unmask(self, ctx: SiloContext) -> str | None:
        """Phase 3: the shares that remove the survivors' masks, for one survivor set only."""
        survivors = read_survivors(ctx.config, ctx.store, ctx.round)
        if ctx.silo not in survivors:
            return None
        stray = sorted(set(survivors) - set(ctx.roster))
        if stray:
            raise ProtocolRefusal(f"silo {ctx.silo!r}: survivors {stray} are not silos of this federation")
        if len(set(survivors)) < ctx.config.aggregation.min_silos:
            # A smaller sum would carry fewer client-DP noise shares than the silo calibrated for.
            raise ProtocolRefusal(
                f"silo {ctx.silo!r}: {len(set(survivors))} survivor(s), below the federation's quorum "
                f"of {ctx.config.aggregation.min_silos}: refusing to unmask"
            )
        with _claimed(ctx) as path:
            client = _load(ctx, path)
            response = client.unmask(survivors)  # raises for a second, different survivor set
            write_private(path, client.state_bytes())
        key = ctx.layout.message(ctx.round, ctx.silo, UNMASK)
        put_signed(ctx, key, response, purpose="unmask")
        return key

    def run_step(self, ctx: SiloContext, stage: str) -> dict[str, Any]:
        if stage == "secagg-advertise":
            return {"keys": [self.advertise(ctx)]}
        if stage == "secagg-share":
            return {"keys": self.share(ctx)}
        if stage == "secagg-unmask":
            key = self.unmask(ctx)
            return {"keys": [key] if key else []}
        raise ValueError(f"secure aggregation has no silo step {stage!r}")

    def read_global(self, ctx: SiloContext, ref: ObjectRef) -> tuple[TensorDict, int]:
        return read_plain_global(ctx, ref)

    # -- coordinator side -------------------------------------------------------------------------

    def open_round(self, config: FederationConfig, store: ObjectStore, round_: int) -> list[str]:
        """Announce the round's masking graph (signed), which every silo checks against its own."""
        key = FederationLayout(config.federation_id).masking_graph(round_)
        data = graph_of(config, round_).to_bytes()
        store.put(key, data)
        sign_object(config, store, key, data, round_=round_, purpose="graph")
        return [key]

    def close_upload(
        self, config: FederationConfig, store: ObjectStore, round_: int, valid: dict[str, bytes]
    ) -> list[str]:
        """Fix the round's survivors (valid masked uploads) and sign the set, so silos can unmask."""
        survivors = []
        for silo, payload in sorted(valid.items()):
            try:
                MaskedUpdate.parse(payload)
                survivors.append(silo)
            except SilotuneError:
                continue
        key = FederationLayout(config.federation_id).survivors(round_)
        data = json.dumps(sorted(survivors)).encode()
        store.put(key, data)
        sign_object(config, store, key, data, round_=round_, purpose="survivors")
        return sorted(survivors)

    def aggregate(self, job: AggregationJob) -> AggregateRecord:
        """Unmask the survivors' sum from their signed answers; the mean is the round's delta."""
        config, store, round_ = job.config, job.store, job.round
        global_state = get_tensors(store, job.global_ref.key, expected_sha256=job.global_ref.sha256)
        sub_global = update_template(config, global_state)  # SCAFFOLD's Δc is summed with the delta
        survivors = read_survivors(config, store, round_)
        masked = {s: job.valid[s] for s in survivors if s in job.valid}
        for s in sorted(set(job.valid) - set(masked)):
            job.excluded[s] = "masked update not among the round's fixed survivors"
        require_quorum(config, round_, list(masked), job.excluded)
        for payload in masked.values():
            MaskedUpdate.parse(payload)
        responses: dict[str, bytes] = {}
        for silo in _roster(config, round_):
            blob = _read_peer(config, store, round_, silo, UNMASK, "unmask")
            if blob is not None:
                responses[silo] = blob
        result = unmask_sum(
            masked,
            responses,
            adverts=adverts(config, store, round_),
            round_id=round_id(config, round_),
            params=params_of(config),
            roster=_roster(config, round_),
            complete_up_to=config.security.secagg_complete_up_to,
        )
        check_weight(result.weight, len(masked), config, round_)
        combined = {k: (v.double() / result.weight).to(sub_global[k].dtype) for k, v in result.delta.items()}
        check_update(ClientUpdate(silo="(sum)", delta=combined, num_examples=1), sub_global)
        record = step_server(job, global_state, combined, sorted(masked))
        return record.model_copy(update={"masking": graph_of(config, round_).record()})
