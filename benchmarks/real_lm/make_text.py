"""Real English prose for the real-LM tables: a calibration file and a disjoint evaluation file.

    python benchmarks/real_lm/make_text.py --out ~/.cache/atv-sparse/real-lm-text

Source: the Python 3.11 documentation as Debian bookworm ships it (the ``python3.11-doc``
package, fetched with ``apt-get download``, never installed). Sphinx keeps every page's reST
source under ``html/_sources/``; this script turns a fixed list of pages into plain paragraphs:
code (literal blocks after ``::``, every directive with its body, doctest lines), tables and
section underlines are dropped, inline markup is reduced to its text. The calibration file is
the tutorial and the FAQ; the evaluation file is the HOWTOs; no page is in both. The package's
version and sha256, each page's sha256, and each output's size and sha256 go to
``sources.json`` beside the two files (a copy of it is committed with the results).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGE = "python3.11-doc"
SOURCES = "usr/share/doc/python3.11/html/_sources"
# Pages, in order. The tutorial and FAQ are the calibration text (about 66k SmolLM2 tokens); two
# HOWTOs by other authors on other topics (sockets, urllib2: about 6.5k tokens, sized so that the
# table fits the time a 2-core CPU shared with five other jobs gives it) are held out.
CALIBRATION_PAGES = [f"tutorial/{p}.rst.txt" for p in (
    "appetite", "interpreter", "introduction", "controlflow", "datastructures", "modules", "inputoutput",
    "errors", "classes", "stdlib", "stdlib2", "venv", "whatnow", "interactive", "floatingpoint", "appendix")] + [
    f"faq/{p}.rst.txt" for p in ("general", "programming", "design", "library", "extending", "windows", "gui",
                                 "installed")]
EVALUATION_PAGES = [f"howto/{p}.rst.txt" for p in ("sockets", "urllib2")]

_UNDERLINE = re.compile(r"^([=\-~^*+#`'\"])\1{2,}\s*$")
_TABLE = re.compile(r"^\s*(\+[-=+]+\+|=+(\s+=+)+)\s*$")
_DIRECTIVE = re.compile(r"^(\s*)\.\.(\s|$)")
_ROLE = re.compile(r":[a-zA-Z:]+:`([^`]*)`")
_FIELD = re.compile(r"^:[\w -]+:(\s|$)")
_ITEM = re.compile(r"^([-*+]|#\.|\d+\.|\(\d+\))\s+")
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]*>`_{1,2}")


def _role_text(match: re.Match) -> str:
    text = match.group(1)
    target = re.match(r"^(.*?)\s*<[^>]*>$", text)  # :ref:`words <label>` -> words
    if target and target.group(1):
        return target.group(1)
    return text.lstrip("~!").split(".")[-1] if text.startswith("~") else text.lstrip("!")


def inline_text(line: str) -> str:
    """``line`` with reST inline markup reduced to its words."""
    line = _ROLE.sub(_role_text, line)
    line = _LINK.sub(r"\1", line)
    line = re.sub(r"``([^`]+)``", r"\1", line)
    line = re.sub(r"`([^`]+)`_{0,2}", r"\1", line)
    line = re.sub(r"\*\*([^*]+)\*\*", r"\1", line)
    line = re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])", r"\1", line)
    line = re.sub(r"\|([\w -]+)\|", r"\1", line)  # substitution references
    line = re.sub(r"\b([\w.]+)__?(?=\W|$)", r"\1", line)  # named link references: coverage.py_
    return line.replace("\\ ", "")


def rest_to_prose(source: str) -> str:
    """The paragraphs of a reST page as plain text, one paragraph per line, blank-line separated."""
    paragraphs: list[str] = []
    current: list[str] = []
    skip_indent: int | None = None  # inside a block (literal or directive) indented deeper than this

    def flush():
        if current:
            text = " ".join(current).strip()
            if text.endswith("::"):
                text = text[:-2].rstrip() + ":" if not text[:-2].endswith(" ") else text[:-2].rstrip()
            if len(text.split()) >= 3:
                paragraphs.append(text)
            current.clear()

    for raw in source.splitlines():
        line = raw.rstrip()
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if not line or indent > skip_indent:
                continue
            skip_indent = None
        if not line:
            flush()
            continue
        stripped = line.strip()
        directive = _DIRECTIVE.match(line)
        if directive:
            flush()
            skip_indent = indent
            continue
        if _UNDERLINE.match(stripped) or _TABLE.match(line) or stripped.startswith((">>>", "... ", "$ ")):
            flush()
            continue
        if _FIELD.match(stripped):  # :author: ..., :version: ...
            flush()
            continue
        item = _ITEM.match(stripped)
        if item:  # each list item is a paragraph of its own, without its bullet
            flush()
            stripped = stripped[item.end():]
        ends_literal = stripped.endswith("::")
        current.append(inline_text(stripped))
        if ends_literal:
            flush()
            skip_indent = indent
    flush()
    return "\n\n".join(paragraphs) + "\n"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_package(workdir: Path) -> Path:
    """The ``.deb`` of ``PACKAGE``, downloaded into ``workdir`` with ``apt-get download``."""
    result = subprocess.run(["apt-get", "download", PACKAGE], cwd=workdir, capture_output=True, text=True)
    debs = sorted(workdir.glob(f"{PACKAGE}_*.deb"))
    if result.returncode != 0 or not debs:
        sys.exit(f"error: apt-get download {PACKAGE} failed ({result.stderr.strip()[-300:]}); "
                 "run `apt-get update` first, or pass --deb FILE")
    return debs[0]


def build(deb: Path, out: Path) -> dict:
    """Write calibration.txt, evaluation.txt and sources.json into ``out``; return the record."""
    with tempfile.TemporaryDirectory(prefix="atv-sparse-pydoc-") as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True,
                                 text=True).stdout.strip()
        record = {"package": PACKAGE, "version": version, "deb": deb.name, "deb_sha256": sha256(deb.read_bytes()),
                  "pages_root": SOURCES, "files": {}}
        for name, pages in (("calibration.txt", CALIBRATION_PAGES), ("evaluation.txt", EVALUATION_PAGES)):
            texts, page_records = [], []
            for page in pages:
                data = (Path(tmp) / SOURCES / page).read_bytes()
                texts.append(rest_to_prose(data.decode("utf-8")))
                page_records.append({"page": page, "bytes": len(data), "sha256": sha256(data)})
            body = "\n".join(texts).encode("utf-8")
            out.mkdir(parents=True, exist_ok=True)
            tmp_out = out / (name + ".tmp")
            tmp_out.write_bytes(body)
            tmp_out.replace(out / name)
            record["files"][name] = {"bytes": len(body), "sha256": sha256(body), "words": len(body.split()),
                                     "pages": page_records}
    assert not set(CALIBRATION_PAGES) & set(EVALUATION_PAGES)
    (out / "sources.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for calibration.txt, evaluation.txt, sources.json")
    p.add_argument("--deb", type=Path, default=None, help=f"a downloaded {PACKAGE} .deb (default: apt-get download)")
    args = p.parse_args(argv)
    if args.deb is not None:
        record = build(args.deb, args.out)
    else:
        with tempfile.TemporaryDirectory(prefix="atv-sparse-deb-") as tmp:
            record = build(fetch_package(Path(tmp)), args.out)
    for name, f in record["files"].items():
        print(f"{args.out / name}: {f['bytes']} bytes, {f['words']} words, sha256 {f['sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
