"""Command line for one training run, on one process or data-parallel under torchrun.

The run is a :class:`gnlib.experiment.runs.RunSpec` (the object a notebook passes to
:func:`gnlib.experiment.runs.run`), read from a YAML or JSON file of its fields (``--config``) and/or given
as flags, one per field; a flag overrides the file. Exit status (:func:`cli`): 0 when the run ends, 2 with one
``error:`` line on unusable input (:data:`INPUT_ERRORS`), 128 + the signal after SIGINT or SIGTERM. Commands,
the output folder, resuming and the exit statuses: docs/several-processes.md, section "The command line".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from gnlib import distributed
from gnlib.experiment.history import History
from gnlib.experiment.run_folder import CheckpointNotWritten, RunFolderBusy, load_weights
from gnlib.experiment.runs import RunSpec, run
from gnlib.experiment.train import RunInterrupted
from gnlib.runtime import ConfigLoader

FIELDS = tuple(f.name for f in dataclasses.fields(RunSpec))


def parse_value(text: str) -> Any:
    """A flag's value: JSON if it parses (``3e-3``, ``null``, ``{"inner_steps": 4}``), else YAML.

    YAML (``cuda``, ``{ema: 1e-3}``) is read by :class:`~gnlib.runtime.ConfigLoader`, like config files:
    ``1e-3`` is a float.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return yaml.load(text, Loader=ConfigLoader)


def read_config(path: str | Path) -> dict[str, Any]:
    """The RunSpec fields in a YAML (``.yaml``/``.yml``, read like sweep grids: ``3e-3`` is a float) or JSON file.

    Raises:
        ValueError: the file cannot be read or parsed (naming it, with the line), does not hold a mapping,
            or names a key that is not a RunSpec field.
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as stream:  # a named stream: YAML errors name the file
            config = json.load(stream) if path.suffix == ".json" else yaml.load(stream, Loader=ConfigLoader)
    except OSError as err:
        raise ValueError(f"config {path} cannot be read ({err.strerror or err}); check --config's path") from None
    except UnicodeDecodeError as err:
        reason = f"{err.reason} at byte {err.start}"
        raise ValueError(f"config {path} is not UTF-8 text ({reason}); give a YAML or JSON file") from None
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise ValueError(f"config {path} is not valid {kind}: {err}") from None
    config = {} if config is None else config
    if not isinstance(config, dict):
        raise ValueError(f"config {path} must hold a mapping of RunSpec fields, got {type(config).__name__}")
    unknown = sorted(set(config) - set(FIELDS))
    if unknown:
        raise ValueError(f"config {path} has unknown key(s) {unknown}; allowed: {list(FIELDS)}")
    return config


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``--config``, ``--name``, ``--output_dir``, ``--checkpoint_every`` and one flag per RunSpec field."""
    parser = argparse.ArgumentParser(prog="python -m gnlib.tools.train_cli", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML or JSON file of RunSpec fields")
    parser.add_argument("--name", help="run name: outputs/<name>/ (default: the config file's stem, else 'run')")
    parser.add_argument("--output_dir", help="where History and checkpoints go (default: outputs/<name>)")
    parser.add_argument("--checkpoint_every", type=int, default=0, help="checkpoint period in steps (0: at the end)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--overwrite", action="store_true", help="replace a run with other settings in the output dir")
    for name in FIELDS:
        parser.add_argument(
            f"--{name}",
            type=parse_value,
            default=None,
            metavar="VALUE",
            help=f"RunSpec.{name} (JSON or YAML: 3e-3, null, '{{inner_steps: 4}}')",
        )
    return parser.parse_args(argv)


def spec_from_args(args: argparse.Namespace) -> RunSpec:
    """The RunSpec of the config file updated by the flags given; validated.

    ``init_checkpoint`` is read here, so that a file that holds no model weights is named before the
    corpus is built.

    Raises:
        ValueError: unknown config keys or any invalid field (before data or model are built).
    """
    config = read_config(args.config) if args.config else {}
    flags = {name: getattr(args, name) for name in FIELDS if getattr(args, name) is not None}
    config.update(flags)
    spec = RunSpec(**config)
    try:
        spec.validate()
    except ValueError as err:
        source = " and ".join([f"config {args.config}"] * bool(args.config) + ["flags"] * bool(flags))
        raise ValueError(f"{err} (settings from {source or 'defaults'})") from err
    if spec.init_checkpoint is not None:
        load_weights(spec.init_checkpoint, "cpu", parameter="init_checkpoint")
    return spec


def main(argv: Sequence[str] | None = None) -> History:
    """Run the experiment the arguments describe (data-parallel when started by torchrun); return its History."""
    args = parse_args(argv)
    spec = spec_from_args(args)
    name = args.name or (Path(args.config).stem if args.config else "run")
    output_dir = Path(args.output_dir) if args.output_dir else Path("outputs") / name
    distributed.init_from_env(spec.device)
    try:
        return run(
            spec, output_dir, progress=not args.quiet, checkpoint_every=args.checkpoint_every, overwrite=args.overwrite
        )
    finally:
        distributed.shutdown()


#: What :func:`cli` reports as ``error: <message>`` and exit status 2: input that cannot be used (the
#: data and tokenizer modules raise FileNotFoundError and ConnectionError naming the source), a busy
#: output folder, and outputs that cannot be written.
INPUT_ERRORS = (ValueError, RunFolderBusy, FileNotFoundError, ConnectionError, CheckpointNotWritten)


def cli(argv: Sequence[str] | None = None) -> int:
    """:func:`main` for the shell: exit status 0, 2 (``error: ...`` on unusable input) or 128 + the signal.

    A run stopped by SIGINT or SIGTERM prints (rank 0 only) the line saying how to resume it; an interrupt
    outside the training steps (before training, or a second Ctrl-C) one line too.
    """
    try:
        main(argv)
    except INPUT_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunInterrupted as err:
        if os.environ.get("RANK", "0") == "0":
            print(err, file=sys.stderr)
        return 128 + err.signum
    except KeyboardInterrupt:
        kept = "the output folder keeps the last checkpoint written, if any"
        print(f"interrupted: {kept}; run the same command again to resume", file=sys.stderr)
        return 128 + signal.SIGINT
    return 0


if __name__ == "__main__":
    sys.exit(cli())
