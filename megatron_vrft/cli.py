"""The command-line front of every tool that takes a run config (train, evaluate).

One way to read ``--config RUN.yaml [dotted.key=value ...]`` and ``--help-config``, and one way to
end: a user error (config, data, a path) prints one line ``error: ...`` on standard error and exits
with :data:`EXIT_USER_ERROR`; anything else is a crash with its traceback (exit 1).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import yaml

from megatron_vrft.config import RUN_CONFIG_FILE, ConfigError, VisualRFTConfig, describe_config, load_config

EXIT_OK = 0
EXIT_USER_ERROR = 2
"""A config, data or path error the user can fix; the message names it."""


class UserError(Exception):
    """An error in what the user asked for (not a bug): printed as one line, exit :data:`EXIT_USER_ERROR`."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types a front reports as one line: config and data errors, missing paths, YAML syntax."""
    from megatron_vrft.data.errors import DataError

    return (UserError, ConfigError, DataError, FileNotFoundError, NotADirectoryError, yaml.YAMLError)


def config_parser(description: str | None) -> argparse.ArgumentParser:
    """An argument parser with the shared config arguments: ``--config``, ``--help-config`` and the
    trailing ``dotted.key=value`` overrides (a tool adds its own flags). ``--config`` is checked by
    :func:`load_run_config`, so that ``--help-config`` works without it."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML run config (required)")
    parser.add_argument("--help-config", action="store_true", help="list every config field and exit")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    return parser


def load_run_config(args: argparse.Namespace) -> VisualRFTConfig:
    """The config ``args`` name (``--config`` plus overrides); raises a user error."""
    if args.config is None:
        raise UserError("--config RUN.yaml is required (python3 tools/train.py --help-config lists every field)")
    try:
        return load_config(args.config, args.overrides)
    except FileNotFoundError as err:
        raise UserError(f"--config {args.config}: no such file") from err
    except yaml.YAMLError as err:  # a syntax error: name the file and the place
        where = getattr(err, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        raise UserError(f"--config {args.config}: not valid YAML{at}: {getattr(err, 'problem', err)}") from err


@contextmanager
def reported_as_user_errors(*types: type[BaseException]) -> Iterator[None]:
    """Inside the block, exceptions of ``types`` (e.g. a tool's ``ValueError`` of bad input) become
    :class:`UserError`: :func:`run` reports them as one line and exits with :data:`EXIT_USER_ERROR`."""
    try:
        yield
    except types as err:
        raise UserError(str(err)) from err


def run(
    main: Callable[[argparse.Namespace], int],
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
    *,
    report: Callable[[], bool] = lambda: True,
) -> int:
    """Parse ``argv``, answer ``--help-config``, then ``main(args)``; a user error becomes one line
    on standard error (printed where ``report()`` is true, e.g. rank 0 only) and
    :data:`EXIT_USER_ERROR`."""
    args = parser.parse_args(argv)
    if args.help_config:
        print("\n".join(describe_config()))
        return EXIT_OK
    try:
        return main(args)
    except user_errors() as err:
        if report():
            print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR


def find_run_config(checkpoint: str | Path) -> Path | None:
    """The run config the trainer wrote into its output directory (``RUN/config.json``) for a
    checkpoint inside it: ``RUN/checkpoints``, ``RUN/checkpoints/step_N`` or ``RUN/hf_checkpoint``
    (whose own ``config.json`` is the model's, not a run config). None when there is none."""
    path = Path(checkpoint).resolve()
    for folder in (path, *path.parents[:3]):
        candidate = folder / RUN_CONFIG_FILE
        if not candidate.is_file():
            continue
        try:
            values = json.loads(candidate.read_text())
        except ValueError:
            continue
        if isinstance(values, dict) and {"model", "data", "trainer"} <= values.keys():
            return candidate
    return None


LIBRARY_NOISE = (
    # megatron-core says at import that it falls back to torch without Apex / Transformer Engine:
    # expected on a CPU (and never install the PyPI package "apex")
    r".*Transformer Engine and Apex are not installed.*",
    r".*Apex is not installed.*",
    r"full scope is deprecated.*",  # megatron-core's own default of TransformerConfig.cuda_graph_scope
    r"When using async grad allreduce.*",  # megatron-core's advice about an env var for GPU overlap
)
"""Warnings of the libraries that say nothing to a user of this project (regexes of their messages)."""


def quiet_libraries() -> None:
    """A concise console: the expected library warnings (:data:`LIBRARY_NOISE`) off, and
    megatron-core's INFO lines (optimizer and DDP config dumps, the parameter-bucket list) below
    the console's level. Call before importing megatron."""
    for pattern in LIBRARY_NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("megatron").setLevel(logging.WARNING)
