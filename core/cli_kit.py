"""What every ``nectar`` command shares: options built from the config objects, and one logging setup.

A config class (a dataclass such as ``NodeConfig``, or a pydantic ``BaseSettings`` such as the ledger's ``Settings``)
documents each field with a trailing comment (continued on the following comment-only lines, if any) or a pydantic
``Field(description=...)``. ``options_of`` reads those, so a command's ``--help`` and ``docs/configuration.md`` say the
same thing as the code, and defaults are written once, in the class.
"""

from __future__ import annotations

import argparse
import ast
import collections.abc
import dataclasses
import inspect
import io
import logging
import textwrap
import tokenize
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
NOISY_LOGGERS = ("hivemind", "asyncio", "httpx", "urllib3", "web3", "alembic")  # chatty libraries: WARNING at least
_STRIPPED_MARKERS = ("fmt: skip", "noqa", "type: ignore")


@dataclass(frozen=True)
class Option:
    """One field of a config class, as a command line and the docs show it."""

    name: str  # the field name (also the argparse dest)
    annotation: Any  # the resolved type annotation
    default: Any  # the default value; dataclasses.MISSING where computed (default_factory)
    default_text: str  # the default as the docs show it
    help: str  # the field's comment or description
    env: str | None = None  # the environment variable that sets it (pydantic settings, RuntimeSettings)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _is_settings(cls) -> bool:
    return hasattr(cls, "model_fields") and hasattr(cls, "model_config")


