"""``python -m apps.X <command> [hydra overrides]``: one dispatcher for every app.

Each app's ``__main__`` calls :func:`main` with its commands. The command picks ``conf/<app>/<command>.yaml``
as Hydra's primary config; the shared groups (``trainer``, ``logger``, ``callbacks``) come from ``conf/`` through
Hydra's search path. Everything after the command is Hydra's: overrides, ``-m`` multirun, ``--cfg job``,
``--help``.

Lightning's DDP launcher restarts worker ranks as ``python -m apps.X <sys.argv[1:]> hydra.run.dir=...``. While a
command runs, ``sys.argv`` is the original one (with the command), so workers re-enter here with the same command;
repeated overrides (a user's ``hydra.run.dir`` plus the launcher's) are collapsed, last one wins.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from core.config_checks import ConfigValueError
from core.rundir import RunDirError, claim_run_dir, is_worker_rank

__all__ = ["CONF_DIR", "main", "compose", "check_invocation", "dedupe_overrides", "split_flags"]

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
SHARED_GROUPS = ("trainer", "logger", "callbacks")


def _override_key(arg: str) -> str | None:
    if arg.startswith("-") or "=" not in arg:
        return None
    return arg.split("=", 1)[0].lstrip("+~")


def dedupe_overrides(args: Sequence[str]) -> list[str]:
    """Keep the last of repeated ``key=value`` overrides (Hydra refuses duplicates); flags pass unchanged."""
    last = {}
    for i, a in enumerate(args):
        key = _override_key(a)
        if key is not None:
            last[key] = i
    return [a for i, a in enumerate(args) if _override_key(a) is None or last[_override_key(a)] == i]


# Hydra flags that take a value (``--info`` only optionally, from a fixed set)
_VALUE_FLAGS = {
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
}
_INFO_FLAGS = {"--info", "-i"}
_INFO_CHOICES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def split_flags(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """(Hydra flags with their values, overrides): Hydra's parser wants all overrides in one block."""
    flags, overrides, i = [], [], 0
    while i < len(args):
        a = args[i]
        if a.startswith("-"):
            flags.append(a)
            takes_value = a in _VALUE_FLAGS or (a in _INFO_FLAGS and i + 1 < len(args) and args[i + 1] in _INFO_CHOICES)
            if takes_value and i + 1 < len(args):
                flags.append(args[i + 1])
                i += 1
        else:
            overrides.append(a)
        i += 1
    return flags, overrides


def _searchpath_override() -> str:
    return f"hydra.searchpath=[file://{CONF_DIR}]"


def _identity_overrides(app: str, command: str) -> list[str]:
    """``app`` and ``command`` are facts of the invocation, set here rather than in each command config."""
    return [f"app={app}", f"command={command}"]


def compose(app: str, command: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The config a command would run with (for tests and notebooks): ``compose("density2d", "train", [...])``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(CONF_DIR / app), version_base="1.3"):
        identity = _identity_overrides(app, command)
        return hydra_compose(command, overrides=[_searchpath_override(), *identity, *overrides])


def open_mapping_overrides(app: str, command: str, overrides: Sequence[str]) -> list[str]:
    """``data.root=...`` -> ``+data.root=...`` where the command's config holds an empty mapping for ``data``
    (``data: {}``: overrides merged over a checkpoint's config), so the natural spelling is accepted instead of
    failing in Hydra with "Could not override"."""
    raw = OmegaConf.load(CONF_DIR / app / f"{command}.yaml")
    out = []
    for arg in overrides:
        head = arg.split("=", 1)[0]
        top = head.split(".", 1)[0]
        node = raw.get(top) if "=" in arg and "." in head and not arg.startswith(("+", "~")) else None
        out.append(f"+{arg}" if isinstance(node, DictConfig) and len(node) == 0 else arg)
    return out


def _is_group_choice(app: str, arg: str) -> bool:
    """``trainer=ddp``, ``+experiment=paper``: a config-group selection rather than a value."""
    key = arg.split("=", 1)[0].lstrip("+~")
    return "=" in arg and ((CONF_DIR / key).is_dir() or (CONF_DIR / app / key).is_dir())


# config keys whose values name files or folders a command reads: never cleared by overwrite=true
_INPUT_KEYS = ("ckpt", "ckpt_path", "input", "samples", "reference", "smiles", "data_path")


def input_paths(cfg: DictConfig) -> list[str]:
    """The paths a command reads, from the top-level keys in ``_INPUT_KEYS`` that are set."""
    keys = [k for k in _INPUT_KEYS if k in cfg and not OmegaConf.is_missing(cfg, k)]
    return [cfg[k] for k in keys if isinstance(cfg[k], str) and cfg[k]]


