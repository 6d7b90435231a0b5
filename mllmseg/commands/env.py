"""`mllmseg env`: the versions in use and whether each is inside the tested range (paste it into bug reports)."""
from __future__ import annotations

import json


def register(subparsers) -> None:
    helptext = "print the versions of python, torch, transformers & co. and whether each is inside the tested range"
    parser = subparsers.add_parser("env", help=helptext, description=helptext)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..environment import environment_report, format_report

    report = environment_report()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
