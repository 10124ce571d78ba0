"""Deterministic mutation testing of the fuzz targets, and the structure-aware mutator atheris also uses.

    python fuzz/mutate.py [--targets header config calib] [--count 3000] [--seed 0]

Each round takes a seed of ``fuzz/corpus/TARGET`` and applies 1-3 mutations drawn from a
seeded ``random.Random``: byte-level ones (bit flips, random runs, inserted tokens such as ``"``,
``-1`` or ``1e309``, deletions, truncation, duplicated slices) and JSON-aware ones that replace
one value anywhere in the JSON part (the safetensors header, config.json, a calibration record)
by a value of another type (``null``, ``2**64``, ``"3:4"``, ``"re:("``, ``"../../etc/passwd"``,
``"~user/x.png"``, deep nesting, ...), re-encoding a safetensors header with its length fixed so the mutation
reaches the checks behind the length field. The same seed gives the same inputs on any
machine. An exception other than ``AtvSparseError`` stops the run, saves the input under
``fuzz/crashes/`` and exits 1.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import sys
import time
import traceback
import zlib
from pathlib import Path

import targets

TOKENS = [b'"', b"{", b"}", b"[", b"]", b",", b":", b"-1", b"1e309", b"NaN", b"null", b"true", b"\\ud800",
          b"99999999999999999999999", b"../", b"\x00", b"\xff\xfe", b"re:(", b'"dtype"', b'"shape"',
          b'"data_offsets"', b"<image>", b"\n"]
VALUES = [None, True, False, -1, 0, 1, 2**64, 2**63 - 1, 1.5, -0.0, 1e308, "", "3:4", "2:4", "unstructured",
          "re:(", "re:a{99999999999}", "../../etc/passwd", "/etc/passwd", "img/text.png", "img/bomb.png",
          "img/ok.png", "../outside.png", "~no_such_user/x.png", "F32", "U8", "x" * 3000, [], {}, [1, 2], [[[[[[[[0]]]]]]]],
          {"a": None}, "<image>", "\ud800"]


def _leaves(value, path=()):
    """Every (path, value) in a JSON value, containers included."""
    yield path, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, path + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _leaves(item, path + (i,))


def _replace(value, path, new):
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {k: (_replace(v, rest, new) if k == head else v) for k, v in value.items()}
    return [(_replace(v, rest, new) if i == head else v) for i, v in enumerate(value)]


def mutate_json(value, rng: random.Random):
    """``value`` with one part replaced, dropped or renamed."""
    paths = list(_leaves(value))
    path, old = rng.choice(paths)
    choice = rng.random()
    if choice < 0.15 and path:  # drop the entry
        parent_path, key = path[:-1], path[-1]
        parent = dict(_leaves(value))[parent_path]
        if isinstance(parent, dict):
            return _replace(value, parent_path, {k: v for k, v in parent.items() if k != key})
        return _replace(value, parent_path, [v for i, v in enumerate(parent) if i != key])
    if choice < 0.25 and path and isinstance(dict(_leaves(value))[path[:-1]], dict):  # rename the key
        parent = dict(_leaves(value))[path[:-1]]
        renamed = rng.choice(["__metadata__", path[-1][:-1], path[-1] + "x", "", "pattern", "targets"])
        return _replace(value, path[:-1], {(renamed if k == path[-1] else k): v for k, v in parent.items()})
    if choice < 0.4 and isinstance(old, (int, float)) and not isinstance(old, bool):  # nudge a number
        return _replace(value, path, old + rng.choice([-1, 1, 8, -8, 2**32, 0.5]))
    return _replace(value, path, rng.choice(VALUES))


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    kind = rng.randrange(6)
    at = rng.randrange(len(data) + 1)
    if kind == 0 and data:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        data[at:at + rng.randint(1, 8)] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    elif kind == 2:
        data[at:at] = rng.choice(TOKENS)
    elif kind == 3:
        del data[at:at + rng.randint(1, 64)]
    elif kind == 4:
        del data[at:]
    else:
        data[at:at] = data[rng.randrange(len(data) + 1):][:rng.randint(1, 64)]
    return bytes(data)


def _split_json(target: str, data: bytes):
    """(JSON value, rebuild) when ``data`` holds a JSON part this target reads, else None.

    rebuild(new JSON bytes) -> the whole input with that part replaced."""
    try:
        if target == "header":
            (n,) = struct.unpack("<Q", data[:8])
            value = json.loads(data[8:8 + n])
            rest = data[8 + n:]

            def rebuild(text: bytes) -> bytes:
                text += b" " * (-len(text) % 8)
                return struct.pack("<Q", len(text)) + text + rest
            return value, rebuild
        if target == "config":
            return json.loads(data), lambda text: text
        if data[:1] and data[0] % len(targets.CALIB_KINDS) == 3:  # ShareGPT4V .json: one document
            return json.loads(data[1:]), lambda text: data[:1] + text
        lines = data[1:].split(b"\n")
        i = zlib.crc32(data) % len(lines)  # a line picked by content (not hash(): salted per process)
        value = json.loads(lines[i])

        def rebuild_line(text: bytes) -> bytes:
            return data[:1] + b"\n".join(lines[:i] + [text] + lines[i + 1:])
        return value, rebuild_line
    except (ValueError, struct.error, RecursionError):
        return None


def mutate(target: str, data: bytes, rng: random.Random) -> bytes:
    """One to three mutations of ``data``, JSON-aware where the target's JSON part still parses."""
    for _ in range(rng.randint(1, 3)):
        split = _split_json(target, data) if rng.random() < 0.6 else None
        if split is not None:
            value, rebuild = split
            text = json.dumps(mutate_json(value, rng), ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
            data = rebuild(text)
        else:
            data = mutate_bytes(data, rng)
    return data


def run(target: str, count: int, seed: int, quiet: bool = False) -> dict:
    """``count`` mutated inputs of ``target``; counts of loaded and refused. Raises on any other exception."""
    rng = random.Random(f"{target}-{seed}")
    corpus = [data for _, data in targets.seeds(target)]
    loaded = refused = 0
    for i in range(count):
        data = mutate(target, rng.choice(corpus), rng)
        try:
            ok = targets.run(target, data)
        except BaseException:
            crash = Path(__file__).parent / "crashes" / f"{target}-seed{seed}-{i}.bin"
            crash.parent.mkdir(exist_ok=True)
            crash.write_bytes(data)
            print(f"CRASH in target {target}, input {i} (saved to {crash}):", file=sys.stderr)
            raise
        loaded += ok
        refused += not ok
    if not quiet:
        print(f"{target}: {count} mutated inputs, {refused} refused with AtvSparseError, {loaded} accepted, 0 crashes")
    return {"loaded": loaded, "refused": refused}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", nargs="+", choices=targets.TARGETS, default=list(targets.TARGETS))
    parser.add_argument("--count", type=int, default=3000, help="mutated inputs per target")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for target in args.targets:
        t0 = time.perf_counter()
        try:
            run(target, args.count, args.seed)
        except BaseException:
            traceback.print_exc()
            return 1
        print(f"  ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
