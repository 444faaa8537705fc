"""Cross-field checks of a federation's methods, objectives and model openness.

Called by :class:`~silotune.config.FederationConfig` validation, so an impossible
combination is refused before anything loads, with every reason at once:

- unknown method names (the known ones are listed) and invalid method options;
- paper Table 1: methods that need weights on a gray- or black-box model;
- any model that would run at a provider (silo data would leave the silo);
- silos whose methods would exchange different tensors (e.g. LoRA next to full
  fine-tuning, or different LoRA shapes) and so cannot be averaged;
- a method whose packages are missing (QLoRA without bitsandbytes).
"""

from __future__ import annotations

import importlib.util
from typing import Any

from pydantic import ValidationError

from silotune.errors import ConfigError, RegistryError
from silotune.methods import METHODS, get_method, parse_options
from silotune.openness import check_data_stays_local, check_table1, resolve_descriptor


def _options_problems(where: str, spec: Any) -> list[str]:
    try:
        method = get_method(spec.name)
    except RegistryError as exc:
        return [f"{where}.name: {exc}"]
    try:
        parse_options(method, spec.options)
    except ValidationError as exc:
        return [
            f"{where}.options.{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (method {spec.name!r})"
            for e in exc.errors()
        ]
    return []


def exchange_signature(spec: Any, lora: Any) -> tuple[Any, ...]:
    """What a method exchanges, up to values: two silos can be aggregated iff their signatures are equal."""
    method = get_method(spec.name)
    return method.exchange_signature(parse_options(method, spec.options), lora)  # type: ignore[no-any-return]


def _rank_problems(config: Any) -> list[str]:
    """Heterogeneous LoRA ranks: each at most lora.r, and only where zero-padding averages correctly."""
    ranks = {s.name: config.method_for(s.name).options.get("rank") for s in config.silos}
    ranks = {k: v for k, v in ranks.items() if v is not None}
    if not ranks:
        return []
    if _stacking(config):  # a silo's rank is its own there, not a slice; _stacking_problems checks the rest
        if config.method.options.get("rank") is not None:
            return ["method.options.rank: set a rank per silo; the federation's default rank is lora.r"]
        return []
    problems = [
        f"silos: {name}'s rank {r} exceeds the federation's lora.r={config.lora.r} (a silo trains a slice)"
        for name, r in sorted(ranks.items())
        if isinstance(r, int) and r > config.lora.r
    ]
    if config.method.options.get("rank") is not None:
        problems.append("method.options.rank: set a smaller rank per silo; the federation's rank is lora.r")
    why = (
        "heterogeneous LoRA ranks average zero-padded updates per rank component, which needs plaintext "
        "updates and a linear aggregator"
    )
    if config.aggregation.name != "fedavg":
        problems.append(f"aggregation.name: {why}: use 'fedavg', not {config.aggregation.name!r}")
    security = getattr(config, "security", None)
    if security is not None and (security.protection != "none" or security.ffa_lora):
        problems.append(f"security: {why}; protection and FFA-LoRA are not supported with them yet")
    privacy = getattr(config, "privacy", None)
    if privacy is not None and privacy.client_dp is not None:
        problems.append("privacy.client_dp: its noise would fill the zero padding of low-rank silos' updates")
    return problems


def _stacking(config: Any) -> bool:
    aggregation = getattr(config, "aggregation", None)
    return getattr(aggregation, "lora_merge", "pad") == "stack"


