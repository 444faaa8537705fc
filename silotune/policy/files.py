"""A policy as a file: read and validate YAML (one line per bad field), write it back commented."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from silotune.errors import ConfigError
from silotune.policy.model import PolicyError, SiloPolicy

_FIELD_FIRST = re.compile(r"^([a-z_][a-z0-9_.]*): (.*)$", re.S)


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        for part in msg.split("\n"):
            # A cross-field problem starts with its field, relative to the model that found it.
            m = _FIELD_FIRST.match(part)
            if m:
                field = f"{loc}.{m[1]}" if loc else m[1]
                lines.append(f"{source}: {field}: {m[2]}")
            else:
                lines.append(f"{source}: {loc}: {part}" if loc else f"{source}: {part}")
    return "\n".join(lines)


def parse_policy(data: Any, *, source: str = "<dict>") -> SiloPolicy:
    """Validate a policy mapping; :class:`PolicyError` has one line per bad field, naming ``source``."""
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: a silo policy is a mapping at the top level, got {type(data).__name__}")
    try:
        return SiloPolicy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(_format_errors(exc, source)) from None


def load_policy(path: str | Path) -> SiloPolicy:
    """Read a silo's policy file (YAML); relative paths resolve against the file's folder.

    Every problem is reported at once, one line per bad field, each naming the file. A pinned
    coordinator key must be a readable Ed25519 public key.
    """
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise PolicyError(f"{p}: silo policy file not found") from None
    except OSError as exc:
        raise PolicyError(f"{p}: cannot read the silo policy ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1})" if where is not None else ""
        raise PolicyError(f"{p}: not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None
    if isinstance(raw, dict):
        base = p.parent.resolve()
        for key in ("private_dir", "train_path", "eval_path", "coordinator_key"):
            value = raw.get(key)
            if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
                raw[key] = str((base / value).resolve())
            elif isinstance(value, str) and value:
                raw[key] = str(Path(value).expanduser())
    policy = parse_policy(raw, source=str(p))
    if policy.coordinator_key is not None:
        try:
            policy.coordinator_public_key()
        except ConfigError as exc:
            raise PolicyError(f"{p}: coordinator_key: {exc}") from None
    return policy


def _comment(text: str, indent: str) -> list[str]:
    return [f"{indent}# {line}" for line in textwrap.wrap(text, width=100 - len(indent) - 2)]


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def policy_yaml(policy: SiloPolicy, *, header: str | None = None, comments: bool = True) -> str:
    """The policy as YAML, each field preceded by its description as a comment."""
    data = policy.model_dump(mode="json")
    lines = [*_comment(header, ""), ""] if header else []
    for name, info in SiloPolicy.model_fields.items():
        if comments and info.description:
            lines += _comment(info.description, "")
        value = data[name]
        sub = getattr(policy, name)
        if isinstance(sub, BaseModel):
            lines.append(f"{name}:")
            for sub_name, sub_info in type(sub).model_fields.items():
                if comments and sub_info.description:
                    lines += _comment(sub_info.description, "  ")
                lines.append(f"  {sub_name}: {_yaml_value(value[sub_name])}")
        else:
            lines.append(f"{name}: {_yaml_value(value)}")
        if comments:
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def dump_policy(policy: SiloPolicy, path: str | Path, *, header: str | None = None) -> Path:
    """Write ``policy`` as commented YAML (paths as they are: relative ones resolve against the
    file's folder when it is loaded again)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(policy_yaml(policy, header=header))
    return p
