"""The one owner of coefficient rules: the allowed range, NAME=VALUE parsing, and how a request's coefficients
are resolved from a profile, server-wide scales, llama-server's `lora` list and explicit overrides.

Precedence (each later step wins):
  1. every AV at 0;
  2. the profile named by the caller, else the modelfile's default profile;
  3. server-wide scales set with POST /lora-adapters (only when no profile was named);
  4. llama-server's `"lora": [{"id", "scale"}]` — replaces the whole set, unlisted ids go to 0;
  5. overrides by name (`--set`, `/set`, `"avgguf": {"coefficients": ...}`).
Every value ends up checked against [COEF_MIN, COEF_MAX]; every name against the loaded AVs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from avgguf.errors import AvggufError

# Coefficients outside this range push SmolLM2-class models into degenerate text; larger models may
# tolerate more, but a typo like 80 instead of 0.8 should fail loudly.
COEF_MIN, COEF_MAX = -2.0, 2.0


class CoefficientError(AvggufError):
    """A coefficient name or value is wrong. `param` names the request field it came from (server)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def check_value(name: str, value: Any, where: str = "coefficient") -> float:
    """A finite number in [COEF_MIN, COEF_MAX], or a CoefficientError naming `where`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CoefficientError(f"{where}: coefficient {name!r} must be a number in [{COEF_MIN:g}, {COEF_MAX:g}], found {value!r}")
    value = float(value)
    if not math.isfinite(value) or not COEF_MIN <= value <= COEF_MAX:
        raise CoefficientError(f"{where}: coefficient {name!r} = {value:g} is outside [{COEF_MIN:g}, {COEF_MAX:g}]")
    return value


def parse_assignments(items: Iterable[str], source: str = "--set") -> dict[str, float]:
    """['medical=0.8', 'legal=-0.5 financial=0.2', 'a=1,b=2'] -> {'medical': 0.8, 'legal': -0.5, ...}.

    Each item may hold several assignments separated by spaces or commas, so `--set "a=0.8 b=0.2"` means
    what the chat's `/set a=0.8 b=0.2` means. `source` (the flag, --set) starts every message; the chat, where
    the user just typed the command, passes ""."""
    lead = f"{source}: " if source else ""
    out: dict[str, float] = {}
    for item in items:
        for part in re.split(r"[\s,]+", item.strip()):
            if not part:
                continue
            name, sep, value = part.partition("=")
            if not sep or not name.strip():
                raise CoefficientError(f"{lead}expected NAME=VALUE (e.g. medical=0.8), found {part[:80]!r}")
            try:
                out[name.strip()] = float(value)
            except ValueError:
                raise CoefficientError(f"{lead}{name.strip()[:80]}: expected a number, found {value.strip()[:80]!r}") from None
    return out


@dataclass(frozen=True)
class Resolver:
    """The AV names of one model (in load order: llama-server ids) and its named profiles."""

    names: tuple[str, ...]
    profiles: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    default_profile: str | None = None
    where: str = "model"

    def check_profile(self, profile: str | None) -> None:
        if profile is not None and profile not in self.profiles:
            raise CoefficientError(
                f"{self.where}: no profile {profile!r}; profiles: {sorted(self.profiles) or 'none'}", param="model"
            )

    def check_names(self, coefs: Mapping[str, Any], where: str, param: str | None = None) -> None:
        for name in coefs:
            if name not in self.names:
                raise CoefficientError(
                    f"{where}: unknown alignment vector {name!r}; {self.where} has {list(self.names) or 'none'}", param=param
                )

    def from_lora(self, lora: Sequence[tuple[int, float]], param: str = "lora") -> dict[str, float]:
        """llama-server's id/scale list -> the whole coefficient set (unlisted ids 0)."""
        coefs = {n: 0.0 for n in self.names}
        for lora_id, scale in lora:
            if not 0 <= lora_id < len(self.names):
                raise CoefficientError(
                    f"lora id {lora_id} does not exist; ids 0..{len(self.names) - 1} are {list(self.names)}", param=param
                )
            coefs[self.names[lora_id]] = check_value(self.names[lora_id], scale, param)
        return coefs

    def resolve(
        self,
        profile: str | None = None,
        *,
        global_scales: Mapping[str, float] | None = None,
        lora: Sequence[tuple[int, float]] | None = None,
        overrides: Mapping[str, Any] | None = None,
        param: str | None = None,
        source: str = "override",
    ) -> dict[str, float]:
        """The full, checked coefficient set for one request (see the module docstring for precedence).
        `source` names where overrides came from in messages (--set, /set); `param` the request field."""
        self.check_profile(profile)
        coefs = {n: 0.0 for n in self.names}
        chosen = profile or self.default_profile
        if chosen is not None:
            coefs.update(self.profiles[chosen])
        if profile is None and global_scales is not None:
            coefs.update(global_scales)
        if lora is not None:
            coefs = self.from_lora(lora)
        if overrides:
            self.check_names(overrides, source, param)
            coefs.update(overrides)
        return {n: check_value(n, v, source) for n, v in coefs.items()}


def describe(coefs: Mapping[str, float]) -> str:
    """'medical=0.8 legal=-0.5' (or '(no AVs)'), as the CLI prints a coefficient set."""
    return " ".join(f"{k}={v:g}" for k, v in coefs.items()) or "(no AVs)"
