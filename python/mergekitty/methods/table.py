"""The README's method table, generated from the registry so the two cannot drift.

    python -m mergekitty.methods.table              # print the markdown table
    python -m mergekitty.methods.table --write README.md   # replace the marked section in place

The section sits between the lines ``<!-- methods:begin -->`` and ``<!-- methods:end -->``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .base import MergeMethod, ParamSpec
from .registry import all_methods

BEGIN = "<!-- methods:begin -->"
END = "<!-- methods:end -->"
_BASE = {"required": "required", "optional": "optional", "ignored": "—"}


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _param(spec: ParamSpec) -> str:
    if spec.required:
        return f"`{spec.name}` (required)"
    if spec.default is None:
        return f"`{spec.name}` (optional)"
    return f"`{spec.name}` = {_value(spec.default)}"


def _params(specs: tuple[ParamSpec, ...]) -> str:
    return ", ".join(_param(s) for s in specs) or "—"


def _name(m: MergeMethod) -> str:
    aliases = "".join(f" / `{a}`" for a in m.aliases)
    return f"`{m.name}`{aliases}"


def _title(m: MergeMethod) -> str:
    return f"[{m.pretty_name}]({m.paper_url})" if m.paper_url else m.pretty_name


def markdown_table(methods: tuple[MergeMethod, ...] | None = None) -> str:
    """The table, one row per method in registry order, ending with a newline."""
    rows = [
        "| `merge_method` | method | base model | parameters | per-model parameters | what it does |",
        "|---|---|---|---|---|---|",
    ]
    for m in methods if methods is not None else all_methods():
        desc = m.description.replace("|", "\\|").replace("\n", " ")
        rows.append(
            f"| {_name(m)} | {_title(m)} | {_BASE.get(m.base, m.base)} | {_params(m.global_params)} | {_params(m.model_params)} | {desc} |"
        )
    return "\n".join(rows) + "\n"


def readme_section(text: str) -> str:
    """What stands between the markers in ``text`` (ValueError if they are missing)."""
    try:
        start = text.index(BEGIN) + len(BEGIN)
        stop = text.index(END, start)
    except ValueError:
        raise ValueError(f"no '{BEGIN}' ... '{END}' section") from None
    return text[start:stop].strip("\n") + "\n"


def replace_section(text: str, table: str) -> str:
    start = text.index(BEGIN) + len(BEGIN)
    stop = text.index(END, start)
    return text[:start] + "\n" + table + text[stop:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mergekitty.methods.table", description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", metavar="README", help="replace the marked section of this file instead of printing")
    args = parser.parse_args(argv)
    table = markdown_table()
    if args.write is None:
        sys.stdout.write(table)
        return 0
    path = Path(args.write)
    path.write_text(replace_section(path.read_text(), table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
