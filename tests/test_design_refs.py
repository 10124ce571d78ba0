"""Every citation of the design document names a section that exists in docs/design.md.

Comments cite sections as ``docs/design.md 4.5`` (or ``docs/design.md 6, 7``, possibly wrapped
onto the next comment line). The document once lived outside the repository under an upper-case
name; a citation by that old name, with or without a section, fails too, so that the repointing
cannot regress.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "design.md"
SUFFIXES = (".py", ".md", ".cu", ".cuh", ".sh")

# A section number, then more after commas: "4.5", "6, 7".
_NUMBERS = r"(\d+(?:\.\d+)*(?:\s*,\s*\d+(?:\.\d+)*)*)"
# Between the path and the number: spaces, or one line break followed by a comment leader
# ("#", " * ", "//") as a wrapped comment or docstring line starts.
_GAP = r"[ \t]*(?:\n[ \t]*(?:#|\*|//)?[ \t]*)?"
# The old name is the upper-case file name; it is spelt in two pieces here so that this file
# does not cite it. Citations by either name are checked for their section.
_OLD = "DESIGN" + r"\.md"
CITATION = re.compile(r"(?:docs/design\.md|" + _OLD + ")" + _GAP + _NUMBERS)
OLD_NAME = re.compile(_OLD)
HEADING = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)*)\.?\s", re.MULTILINE)


def sections(text: str) -> set[str]:
    """Section numbers of the headings of a Markdown text: "## 4. Algorithms" -> "4"."""
    return set(HEADING.findall(text))


def citations(text: str) -> list[tuple[int, str]]:
    """(line, section) for every section cited as ``docs/design.md N[.M]`` (or by the old name)."""
    found = []
    for match in CITATION.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        found.extend((line, number.strip()) for number in match.group(1).split(","))
    return found


def old_name_lines(text: str) -> list[int]:
    return [text.count("\n", 0, m.start()) + 1 for m in OLD_NAME.finditer(text)]


def tracked_text_files() -> list[Path]:
    """The repository's files with a text suffix, tracked or new but not ignored (so a file not yet
    added is checked too); without git, the tree minus hidden and build folders (so the test
    still runs from an unpacked source archive)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout
        names = [n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        skip = {"build", "dist", "node_modules"}
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                 if p.is_file() and not any(part.startswith(".") or part in skip or part.endswith(".egg-info")
                                            for part in p.relative_to(ROOT).parts[:-1])]
    return [ROOT / n for n in sorted(set(names)) if n.endswith(SUFFIXES) and (ROOT / n).is_file()]


def test_parser_reads_wrapped_and_listed_citations():
    text = ('x = 1  # see docs/design.md 4.5\n'
            '"""Budget (the drift rule, docs/design.md\n    4.6)."""\n'
            '/* layout: docs/design.md\n * 7.3 */\n'
            'A buffer (docs/design.md 6, 7).\n'
            'Where docs/design.md differs from upstream it is followed.\n')
    assert citations(text) == [(1, "4.5"), (2, "4.6"), (4, "7.3"), (6, "6"), (6, "7")]
    assert citations("old: " + "DESIGN" + ".md 9.9\n") == [(1, "9.9")]
    assert old_name_lines("ok: docs/design.md 4.1\nbad: " + "DESIGN" + ".md 4.1\n") == [2]
    assert sections("# Title\n## 4. Algorithms\n### 4.10 Tail\nnot ## 5 heading\n") == {"4", "4.10"}


def test_every_cited_section_exists():
    known = sections(DESIGN.read_text(encoding="utf-8"))
    assert {"4.1", "4.5", "6", "7.3"} <= known, f"{DESIGN} lost its numbered headings"
    bad, total = [], 0
    for path in tracked_text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        rel = path.relative_to(ROOT)
        for line, number in citations(text):
            total += 1
            if number not in known:
                bad.append(f"{rel}:{line}: cites section {number}, which is no heading of docs/design.md")
        bad.extend(f"{rel}:{line}: cites the old design note; write docs/design.md and a section"
                   for line in old_name_lines(text))
    assert not bad, "\n".join(bad)
    assert total > 0, "found no citation at all: the scan is looking in the wrong place"
