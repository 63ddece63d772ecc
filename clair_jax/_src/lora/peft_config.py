"""A PEFT LoRA adapter's configuration (``adapter_config.json``) as the bridge reads it.

PEFT scales a module's update ``lora_B @ lora_A`` by ``lora_alpha / r``
(``lora_alpha / sqrt(r)`` with ``use_rslora``), where ``r`` and ``lora_alpha``
may be overridden per module by ``rank_pattern`` and ``alpha_pattern``; the
pattern and target-module matching below follow PEFT's rules (a list entry
matches a module name equal to it or ending in ``"." + entry``, a string is a
regular expression matched against the whole name, a pattern key matches a name
``(.*\\.)?key``). Only what changes the weight delta of plain LoRA on linear
layers is supported: DoRA, LoRA biases, ``modules_to_save`` and other tuner
types are refused, since ``scale · B A`` would not be the module's update.

References:
  PEFT, ``peft.LoraConfig`` and ``peft.tuners.lora.layer.LoraLayer.update_layer``,
  https://huggingface.co/docs/peft.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

#: Fields whose values change the weight delta (or which modules carry one); clients'
#: adapters must agree on them to be aggregated.
DELTA_FIELDS = (
    "peft_type",
    "r",
    "lora_alpha",
    "use_rslora",
    "fan_in_fan_out",
    "target_modules",
    "exclude_modules",
    "rank_pattern",
    "alpha_pattern",
)

# Options with which ``scale · lora_B @ lora_A`` is not (all of) the module's update
# (harmless when false, null or empty).
_UNSUPPORTED = (
    "use_dora",
    "lora_bias",
    "modules_to_save",
    "target_parameters",
    "trainable_token_indices",
    "use_qalora",
    "use_bdlora",
)
# Initialisations that also change the base weights (the factors then adapt a residual).
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


@dataclasses.dataclass(frozen=True)
class PeftAdapterConfig:
    """The LoRA settings of a PEFT ``adapter_config.json``.

    ``scale(module) · B @ A`` is PEFT's weight delta of ``module`` (``out x in``;
    its transpose in the base layer's layout when ``fan_in_fan_out``).

    Attributes:
      r: the rank ``r`` (``rank_pattern`` may override it per module).
      lora_alpha: the scale numerator (``alpha_pattern`` may override it).
      use_rslora: scale by ``lora_alpha / sqrt(r)`` instead of ``lora_alpha / r``.
      fan_in_fan_out: the base layers store ``in x out`` weights (GPT-2's
        ``Conv1D``); the factors are ``lora_B`` ``out x r`` and ``lora_A``
        ``r x in`` all the same.
      target_modules: module names (or name suffixes) PEFT adapts, a regular
        expression, or None.
      rank_pattern: ``{pattern: r}`` overrides.
      alpha_pattern: ``{pattern: lora_alpha}`` overrides.
      raw: the whole JSON object, written back by :meth:`to_dict` with the fields
        above replaced.
    """

    r: int
    lora_alpha: float
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    target_modules: tuple[str, ...] | str | None = None
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    raw: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "adapter config") -> PeftAdapterConfig:
        """Parses and checks an ``adapter_config.json`` object.

        Args:
          data: the JSON object.
          where: what the error messages call it (e.g. the file's path).

        Returns:
          The configuration.

        Raises:
          ValueError: not a LoRA adapter, an unsupported option (DoRA, LoRA
            bias, ``modules_to_save``, ...), or a missing or invalid ``r``,
            ``lora_alpha``, ``use_rslora``, ``fan_in_fan_out`` or pattern.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}.")
        peft_type = data.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ValueError(f"{where}: peft_type must be 'LORA', got {peft_type!r}.")
        for key in _UNSUPPORTED:
            if data.get(key):
                raise ValueError(
                    f"{where}: {key}={data[key]!r} is not supported (the LoRA factors alone "
                    "would not give the weight delta); expected false or null."
                )
        init = data.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
            raise ValueError(
                f"{where}: init_lora_weights={init!r} changes the base weights, so the factors "
                "adapt a residual model; convert the adapter with PEFT first "
                "(save_pretrained(..., path_initial_model_for_weight_conversion=...))."
            )
        targets = data.get("target_modules")
        if isinstance(targets, Sequence) and not isinstance(targets, str):
            targets = tuple(str(t) for t in targets)
        elif targets is not None and not isinstance(targets, str):
            raise ValueError(f"{where}: target_modules must be a list, a string or null.")
        config = cls(
            r=_rank(data.get("r"), f"{where}: r"),
            lora_alpha=_alpha(data.get("lora_alpha"), f"{where}: lora_alpha"),
            use_rslora=_flag(data.get("use_rslora", False), f"{where}: use_rslora"),
            fan_in_fan_out=_flag(data.get("fan_in_fan_out", False), f"{where}: fan_in_fan_out"),
            target_modules=targets,
            rank_pattern=_pattern(data.get("rank_pattern"), _rank, f"{where}: rank_pattern"),
            alpha_pattern=_pattern(data.get("alpha_pattern"), _alpha, f"{where}: alpha_pattern"),
            raw=dict(data),
        )
        return config

    def to_dict(self) -> dict[str, Any]:
        """The JSON object to write: :attr:`raw` with this configuration's fields."""
        out = dict(self.raw)
        out.setdefault("peft_type", "LORA")
        targets = self.target_modules
        out.update(
            r=self.r,
            lora_alpha=self.lora_alpha,
            use_rslora=self.use_rslora,
            fan_in_fan_out=self.fan_in_fan_out,
            target_modules=list(targets) if isinstance(targets, tuple) else targets,
            rank_pattern=dict(self.rank_pattern),
            alpha_pattern=dict(self.alpha_pattern),
        )
        return out

    def rank(self, module: str) -> int:
        """The rank PEFT gives ``module``: its ``rank_pattern`` entry, else ``r``."""
        key = pattern_key(self.rank_pattern, module)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha(self, module: str) -> float:
        """The ``lora_alpha`` PEFT gives ``module``: its ``alpha_pattern`` entry, else default."""
        key = pattern_key(self.alpha_pattern, module)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def scale(self, module: str) -> float:
        """PEFT's ``scaling`` of ``module``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        r = self.rank(module)
        return float(self.alpha(module)) / (math.sqrt(r) if self.use_rslora else r)

    def targets(self, module: str) -> bool:
        """Whether PEFT adapts ``module`` under ``target_modules`` and ``exclude_modules``.

        ``None`` and ``"all-linear"`` accept every name (the model decides).
        """
        excluded = self.raw.get("exclude_modules")
        if excluded and name_matches(excluded, module):
            return False
        if self.target_modules is None or self.target_modules == "all-linear":
            return True
        return name_matches(self.target_modules, module)


def name_matches(targets: str | Sequence[str], module: str) -> bool:
    """PEFT's rule: a regular expression matches the whole name; a list entry the name or
    its dotted suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """The first key of ``patterns`` matching ``module`` as ``(.*\\.)?key`` (PEFT's), or None."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def differences(first: PeftAdapterConfig, other: PeftAdapterConfig) -> list[str]:
    """The :data:`DELTA_FIELDS` on which two configurations disagree, as ``"name: a != b"``."""
    out = []
    for name in DELTA_FIELDS:
        a, b = _field(first, name), _field(other, name)
        if a != b:
            out.append(f"{name}: {a!r} != {b!r}")
    return out


def _field(config: PeftAdapterConfig, name: str):
    if name == "target_modules":
        targets = config.target_modules
        return sorted(targets) if isinstance(targets, tuple) else targets
    if name in ("peft_type", "exclude_modules"):
        return config.raw.get(name, "LORA" if name == "peft_type" else None)
    value = getattr(config, name)
    return dict(value) if isinstance(value, Mapping) else value


def _rank(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where} must be an int >= 1, got {value!r}.")
    return value


def _alpha(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be a number, got {value!r}.")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{where} must be finite and > 0, got {value!r}.")
    return value


def _flag(value, where: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where} must be true or false, got {value!r}.")
    return value


def _pattern(value, check, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a JSON object, got {value!r}.")
    return {str(k): check(v, f"{where}[{k!r}]") for k, v in value.items()}
