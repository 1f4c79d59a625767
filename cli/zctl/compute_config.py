"""A compute's own configuration, kept across restarts although its data directory is not.

A compute's data directory is rebuilt from a base backup at every start, so
whatever lives only there would be lost: the settings ALTER SYSTEM wrote
into postgresql.auto.conf, and pg_hba.conf / pg_ident.conf. The compute's
spec keeps them instead: `settings` (the auto.conf contents, from `zctl pg
create -c`, `zctl pg config --set/--reset`, or ALTER SYSTEM inside the
compute, read back from the data directory at stop and before the next
start, so a kill -9 loses nothing either) and its extra pg_hba / pg_ident
lines. Every start writes them into the new data directory.

Some settings are zctl's: the compute's address, its synchronous standby
(the walreceiver), what makes it a standby. `zctl pg config` refuses them;
an ALTER SYSTEM of one is dropped when read back, with a warning, instead
of silently breaking the compute.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from pgformat.autoconf import AutoConfError, parse_auto_conf

# Settings zctl sets for every compute and a user must not change (name -> why).
OWNED: Final = {
    "port": "zctl assigns each compute its port (`zctl pg create --port`)",
    "listen_addresses": "zctl sets where the compute listens (`zctl pg run --listen-addresses`)",
    "unix_socket_directories": "computes listen on TCP only",
    "synchronous_standby_names": "the walreceiver must be the synchronous standby, or commits are not durable",
    "hot_standby": "zctl makes read-only computes standbys",
    "data_directory": "the data directory is zctl's",
    "config_file": "the configuration files are zctl's",
    "hba_file": "use `zctl pg config --hba-add/--hba-remove`",
    "ident_file": "use `zctl pg config --ident-add/--ident-remove`",
    "logging_collector": "zctl keeps the compute's log in one file",
}
# Values a compute cannot run with (name -> (refused values, why)).
_REFUSED_VALUES: Final = {
    "wal_level": ({"minimal"}, "the walreceiver needs wal_level replica or logical"),
    "max_wal_senders": ({"0"}, "the walreceiver needs a WAL sender"),
}


class ComputeConfigError(ValueError):
    """A setting or pg_hba line that zctl cannot keep for a compute; the message says why."""


def check_setting(name: str, value: str | None = None) -> str:
    """The setting's name as Postgres knows it (lower case); ComputeConfigError if it is zctl's or
    `value` is one a compute cannot run with."""
    key = name.strip().lower()
    if key in OWNED:
        raise ComputeConfigError(f"{key} cannot be set for a compute: {OWNED[key]}")
    refused = _REFUSED_VALUES.get(key)
    if refused is not None and value is not None and value.strip().lower() in refused[0]:
        raise ComputeConfigError(f"{key} = {value} is not possible for a compute: {refused[1]}")
    return key


def read_back(auto_conf: str) -> tuple[dict[str, str], list[str]]:
    """The settings of a compute's postgresql.auto.conf worth keeping, and a warning per setting
    dropped (zctl's own, or a value the compute cannot run with)."""
    kept: dict[str, str] = {}
    warnings: list[str] = []
    try:
        settings = parse_auto_conf(auto_conf)
    except AutoConfError as e:
        return kept, [f"postgresql.auto.conf not kept: {e}"]
    for name, value in settings.items():
        try:
            kept[check_setting(name, value)] = value
        except ComputeConfigError as e:
            warnings.append(f"ALTER SYSTEM setting dropped: {e}")
    return kept, warnings


def updated(settings: Mapping[str, str], set_: Mapping[str, str], reset: list[str]) -> dict[str, str]:
    """`settings` with `set_` applied and `reset` removed (names checked)."""
    out = dict(settings)
    for name in reset:
        out.pop(check_setting(name), None)
    for name, value in set_.items():
        out[check_setting(name, value)] = value
    return out


def parse_assignment(text: str) -> tuple[str, str]:
    """`name=value` as given to -c / --set."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise ComputeConfigError(f"expected name=value, got {text!r}")
    return name.strip(), value.strip()


def check_hba_line(line: str) -> str:
    """A pg_hba.conf / pg_ident.conf line as kept: one line, not empty, not a comment."""
    text = " ".join(line.split())
    if not text or text.startswith("#") or "\n" in line.strip():
        raise ComputeConfigError(f"not a configuration line: {line!r}")
    return text