@cache
def field_comments(cls) -> dict[str, str]:
    """``{field: comment}`` from the source of ``cls`` and its nectar base classes (a subclass's comment wins; a field
    redeclared without one keeps the base's): the comment ending a field's line, and any comment-only lines right
    below it (no blank line between)."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is cls or klass.__module__.split(".")[0] == "nectar":
            comments.update({k: v for k, v in _own_comments(klass).items() if v or k not in comments})
    return comments


def _own_comments(cls) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (frozen app, REPL class): help stays empty
        return {}
    rows: dict[int, str] = {}
    code_rows: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            rows[token.start[0]] = token.string.lstrip("#").strip()
        elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_rows.update(range(token.start[0], token.end[0] + 1))
    lines = source.splitlines()
    comments = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        parts, row = [], node.end_lineno
        if row in rows:
            parts.append(rows[row])
            row += 1
            while row in rows and row not in code_rows and lines[row - 1].strip():
                parts.append(rows[row])
                row += 1
        text = " ".join(parts)
        for marker in _STRIPPED_MARKERS:
            text = text.replace(marker, "").strip()
        comments[node.target.id] = text
    return comments


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if value == "":
        return "empty"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value) if value else "empty"
    if isinstance(value, Path):
        return str(value)
    return str(value)


def options_of(cls) -> dict[str, Option]:
    """Every field of ``cls`` (a dataclass or pydantic settings class), in declaration order."""
    comments = field_comments(cls)
    options = {}
    if _is_settings(cls):
        prefix = cls.model_config.get("env_prefix", "")
        for name, info in cls.model_fields.items():
            computed = info.default_factory is not None
            default = dataclasses.MISSING if computed else info.default
            options[name] = Option(
                name=name,
                annotation=info.annotation,
                default=default,
                default_text=_show(info.default_factory() if computed else default),
                help=info.description or comments.get(name, ""),
                env=f"{prefix}{name}".upper(),
            )
        return options
    hints = typing.get_type_hints(cls)
    env_var = getattr(cls, "env_var", None)  # RuntimeSettings names each field's variable
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING and field.metadata.get("default_text") is None:
            default = field.default_factory()  # a plain container ({} or [])
        else:
            default = dataclasses.MISSING
        text = field.metadata.get("default_text") or _show(default)
        options[field.name] = Option(
            name=field.name,
            annotation=hints[field.name],
            default=default,
            default_text=text,
            help=comments.get(field.name, ""),
            env=env_var(field.name) if env_var else None,
        )
    return options


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(the type inside Optional[...], whether it was optional)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _argparse_kwargs(option: Option) -> dict:
    kind, _ = _unwrap(option.annotation)
    kind = typing.get_args(kind)[0] if typing.get_origin(kind) is typing.Annotated else kind
    origin = typing.get_origin(kind)
    if origin is Literal:
        return {"choices": list(typing.get_args(kind))}
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin in (list, tuple, collections.abc.Sequence) or kind in (list, tuple):
        return {"nargs": "+"}
    if isinstance(kind, type) and kind is not str:  # int, float, Path, Decimal...
        return {"type": kind}
    return {}


def add_options(
    parser: argparse.ArgumentParser, cls, names: Iterable[str], *, overrides: Mapping[str, dict] | None = None
) -> None:
    """Adds ``--field-name`` options for ``names`` of ``cls``, with the field's help and type.

    On a dataclass the option's default is the field's, so the parsed values build the config as they stand
    (``config_values``). On pydantic settings the default is None: a flag not given leaves the field to its
    environment variable, ``.env`` file, then default (the help names all three). ``overrides`` maps a field to
    argparse keywords that win over the derived ones (``flags`` for other spellings, ``help``, ``type``...)."""
    options, overrides = options_of(cls), dict(overrides or {})
    settings = _is_settings(cls)
    for name in names:
        option = options[name]
        kwargs = {"dest": name, **_argparse_kwargs(option)}
        kwargs["default"] = None if settings or option.default is dataclasses.MISSING else option.default
        extra = dict(overrides.get(name, {}))
        flags = extra.pop("flags", [option.flag])
        help_text = extra.pop("help", option.help) or ""
        kwargs.update(extra)
        if "choices" not in kwargs and kwargs.get("action") is None:
            kwargs.setdefault("metavar", flags[-1].lstrip("-").upper().replace("-", "_"))
        if help_text is not argparse.SUPPRESS:
            if settings:
                shown = option.default_text if option.default is not dataclasses.MISSING else None
                tail = f"default: {shown}; " if shown and shown != "none" and "default" not in help_text else ""
                help_text = f"{help_text} ({tail}env {option.env})".strip()
            elif kwargs["default"] is not None and kwargs["default"] is not False and "default" not in help_text:
                help_text = f"{help_text} (default: {_show(kwargs['default'])})".strip()
            help_text = help_text.replace("%", "%%")
        parser.add_argument(*flags, help=help_text, **kwargs)


def config_values(args: argparse.Namespace, names: Iterable[str], *, given_only: bool = False) -> dict:
    """``{field: value}`` for ``names`` from parsed ``args``; ``given_only`` drops those left at None (settings)."""
    values = {name: getattr(args, name) for name in names}
    return {k: v for k, v in values.items() if v is not None} if given_only else values


def add_logging_options(parser: argparse.ArgumentParser, *, default: str = "INFO", verbose: str | None = None) -> None:
    """``--log-level`` (and ``-v/--verbose`` = ``verbose``'s level, where the command had it); see ``setup_logging``."""
    parser.add_argument(
        "--log-level",
        default=None,
        type=str.upper,
        choices=LOG_LEVELS,
        metavar="LEVEL",
        help=f"{', '.join(LOG_LEVELS[:4])} (default: {default}, or NECTAR_LOG_LEVEL)",
    )
    if verbose is not None:
        parser.add_argument("-v", "--verbose", action="store_true", help=f"log at {verbose} (as --log-level {verbose})")
    parser.set_defaults(log_default=default, log_verbose=verbose)


def log_level_of(args: argparse.Namespace) -> str:
    """The level a command logs at: --log-level, else -v, else NECTAR_LOG_LEVEL, else the command's default."""
    from nectar.settings import current

    if getattr(args, "log_level", None):
        return args.log_level
    if getattr(args, "verbose", False) and getattr(args, "log_verbose", None):
        return args.log_verbose
    return current().log_level or getattr(args, "log_default", "INFO")


def setup_logging(args: argparse.Namespace, *, libraries: str = "WARNING") -> str:
    """The one logging setup of every command: one format on stderr, the level of ``log_level_of``, and the chatty
    libraries at ``libraries`` (or the command's level, if higher). Returns the level's name (for uvicorn, Celery)."""
    level = log_level_of(args)
    logging.basicConfig(level=level, format=LOG_FORMAT)
    quiet = max(logging.getLevelName(level), logging.getLevelName(libraries))
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(quiet)
    return level


SWARM_HELP = (
    "a swarm file (TOML, JSON or YAML: name, initial_peers, optionally model and ledger_url) naming the swarm to "
    "join where --initial-peers is not given (default: NECTAR_SWARM); see docs/operators.md"
)


def add_swarm_option(parser: argparse.ArgumentParser) -> None:
    """``--swarm FILE``: read with ``swarm_file``."""
    parser.add_argument("--swarm", default=None, metavar="FILE", help=SWARM_HELP)


def read_swarm_file(path: str | Path):
    """The checked ``SwarmFile`` at ``path`` (``nectar.wire.peers.parse_swarm``), read up to its size limit; raises
    ``SwarmFileError`` (a ValueError) saying what to fix."""
    from nectar.wire.peers import MAX_SWARM_FILE_BYTES, SwarmFileError, parse_swarm

    path = Path(path).expanduser()
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SWARM_FILE_BYTES + 1)
    except OSError as e:
        raise SwarmFileError(
            f"swarm file {path} cannot be read ({e.strerror or e}): check the path given to --swarm or NECTAR_SWARM"
        ) from None
    return parse_swarm(raw, str(path))


def swarm_file(explicit: str | Path | None = None, *, env: Mapping[str, str]):
    """The swarm file given by ``--swarm`` (``explicit``), else by ``NECTAR_SWARM`` in ``env``, checked; None if
    neither is set."""
    path = explicit or (env.get("NECTAR_SWARM") or "").strip()
    return read_swarm_file(path) if path else None


def interrupt_on_sigterm() -> None:
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does: the command's ``finally`` stops its child processes. Python's
    default for SIGTERM ends the process at once, leaving every child it started running (issue 24)."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
