"""The command line's overrides, checked before Hydra reads them: what Hydra would end in a traceback (bytes that
are not UTF-8, a value its grammar cannot parse) or compose into a broken config (one group chosen twice) gets one
line saying what to type instead."""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException

from charlm import UserError
from charlm.config import CONF_DIR

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