def _stacking_problems(config: Any) -> list[str]:
    """``aggregation.lora_merge: stack`` (FLoRA): plaintext LoRA factors, summed by example weight."""
    if not _stacking(config):
        return []
    problems: list[str] = []
    sec, privacy, agg = config.security, config.privacy, config.aggregation
    if sec.protection != "none":
        problems.append(
            f"aggregation.lora_merge: 'stack' needs security.protection 'none', not {sec.protection!r}: the "
            "coordinator multiplies each silo's own B and A, so it must see them; under protection give "
            "every silo one rank (FFA-LoRA) and leave lora_merge at 'pad'"
        )
    others = sorted(
        {
            config.method_for(s.name).name
            for s in config.silos
            if config.method_for(s.name).name not in METHODS
            or not get_method(config.method_for(s.name).name).uses_lora_section
        }
    )
    if others:
        problems.append(
            f"aggregation.lora_merge: 'stack' merges LoRA factors, but method(s) {others} have none; "
            "use lora or qlora, or lora_merge 'pad'"
        )
    if sec.ffa_lora:
        problems.append(
            "security.ffa_lora: true with aggregation.lora_merge 'stack': stacking needs each silo's "
            "trained A (FFA-LoRA freezes it and uploads B alone); leave ffa_lora unset"
        )
    if privacy.client_dp is not None:
        problems.append(
            "privacy.client_dp: with aggregation.lora_merge 'stack' a silo uploads its whole LoRA factors, "
            "not a delta to clip and noise; use privacy.sample_dp (DP-SGD) or lora_merge 'pad'"
        )
    if agg.name != "fedavg":
        problems.append(
            f"aggregation.name: {agg.name!r} with aggregation.lora_merge 'stack': stacking is a weighted "
            "sum of the silos' products (FedAvg's weights); use 'fedavg'"
        )
    if config.train.processes > 1:
        problems.append(
            f"train.processes: {config.train.processes} with aggregation.lora_merge 'stack': the merged "
            "global is applied to the model in the silo's own process; use 1"
        )
    return problems


def validate_federation(config: Any) -> list[str]:
    """Every problem of ``config``'s methods, objectives and model openness (empty: none)."""
    problems: list[str] = []
    specs = [("method", config.method)] + [
        (f"silos.{i}.method", s.method) for i, s in enumerate(config.silos) if s.method is not None
    ]
    bad_specs = False
    for where, spec in specs:
        p = _options_problems(where, spec)
        bad_specs = bad_specs or bool(p)
        problems += p

    try:
        descriptor = resolve_descriptor(config.model.name_or_path, config.model.descriptor)
    except ConfigError as exc:
        problems.append(f"model.descriptor: {exc}")
        descriptor = None
    if descriptor is not None:
        problems += [f"model: {p}" for p in check_data_stays_local(config.model.name_or_path, descriptor)]
        pairs = {(config.method_for(s.name).name, config.objective_for(s.name).name) for s in config.silos}
        for method, objective in sorted(pairs):
            problems += [f"model: {p}" for p in check_table1(descriptor, method, objective)]

    if not bad_specs:
        sigs: dict[tuple[Any, ...], list[str]] = {}
        for s in config.silos:
            sigs.setdefault(exchange_signature(config.method_for(s.name), config.lora), []).append(s.name)
        if len(sigs) > 1:
            groups = "; ".join(f"{sig[0]} {list(sig[1:])}: {names}" for sig, names in sigs.items())
            problems.append(
                "silos: their methods exchange different tensors, which cannot be aggregated into one global "
                f"({groups}); LoRA and QLoRA silos mix freely at the same LoRA shape"
            )
    privacy = getattr(config, "privacy", None)
    if privacy is not None and getattr(privacy, "sample_dp", None) is not None:
        dpo = sorted(s.name for s in config.silos if config.objective_for(s.name).name == "dpo")
        if dpo:
            problems.append(
                f"privacy.sample_dp: DP-SGD clips per row, but a preference pair (two rows) is the privacy "
                f"unit of DPO silos {dpo}; use privacy.client_dp, which protects each silo's whole update"
            )
    known = [get_method(spec.name) for _, spec in specs if spec.name in METHODS]
    security = getattr(config, "security", None)
    if security is not None and getattr(security, "ffa_lora", None):
        others = sorted(
            {spec.name for _, spec in specs if spec.name not in METHODS or not get_method(spec.name).ffa_lora}
        )
        if others:
            problems.append(
                f"security.ffa_lora: FFA-LoRA freezes LoRA's A matrices, but method(s) {others} have none"
            )
    problems += _rank_problems(config)
    problems += _stacking_problems(config)
    for name, package in sorted({(m.name, p) for m in known for p in m.requires_packages}):
        if importlib.util.find_spec(package) is None:
            problems.append(f"method: {name} needs the {package} package (pip install {package})")
    return problems
