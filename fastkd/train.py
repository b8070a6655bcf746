"""``python -m fastkd.train --config CONFIG.yaml [dotted.key=value ...]``: load the config, train.

The command line only: the run itself is `fastkd.trainer.run`, built from `fastkd.builders`.
"""

from __future__ import annotations

import argparse
import sys

from fastkd.config import dump_yaml, load_config, to_dict
from fastkd.distributed import cleanup
from fastkd.errors import Preempted, UserError
from fastkd.trainer import run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fastkd.train",
        description="Train a student (WSLD / KD / CE) from a YAML config. Keys: python -m fastkd.config",
    )
    parser.add_argument("--config", required=True, help="YAML config file (may use _base_: [...])")
    parser.add_argument(
        "overrides", nargs="*", help="dotted.key=value overrides, e.g. optim.lr=0.2"
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point. Exit status: 0 done; 2 a user mistake (one ``fastkd: error:`` line);
    3 diverged; 75 stopped by SIGTERM/SIGINT with its position saved (resume with
    run.resume=auto)."""
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(dump_yaml(to_dict(cfg)), end="")
            return 0
        run(cfg)
    except UserError as exc:
        print(f"fastkd: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Preempted as exc:
        print(f"fastkd: {exc} (exit code {exc.exit_code})", file=sys.stderr)
        return exc.exit_code
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
