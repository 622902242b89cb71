"""The README's configuration table, rendered from the declarations.

`python -m jobs.settings.readme` rewrites it in README.md, between its two markers;
tests/unit/test_config.py fails while README.md holds anything else there.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jobs.settings.declarations import DECLARED, Setting

README = Path(__file__).resolve().parents[2] / "README.md"
BEGIN = "<!-- settings: written by `python -m jobs.settings.readme` from jobs/settings/declarations.py -->"
END = "<!-- end of settings -->"


def _row(setting: Setting) -> str:
    shown = setting.shown_default
    default = f"`{shown}`" if shown is not None else "unset"
    flag = "environment only" if setting.secret else f"`{setting.flag}`"
    meaning = f"{setting.help} {setting.readme}".strip().replace("|", "\\|")
    return f"| `{setting.env}` | {flag} | {default} | {meaning} |"


def settings_table() -> str:
    """The markdown table, one row per setting, in declaration order."""
    lines = ["| variable | flag | default | meaning |", "| --- | --- | --- | --- |", *map(_row, DECLARED)]
    return "\n".join(lines)


def with_table(readme: str) -> str:
    """`readme` with the table between its markers replaced by the rendered one."""
    head, begin, rest = readme.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise ValueError(f"README.md lacks the markers {BEGIN!r} and {END!r}")
    return f"{head}{BEGIN}\n{settings_table()}\n{END}{tail}"


def main() -> int:
    text = README.read_text(encoding="utf-8")
    updated = with_table(text)
    if updated != text:
        README.write_text(updated, encoding="utf-8")
        print(f"rewrote the configuration table in {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
