"""Config values checked before a command runs: a wrong type or an impossible count stops with the key named.

Two rules, both applied to the composed config:

- **types**: a value given on the command line must have the type of the default it replaces (``trainer.max_steps=abc``
  is refused because the default is an integer); an integer is accepted where a float is expected.
- **ranges**: counts that must be positive (``n``, ``batch_size``, ``data.batch_size`` ...) or non-negative, the
  trainer's step/epoch limits (``-1`` means unlimited), and sampling temperatures (``temperature``, ``sigma`` ...),
  which scale a noise's standard deviation and so must be numbers >= 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = ["ConfigValueError", "check_config", "check_override_types"]


class ConfigValueError(ValueError):
    """A config value of the wrong type or out of range; the message names the key and what it expects."""


# key (a full dotted path, or a last component matched anywhere) -> minimum allowed value
_POSITIVE = {
    "n",
    "batch_size",
    "eval_batch_size",
    "metric_batch_size",
    "num_samples",
    "points",
    "min_atoms",
    "trainer.devices",
    "trainer.num_nodes",
}
_NON_NEGATIVE = {"num_workers", "trainer.num_sanity_val_steps", "trainer.log_every_n_steps", "seed"}
_UNLIMITED_OR_POSITIVE = {"trainer.max_steps", "trainer.max_epochs"}  # -1 (or null) means no limit
# noise scales: 0 draws the mode, a negative value is a mistake (it would flip the noise's sign, silently)
_NON_NEGATIVE_NUMBER = {"temperature", "latent_temperature", "sample_temperature", "sigma"}


def _leaves(node: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(node, DictConfig):
        for key in node.keys():
            if OmegaConf.is_missing(node, key):
                continue
            try:
                value = node[key]
            except Exception:  # an interpolation that cannot be resolved here (hydra:runtime); not ours to check
                continue
            yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    elif not isinstance(node, ListConfig):
        yield prefix, node


def _type_name(t: type) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(t, t.__name__)


def _fits(value: Any, default: Any) -> bool:
    if value is None or default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return True  # strings, lists and dicts: the consumer checks them


def _select(cfg: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=False)
    except Exception:
        return None


def check_override_types(overrides: Iterable[str], defaults: DictConfig, given: DictConfig) -> None:
    """Each ``key=value`` override must keep the type of ``defaults[key]`` (the config composed without it)."""
    for arg in overrides:
        if "=" not in arg or arg.startswith("-"):
            continue
        key = arg.split("=", 1)[0].lstrip("+~")
        if key.startswith("hydra."):
            continue
        default, value = _select(defaults, key), _select(given, key)
        if isinstance(default, (DictConfig, ListConfig)) or isinstance(value, (DictConfig, ListConfig)):
            continue
        if not _fits(value, default):
            raise ConfigValueError(
                f"config key '{key}' expects {_type_name(type(default))} (default {default!r}), got {value!r}"
            )


def check_config(cfg: DictConfig | Mapping) -> None:
    """Range checks on the composed config (see the module docstring)."""
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    for key, value in _leaves(cfg):
        last = key.rsplit(".", 1)[-1]
        if key in _POSITIVE or last in _POSITIVE:
            low, what = 1, "a positive integer"
        elif key in _NON_NEGATIVE or last in _NON_NEGATIVE:
            low, what = 0, "an integer >= 0"
        elif key in _NON_NEGATIVE_NUMBER or last in _NON_NEGATIVE_NUMBER:
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
                raise ConfigValueError(f"config key '{key}' expects a number >= 0 (a noise scale), got {value!r}")
            continue
        elif key in _UNLIMITED_OR_POSITIVE:
            if value is None or value == -1:
                continue
            low, what = 0, "an integer >= 0, or -1 for no limit"
        else:
            continue
        if value is None or (isinstance(value, str) and key == "trainer.devices"):
            continue  # devices=auto, n=null (a default decided later) are the consumer's business
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigValueError(f"config key '{key}' expects {what}, got {value!r}")