def check_invocation(app: str, command: str, overrides: Sequence[str]) -> None:
    """Everything that can be refused before Hydra creates a run dir: wrong value types, impossible counts, and an
    explicit ``hydra.run.dir`` that holds another run's outputs (Hydra would overwrite its ``.hydra/`` config)."""
    from core.config_checks import check_config, check_override_types
    from core.rundir import check_run_dir

    ours = [a for a in overrides if "=" in a and not a.lstrip("+~").startswith("hydra.")]
    groups = [a for a in ours if _is_group_choice(app, a)]
    defaults = compose(app, command, groups)
    given = compose(app, command, ours)
    check_override_types([a for a in ours if a not in groups], defaults, given)
    check_config(given)
    if is_worker_rank():
        return
    for a in overrides:
        if a.startswith("hydra.run.dir="):
            run_dir = Path(a.split("=", 1)[1]).expanduser()
            reads = input_paths(given)
            if check_run_dir(run_dir, app, command, bool(given.get("overwrite")), reads, given.get("ckpt_path")):
                claim_run_dir(run_dir, app, command, overwrite=True, reads=reads)  # clears the earlier run


def _choices(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _help(app: str, commands: dict[str, Callable], descriptions: dict[str, str]) -> str:
    lines = [f"usage: python -m apps.{app} <command> [key=value ...] [hydra flags]", "", "commands:"]
    for name in commands:
        lines.append(f"  {name:<12} {descriptions.get(name, '')}")
    lines += ["", "config groups (choose with group=option):"]
    groups = {g: _choices(CONF_DIR / g) for g in SHARED_GROUPS}
    groups.update({p.name: _choices(p) for p in sorted((CONF_DIR / app).iterdir()) if p.is_dir()})
    for g, opts in groups.items():
        lines.append(f"  {g:<12} {', '.join(opts)}")
    try:
        cfg = compose(app, next(iter(commands)))
        keys = [k for k in cfg if k not in groups and k != "hydra"]
        lines += ["", f"main keys of '{next(iter(commands))}': " + ", ".join(keys)]
    except Exception as e:  # help must never crash on a broken config: say what is wrong instead
        lines += ["", f"(could not compose the config: {e})"]
    lines += [
        "",
        "examples:",
        f"  python -m apps.{app} train trainer.max_epochs=5 logger=csv",
        f"  python -m apps.{app} train trainer=ddp trainer.devices=4        # multi-GPU",
        f"  python -m apps.{app} train --cfg job                          # print the composed config",
        f"  python -m apps.{app} <command> --help                         # Hydra's help for one command",
    ]
    return "\n".join(lines)


def main(
    app: str,
    commands: dict[str, Callable[[DictConfig], Any]],
    descriptions: dict[str, str] | None = None,
    argv: Sequence[str] | None = None,
) -> Any:
    """Dispatch ``argv`` (default ``sys.argv[1:]``) to ``commands[argv[0]]`` under Hydra."""
    import hydra

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_help(app, commands, descriptions or {}))
        return None
    command, rest = args[0], dedupe_overrides(args[1:])
    if command not in commands:
        sys.exit(f"apps.{app}: unknown command {command!r}; choose one of: {', '.join(commands)} (see --help)")
    if not (CONF_DIR / app / f"{command}.yaml").is_file():
        sys.exit(f"apps.{app}: missing config {CONF_DIR / app / f'{command}.yaml'}")

    flags, overrides = split_flags(rest)
    overrides = open_mapping_overrides(app, command, overrides)
    if not any(f in flags for f in ("--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "-m", "--multirun")):
        try:
            check_invocation(app, command, overrides)
        except (ConfigValueError, RunDirError) as e:
            sys.exit(f"apps.{app} {command}: {e}")

    original_argv = list(sys.argv)
    result: dict[str, Any] = {}

    def task(cfg: DictConfig) -> Any:
        sys.argv = original_argv  # DDP worker ranks are launched from sys.argv: they must see the command
        if not is_worker_rank():
            claim_run_dir(
                cfg.output_dir, app, command, bool(cfg.get("overwrite")), input_paths(cfg), cfg.get("ckpt_path")
            )
        result["value"] = commands[command](cfg)
        return result["value"]

    task.__name__ = f"{app}_{command}"
    runner = hydra.main(config_path=str(CONF_DIR / app), config_name=command, version_base="1.3")(task)
    identity = _identity_overrides(app, command)
    sys.argv = [original_argv[0] if original_argv else app, *flags, _searchpath_override(), *identity, *overrides]
    try:
        runner()
    finally:
        sys.argv = original_argv
    return result.get("value")
