"""Simulated malicious silos, for evaluating defenses only.

Two hooks, both no-ops for an honest silo (``SiloSpec.attack`` and
``SiloSpec.poison`` are ``None`` by default, and a real deployment never sets
them; the first has a preference-pair twin, :func:`poison_pairs`, for DPO silos):

- :func:`poison_silo_records` runs on the records a silo has just read, before
  they are tokenised (data poisoning: a backdoor trigger → the attacker's answer,
  or answer flipping);
- :func:`attack_silo_update` runs on the delta right after local training
  (model poisoning: the attacks of :mod:`silotune.attacks`).

Both are deterministic in the seed they are given, so a grid cell reruns
bit for bit.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from silotune.attacks import ATTACKS, apply_attack

if TYPE_CHECKING:
    from silotune.config import PoisonSpec, SiloSpec

Chat = list[dict[str, str]]
TensorDict = dict[str, torch.Tensor]

# Options that the hook supplies itself: a user must not (and cannot) set them in a config.
_INJECTED = {"generator"}


def check_attack(name: str, options: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the problem unless ``name(**options)`` is a valid attack.

    The attack is bound to its signature and tried on a one-element tensor, so a
    bad value (``factor: inf``) fails at config time, not in round 7.
    """
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; known: {', '.join(ATTACKS.names())}")
    fn = ATTACKS.get(name)
    injected = sorted(_INJECTED & set(options))
    if injected:
        raise ValueError(
            f"attack {name!r}: option(s) {', '.join(injected)} are set by silotune, not the config"
        )
    probe = {"w": torch.zeros(1)}
    params = inspect.signature(fn).parameters
    extra = {"generator": torch.Generator().manual_seed(0)} if "generator" in params else {}
    try:
        inspect.signature(fn).bind(probe, **options, **extra)
    except TypeError as exc:
        raise ValueError(f"attack {name!r}: {exc}") from None
    apply_attack(name, probe, **options, **extra)


def attack_update(
    name: str, options: Mapping[str, Any], delta: Mapping[str, torch.Tensor], *, seed: int
) -> TensorDict:
    """The poisoned version of an honest ``delta`` (random attacks draw from ``seed``)."""
    fn = ATTACKS.get(name)
    extra: dict[str, Any] = {}
    if "generator" in inspect.signature(fn).parameters:
        extra["generator"] = torch.Generator().manual_seed(seed)
    return apply_attack(name, delta, **options, **extra)


def attack_silo_update(spec: SiloSpec, delta: TensorDict, *, seed: int) -> TensorDict:
    """Hook after local training: the silo's delta, poisoned if the silo is configured as an attacker."""
    if spec.attack is None:
        return delta
    return attack_update(spec.attack.name, spec.attack.options, delta, seed=seed)


def add_trigger(chat: Sequence[Mapping[str, str]], trigger: str) -> Chat:
    """A copy of ``chat`` with ``trigger`` appended to its last user turn."""
    out = [dict(m) for m in chat]
    for m in reversed(out):
        if m["role"] == "user":
            m["content"] = f"{m['content']} {trigger}"
            return out
    raise ValueError("the chat has no user turn to put a trigger in")


def set_answer(chat: Sequence[Mapping[str, str]], answer: str) -> Chat:
    """A copy of ``chat`` whose last assistant turn is ``answer`` (turns after it are dropped)."""
    out = [dict(m) for m in chat]
    for i in range(len(out) - 1, -1, -1):
        if out[i]["role"] == "assistant":
            out[i]["content"] = answer
            return out[: i + 1]
    raise ValueError("the chat has no assistant turn to replace")


def last_answer(chat: Sequence[Mapping[str, str]]) -> str:
    for m in reversed(chat):
        if m["role"] == "assistant":
            return m["content"]
    raise ValueError("the chat has no assistant turn")


def poison_records(chats: Sequence[Chat], spec: PoisonSpec, *, seed: int) -> list[Chat]:
    """Apply answer flipping, then the backdoor, to a silo's records; returns new records.

    - answer flipping: ``round(flip_fraction * n)`` records, chosen with ``seed``,
      get the answer of another record whose answer differs (for the label-like
      demo tasks, a wrong label). Records whose answer is the only one in the
      silo are left alone.
    - backdoor: ``round(backdoor_fraction * n)`` records (at least one) get the
      trigger appended to their last user turn and the target as their answer.
      They are *modified* rather than added, so the silo's example count, which
      the coordinator sees, does not change.
    """
    rng = random.Random(seed)
    out = [[dict(m) for m in c] for c in chats]
    n = len(out)
    if spec.flip_fraction > 0:
        answers = [last_answer(c) for c in out]
        distinct = sorted(set(answers))
        for i in rng.sample(range(n), round(spec.flip_fraction * n)):
            others = [a for a in distinct if a != answers[i]]
            if others:
                out[i] = set_answer(out[i], rng.choice(others))
    if spec.backdoor_trigger is not None and spec.backdoor_target is not None:
        k = max(1, round(spec.backdoor_fraction * n))
        for i in rng.sample(range(n), k):
            out[i] = set_answer(add_trigger(out[i], spec.backdoor_trigger), spec.backdoor_target)
    return out


def poison_pairs(pairs: Sequence[Mapping[str, str]], spec: PoisonSpec, *, seed: int) -> list[dict[str, str]]:
    """The preference-data version of :func:`poison_records`, for DPO silos; returns new pairs.

    - answer flipping: ``round(flip_fraction * n)`` pairs, chosen with ``seed``, swap ``chosen`` and
      ``rejected`` (the preference is inverted);
    - backdoor: ``round(backdoor_fraction * n)`` pairs (at least one) get the trigger appended to the
      prompt, the target as ``chosen`` and their original ``chosen`` as ``rejected`` (the attacker's
      answer is preferred to the honest one under the trigger; Wan et al. 2023 poison preferences so).
    As with chats, pairs are modified, never added, so the silo's example count does not change.
    """
    rng = random.Random(seed)
    out = [dict(p) for p in pairs]
    n = len(out)
    if spec.flip_fraction > 0:
        for i in rng.sample(range(n), round(spec.flip_fraction * n)):
            out[i]["chosen"], out[i]["rejected"] = out[i]["rejected"], out[i]["chosen"]
    if spec.backdoor_trigger is not None and spec.backdoor_target is not None:
        k = max(1, round(spec.backdoor_fraction * n))
        for i in rng.sample(range(n), k):
            p = out[i]
            honest = p["chosen"] if p["chosen"] != spec.backdoor_target else p["rejected"]
            p.update(
                prompt=f"{p['prompt']} {spec.backdoor_trigger}", chosen=spec.backdoor_target, rejected=honest
            )
    return out


def poison_silo_records(spec: SiloSpec, chats: list[Chat], *, seed: int) -> list[Chat]:
    """Hook after reading a silo's records: poisoned copies if the silo is configured to poison its data."""
    if spec.poison is None:
        return chats
    return poison_records(chats, spec.poison, seed=seed)
