"""The ``captum-vlm`` command."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="captum-vlm",
        description="Explain vision-language models (CLIP, SigLIP, BLIP, ViLT, LLaVA) with Captum.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="explain the bundled zoo model on a bundled scene")
    demo.add_argument("--out", default="demo-output", help="folder for the demo's output")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        print(
            "captum-vlm demo: the bundled zoo model is not trained yet (issue: Zoo). "
            "This placeholder says so; nothing was written."
        )
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
