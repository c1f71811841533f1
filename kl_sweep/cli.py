"""``python -m kl_sweep``: check the command line before Hydra starts, then hand over to it.

Hydra creates the run directory and its log before the task runs, and reports composition errors
over several lines. The pre-flight composes the same config with Hydra's compose API (and Hydra's
own argument parser and override grammar), validates it, and on a bad value prints one line and
exits with status 2 before anything is written. In multirun mode only the overrides that are not
sweeps are composed here; the sweeper validates every swept value before it fits or writes.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf.errors import OmegaConfBaseException

from kl_sweep.allocator import small_pages
from kl_sweep.workers import asks_for_joblib, use_forkserver

EXIT_BAD_INPUT = 2


def preflight(argv: list[str]) -> str | None:
    """The one-line error for ``argv``, or None when it composes and validates."""
    from kl_sweep.config import CONFIG_DIR, config_values
    from kl_sweep.io import writable_dir_problem
    from kl_sweep.validate import ConfigError, validate

    args, _ = get_args_parser().parse_known_args(argv)
    if (
        args.help
        or args.hydra_help
        or args.info
        or args.shell_completion
        or args.config_path
        or args.config_dir
    ):
        return None
    try:
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except HydraException:
        return malformed(args.overrides)
    for o in overrides:
        if not o.key_or_group:
            return f"kl_sweep: malformed override {o.input_line!r}: an override is key=value"
        if o.is_sweep_override() and not args.multirun:
            return (
                f"kl_sweep: {o.input_line} is a sweep: add -m (--multirun) to run each value, "
                f"or write {o.key_or_group}=[...] for a list"
            )
    if args.multirun:
        overrides = [o for o in overrides if not o.is_sweep_override()]
    fixed = [o.input_line for o in overrides]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
            cfg = compose(config_name=args.config_name or "config", overrides=fixed, return_hydra_config=True)
        if not args.multirun:
            validate(config_values(cfg))
            problem = writable_dir_problem(Path(str(cfg.hydra.run.dir)))
            if problem:
                return f"kl_sweep: cannot write the run to {cfg.hydra.run.dir}: {problem}"
    except ConfigError as ex:
        return str(ex)
    except MissingConfigException as ex:
        group = (ex.missing_cfg_file or "").rsplit("/", 1)
        if ex.options and len(group) == 2:
            return f"kl_sweep: invalid {group[0]}={group[1]}: allowed is one of {', '.join(ex.options)}"
        return f"kl_sweep: {_first_line(ex)}"
    except (HydraException, OmegaConfBaseException) as ex:
        unknown = unknown_key_message(ex)
        if unknown:
            return unknown
        cause = ex.__cause__
        detail = f": {_first_line(cause)}" if cause is not None else ""
        return f"kl_sweep: {_first_line(ex)}{detail}"
    except Exception as ex:  # anything else Hydra raises while composing: one line, not a traceback
        return f"kl_sweep: {_first_line(ex)}"
    finally:
        GlobalHydra.instance().clear()
    return None


def malformed(lines: list[str]) -> str:
    """The message for the first override Hydra's grammar rejects."""
    parser = OverridesParser.create()
    for line in lines:
        try:
            parser.parse_overrides([line])
        except HydraException as ex:
            return f"kl_sweep: malformed override {line!r}: {_first_line(ex)}"
    return "kl_sweep: malformed overrides"


def unknown_key_message(ex: BaseException) -> str | None:
    """A one-line message for an override of a key the config does not have, else None."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    from kl_sweep.validate import KNOWN_KEYS

    cause = ex.__cause__
    if not isinstance(cause, (ConfigKeyError, ConfigAttributeError)) or not getattr(cause, "key", None):
        return None
    full = getattr(cause, "full_key", None) or cause.key
    schema = getattr(cause, "object_type", None)
    if dataclasses.is_dataclass(schema):
        prefix = str(full).rsplit(".", 1)[0] + "." if "." in str(full) else ""
        keys = ", ".join(f"{prefix}{name}" for name in _field_names(schema))
        owner = _owner(str(full), schema)
        return f"kl_sweep: unknown key {full}{owner}: allowed keys here are {keys}"
    return f"kl_sweep: unknown key {full}: allowed keys are {', '.join(KNOWN_KEYS)}"


def _owner(full: str, schema: type) -> str:
    """`` (a key of estimator=mc)`` where another choice of the group has the key: ``resample``
    under the quadrature estimator, say."""
    from kl_sweep.config import GROUP_SCHEMAS

    group, _, name = full.rpartition(".")
    owners = [
        c
        for c, node in GROUP_SCHEMAS.get(group, {}).items()
        if node is not schema and name in _field_names(node)
    ]
    return f" (a key of {' and '.join(f'{group}={c}' for c in owners)})" if owners else ""


def _field_names(schema: type) -> list[str]:
    """A schema's keys, a nested schema's as dotted names (``target.file``, not ``target``): the
    keys a user can set. ``shard`` is the sweeper's own and not listed."""
    names = []
    for f in dataclasses.fields(schema):
        nested = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if f.name == "shard":
            continue
        if nested is not None and dataclasses.is_dataclass(nested):
            names.extend(f"{f.name}.{name}" for name in _field_names(nested))
        else:
            names.append(f.name)
    return names


def _first_line(ex: BaseException) -> str:
    """The message's first line, joined to the next one when it only announces it (ends with ':')."""
    lines = [line.strip() for line in str(ex).strip().splitlines() if line.strip()]
    if not lines:
        return type(ex).__name__
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def ensure_plugin_discoverable() -> None:
    """Make Hydra find the kl_sweep sweeper however the project was installed.

    Hydra scans ``hydra_plugins.__path__``; some editable installs of a flat layout leave the
    repository's folder off it (hydra issue 2359), so add it when it is missing.
    """
    import hydra_plugins

    here = str(Path(__file__).resolve().parent.parent / "hydra_plugins")
    if here not in [str(Path(p).resolve()) for p in hydra_plugins.__path__ if Path(p).exists()]:
        hydra_plugins.__path__.append(here)


def main() -> None:
    ensure_plugin_discoverable()
    if asks_for_joblib(sys.argv[1:]):
        use_forkserver()  # __main__ started it: the workers' imports run on another core while this one plans
    if not os.environ.get("HYDRA_FULL_ERROR"):
        error = preflight(sys.argv[1:])
        if error:
            print(error, file=sys.stderr)
            sys.exit(EXIT_BAD_INPUT)
    small_pages()  # after the pre-flight: a bad input exits without importing numpy and Arrow
    from kl_sweep.app import main as hydra_main

    hydra_main()
