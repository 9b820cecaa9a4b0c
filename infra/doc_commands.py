"""The shell commands of a Markdown page: every line of its ```bash blocks, with the section it is in.

Used by the tests that keep docs/scaling-out.md honest (tests/test_infra_static.py checks that every command
is covered by a check; tests/test_infra_stack.py runs the rehearsal commands of section 1 verbatim).

    python infra/doc_commands.py docs/scaling-out.md     # list them
"""
from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "scaling-out.md"


@dataclasses.dataclass(frozen=True)
class Command:
    section: str  # the heading above the block, e.g. "1. Rehearse on one machine"
    block: int    # index of the ```bash block in the page
    line: int     # 1-based line number in the page
    text: str

    @property
    def section_number(self) -> str:
        m = re.match(r"(\d+)\.", self.section)
        return m.group(1) if m else ""


def commands(text: str) -> list[Command]:
    """Every non-empty, non-comment line of the ```bash / ```sh blocks (lines ending in a backslash joined)."""
    out: list[Command] = []
    section, block, in_block, buf, start = "", -1, False, "", 0
    for i, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not in_block:
            m = re.match(r"^#{1,6}\s+(.*)$", line)
            if m:
                section = m.group(1).strip()
            elif re.match(r"^```(bash|sh|shell|console)\s*$", s):
                in_block, block = True, block + 1
            continue
        if s.startswith("```"):
            in_block = False
            continue
        if not buf and (not s or s.startswith("#")):
            continue
        if not buf:
            start = i
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        out.append(Command(section, block, start, (buf + s).strip()))
        buf = ""
    return out


def doc_commands(path: Path = DOC) -> list[Command]:
    return commands(path.read_text())


if __name__ == "__main__":
    for c in doc_commands(Path(sys.argv[1]) if len(sys.argv) > 1 else DOC):
        print(f"{c.line:4d} [{c.section_number or '-'}] {c.text}")
