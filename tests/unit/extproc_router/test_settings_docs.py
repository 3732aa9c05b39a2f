"""The README's settings tables agree with the configuration: every env var, `router:` key and `serve`
flag they list exists and maps to the setting it says, every default they show is the config's, and
nothing the config reads from the environment or the pod file is left out."""

from __future__ import annotations

import argparse
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from extproc_router.cli import build_parser
from extproc_router.config import ENV_VARS, RouterConfig
from extproc_router.policy import ENV_API_KEY
from routing.router import DEFAULT_STRATEGY
from routing.strategies.prefix_cache import DEFAULT_BLOCK_SIZE, PrefixCacheSettings

README = Path(__file__).resolve().parents[3] / "README.md"

# Environment variables read outside RouterConfig, by the module named.
OTHER_ENV = {ENV_API_KEY}  # extproc_router.policy: API keys
# RouterConfig fields that are not `router:` keys of the pod file.
NOT_KEYS = {
    "pods_file",  # --config itself
    "log_level",  # logging starts before the pod file is read (cli.cmd_serve): only env and flag apply
}
# `serve` flags documented elsewhere in the README.
OTHER_FLAGS = {"--config"}
# What a RouterConfig default of None stands for (the README shows that value).
_PC = PrefixCacheSettings()
BUILT_IN: dict[str, list[Any]] = {
    "routing_algorithm": [DEFAULT_STRATEGY],
    "prefix_cache_hash_seed": [_PC.hash_seed],
    "prefix_cache_block_size": list(DEFAULT_BLOCK_SIZE.values()),  # "128 bytes / 16 tokens"
}


def settings_rows() -> list[dict[str, str]]:
    """Rows of every README table with an `env` and a `default` column, as {column: cell}."""
    rows: list[dict[str, str]] = []
    header: list[str] | None = None
    for line in README.read_text().splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = [c.replace("`", "").lower() for c in cells]
        elif not set(cells) <= {"---", ":---", "---:"} and {"env", "default"} <= set(header):
            rows.append(dict(zip(header, cells, strict=True)))
    return rows


def names(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def documented(cell: str) -> list[Any]:
    """The value(s) a default cell states: `unset`, `true`/`false`, a number (units after it are
    ignored) or a word; several separated by " / "."""
    values: list[Any] = []
    for part in cell.split(" / "):
        word = part.replace("`", "").split()[0]
        if word == "unset":
            values.append(None)
        elif word in ("true", "false"):
            values.append(word == "true")
        else:
            try:
                values.append(int(word, 0))
            except ValueError:
                try:
                    values.append(float(word))
                except ValueError:
                    values.append(word)
    return values


def expected(key: str) -> list[Any]:
    value = getattr(RouterConfig(), key)
    return BUILT_IN[key] if value is None and key in BUILT_IN else [value]


def same(a: list[Any], b: list[Any]) -> bool:
    """Equal, with numbers compared by value (1 == 1.0) but booleans never equal to numbers."""
    return len(a) == len(b) and all((x is y) if isinstance(x, bool) or isinstance(y, bool) else x == y
                                    for x, y in zip(a, b, strict=True))


def serve_flags() -> dict[str, argparse.Action]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {opt: action for action in sub.choices["serve"]._actions for opt in action.option_strings
            if opt.startswith("--") and opt != "--help"}


ROWS = settings_rows()
CONFIG_FIELDS = {f.name for f in fields(RouterConfig)}


def test_the_readme_has_the_settings_tables() -> None:
    assert len(ROWS) >= len(ENV_VARS), "README settings tables not found"


@pytest.mark.parametrize("row", ROWS, ids=lambda r: " ".join(names(r["env"]) + names(r.get("flag", ""))
                                                               + names(r.get("router: key", ""))) or "?")
def test_each_row_names_real_settings_and_their_defaults(row: dict[str, str]) -> None:
    envs, flags, keys = names(row["env"]), names(row.get("flag", "")), names(row.get("router: key", ""))
    assert len(envs) <= 1 and len(flags) <= 1 and len(keys) <= 1, "one setting per row"
    assert envs or flags or keys, "a row names its env var, flag or `router:` key"
    key = keys[0] if keys else None
    for env in envs:
        assert env in ENV_VARS or env in OTHER_ENV, f"{env}: not an environment variable the router reads"
        if env in ENV_VARS:
            assert key in (None, ENV_VARS[env]), f"{env} sets {ENV_VARS[env]}, not {key}"
            key = ENV_VARS[env]
    if key is not None:
        assert key in CONFIG_FIELDS, f"{key}: not a RouterConfig field"
    for flag in flags:
        action = serve_flags().get(flag)
        assert action is not None, f"{flag}: not a `serve` flag"
        if action.dest in CONFIG_FIELDS:
            assert key == action.dest, f"{flag} sets {action.dest}, not {key}"
            assert action.default is None, f"{flag}: the config's default applies, the flag has none"
        elif key is None and action.default is not None:
            assert same(documented(row["default"]), [action.default]), \
                f"{flag}: README says {row['default']}, the flag's default is {action.default!r}"
    if key is not None:
        assert same(documented(row["default"]), expected(key)), \
            f"{key}: README says {row['default']}, the config's default is {expected(key)}"


def test_every_setting_is_in_a_table() -> None:
    envs = {e for row in ROWS for e in names(row["env"])}
    keys = {k for row in ROWS for k in names(row.get("router: key", ""))}
    flags = {f for row in ROWS for f in names(row.get("flag", ""))}
    assert set(ENV_VARS) - envs == set(), "environment variables missing from the README's tables"
    assert CONFIG_FIELDS - NOT_KEYS - keys == set(), "`router:` keys missing from the README's tables"
    assert set(serve_flags()) - OTHER_FLAGS - flags == set(), "`serve` flags missing from the README's tables"


def test_serve_help_shows_the_configs_defaults() -> None:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    text = sub.choices["serve"].format_help()
    for flag, action in serve_flags().items():
        if action.dest in CONFIG_FIELDS and action.help:
            entry = re.search(rf"^ +{flag}\b(.*?)(?=^ +-|\Z)", text, re.M | re.S)
            assert entry is not None, flag
            value = expected(action.dest)[0]
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            assert f"(default {shown})" in " ".join(entry.group(1).split()), (flag, entry.group(1))
