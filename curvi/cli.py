"""The ``curvi`` command."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .demo import run_demo


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``curvi`` console script."""
    parser = argparse.ArgumentParser(prog="curvi", description="curvature-aware VI for Pyro")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="fit lme4's cbpp GLMM with AmortizedLaplaceGuide and summarise the posterior"
    )
    demo.add_argument("--steps", type=int, default=3000, help="most SVI steps (default 3000)")
    demo.add_argument("--draws", type=int, default=20_000, help="posterior draws for the summary")
    demo.add_argument("--out", default="cbpp_posterior.png", help="PNG of the posterior marginals")
    demo.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.steps < 1 or args.draws < 2:
            parser.error("--steps must be >= 1 and --draws >= 2")
        run_demo(
            steps=args.steps,
            num_draws=args.draws,
            out=None if args.no_plot else args.out,
            seed=args.seed,
            progress=not args.quiet,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
