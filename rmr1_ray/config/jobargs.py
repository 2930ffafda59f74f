"""The command line every job shares: `python -m jobs.<name> --config FILE key=value ... [--resume]`."""

from __future__ import annotations

import argparse
import sys
from typing import TypeVar

import yaml
from pydantic import BaseModel

from rmr1_ray.config.loader import ConfigError, load_config

T = TypeVar("T", bound=BaseModel)


def job_parser(prog: str, description: str, model: type[BaseModel], example: str) -> argparse.ArgumentParser:
    sections = ", ".join(model.model_fields)
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            f"Config sections: {sections}.\n"
            "Any key can be overridden as dotted key=value, e.g. trainer.total_steps=2.\n"
            "--print-config shows every key with its resolved value.\n\n"
            f"Example:\n  {example}"
        ),
    )
    parser.add_argument("--config", metavar="FILE", help="YAML config (may `extends:` another file)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def parse_job_config(parser: argparse.ArgumentParser, model: type[T], argv: list[str] | None) -> tuple[T, argparse.Namespace]:
    """Parse argv and load the config; config errors end the program with exit code 2 and a clear message."""
    args = parser.parse_args(argv)
    try:
        config = load_config(model, args.config, args.overrides)
    except ConfigError as exc:
        parser.exit(2, f"{parser.prog}: config error:\n{exc}\n")
    if args.print_config:
        sys.stdout.write(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        parser.exit(0)
    return config, args
