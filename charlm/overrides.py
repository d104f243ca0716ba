"""The command line around Hydra, for every charlm command: its overrides checked before Hydra reads them (bytes
that are not UTF-8, a value its grammar cannot parse, one group chosen twice), and what Hydra would print as a
traceback or as advice (a mistyped setting, a sweep's failed jobs) reported as one line saying what to type."""

from __future__ import annotations

import difflib
import os
import re
import shlex
import sys
from collections.abc import Sequence
from contextlib import contextmanager

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, OverrideParseException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from charlm import Interrupted, UserError, user_error_in
from charlm.config import CONF_DIR, compose
from charlm.runs.sweeps import summarize, table

# Where a value that is no UTF-8 text can come from instead: a file, read as bytes or text
FROM_A_FILE = {"prompt": "prompt_file=PATH", "text": "file=PATH"}


def check_overrides(args: Sequence[str]) -> None:
    """Refuse, with one line naming the fix, an override holding bytes that are not UTF-8 (Python keeps them as
    surrogates), one Hydra's grammar cannot parse (``prompt=a(b``), and a config group chosen twice
    whose choices include one that writes at the top of the config (``model=gru model=rnn``: Hydra merges the two into
    a config that names settings neither has)."""
    from hydra._internal.utils import get_args_parser  # Hydra's own: which arguments are overrides

    overrides = get_args_parser().parse_known_args(list(args))[0].overrides
    parser = OverridesParser.create()
    chosen: dict[str, list[str]] = {}
    for line in overrides:
        key, _, value = line.partition("=")
        if any("\udc80" <= c <= "\udcff" for c in line):
            elsewhere = FROM_A_FILE.get(key.lstrip("+~"))
            instead = f", or put the text in a file and pass {elsewhere}" if elsewhere else ""
            raise UserError(f"{key}= holds bytes that are not UTF-8 text; pass UTF-8 text{instead}.")
        try:
            (override,) = parser.parse_overrides([line])
        except OverrideParseException:
            escaped = value.replace("\\", "\\\\").replace('"', '\\"')
            quoted = shlex.quote(key + '="' + escaped + '"')
            raise UserError(
                f"{line!r} is not an override Hydra can read; quote its value for Hydra inside the shell's quotes:"
                f" {quoted}."
            ) from None
        group = override.key_or_group
        if override.is_force_add() or override.is_add() or override.is_delete():
            continue
        if "/" in group or (CONF_DIR / group).is_dir():
            chosen.setdefault(group, []).append(line)
    for group, lines in chosen.items():
        # a later plain choice replaces an earlier one; a choice that writes at the top (# @package _global_) is
        # merged with the other instead, into a config naming settings neither has
        files = [CONF_DIR / group / f"{line.partition('=')[2]}.yaml" for line in lines]
        merged = any(f.is_file() and f.read_text("utf-8").startswith("# @package _global_") for f in files)
        if len(lines) > 1 and merged:
            raise UserError(
                f"{group}= is chosen twice ({', '.join(lines)}); pass one {group}= choice, the one you mean."
            )


failed_jobs: list[str] = []  # one line for each job of a sweep that failed in this process (Hydra's basic launcher)


@contextmanager
def hydra_errors_reported(config_name: str):
    """Report what Hydra itself would print as a traceback or as advice to follow as one line naming the fix:
    a mistyped setting (Hydra advises ``+key=value``, which adds a key nothing reads: here the closest known key is
    named instead), and the failed jobs of a sweep, whose first error Hydra's basic sweeper re-raises at its end.

    Hydra prints an error inside its ``hydra.main`` and exits; with ``HYDRA_FULL_ERROR=1`` it re-raises it instead,
    so it is set here (not when the user set it: then Hydra reports as it does)."""
    if os.environ.get("HYDRA_FULL_ERROR") is not None:
        yield
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    except KeyboardInterrupt:  # Ctrl+C outside training (composing, building the token cache, sampling)
        print(
            "error: stopped by Ctrl+C; nothing half-written is kept (a token cache is only ever moved in whole).",
            file=sys.stderr,
        )
        raise SystemExit(Interrupted.exit_code) from None
    except ConfigCompositionException as e:
        key = unknown_key(e)
        if key is None:  # what Hydra prints for a CompactHydraException
            cause = f"\n{e.__cause__}" if isinstance(e.__cause__, OmegaConfBaseException) else ""
            print(f"{e}{cause}", file=sys.stderr)
            raise SystemExit(1) from None
        known = known_keys(config_name)
        if key in known:  # a setting of the shipped config that this composition lost (e.g. a user's config file)
            line = f"{key} is not a setting of the config these choices compose; check the group choices given"
            print(f"error: {line} (the config: --cfg job).", file=sys.stderr)
            raise SystemExit(UserError.exit_code) from None
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        fix = f"did you mean {close[0]}" if close else "check its spelling"
        print(f"error: {key} is not a setting; {fix}? (all of them: --cfg job)", file=sys.stderr)
        raise SystemExit(UserError.exit_code) from None
    except Exception as e:
        cause = user_error_in(e)
        if cause is None:
            raise
        if getattr(cause, "sweep_dir", None):  # a sweeper that stops on a failed job skips SweepSummary's end
            print(table(summarize(cause.sweep_dir)))
        for line in failed_jobs or [getattr(cause, "sweep_line", str(cause))]:  # jobs elsewhere: the first
            print(f"error: {line}", file=sys.stderr)
        raise SystemExit(cause.exit_code) from None
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)


def unknown_key(error: ConfigCompositionException) -> str | None:
    """The dotted key of an override that names no setting (``model.hiden_size=64``), or None for other errors."""
    cause = error.__cause__
    if isinstance(cause, ConfigKeyError) and cause.full_key:
        return str(cause.full_key)
    found = re.match(r"Could not override '([^']+)'", str(error))
    return found.group(1) if found and isinstance(cause, ConfigAttributeError | ConfigKeyError) else None


def known_keys(config_name: str) -> list[str]:
    """Every dotted key of the shipped ``config_name`` config with its defaults, groups' nodes included."""

    def walk(node: object, prefix: str) -> list[str]:
        if not isinstance(node, dict):
            return []
        return [k for key, value in node.items() for k in (f"{prefix}{key}", *walk(value, f"{prefix}{key}."))]

    return walk(OmegaConf.to_container(compose(config_name=config_name)), "")
