"""atheris harness for one fuzz target: coverage-guided, with the structure-aware mutator of mutate.py.

    python fuzz/fuzz.py TARGET [libFuzzer options] [CORPUS_DIR ...]
    python fuzz/fuzz.py header -max_total_time=55 /tmp/new-inputs fuzz/corpus/header

TARGET is ``header``, ``config`` or ``calib`` (``targets.py``). Any exception other than
``AtvSparseError`` is a crash: libFuzzer prints it, writes the input to ``crash-<sha1>`` (see
``-artifact_prefix``) and exits non-zero. Put a scratch directory first among the corpus
directories: libFuzzer adds the inputs it finds to the first one.
"""

import random
import sys

import atheris

with atheris.instrument_imports(include=["atv_sparse"]):
    import targets

import mutate  # noqa: E402

if len(sys.argv) < 2 or sys.argv[1] not in targets.TARGETS:
    sys.exit(f"usage: python fuzz/fuzz.py {{{','.join(targets.TARGETS)}}} [libFuzzer options] [corpus ...]")
TARGET = sys.argv[1]


def test_one_input(data: bytes) -> None:
    targets.run(TARGET, data)


def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
    """Half libFuzzer's own byte mutations, half JSON-aware ones that keep a header's length right."""
    if seed % 2:
        return atheris.Mutate(data, max_size)
    return mutate.mutate(TARGET, data, random.Random(seed))[:max_size]


targets.workdir()  # lay out the scratch files before the clock starts
atheris.Setup([sys.argv[0]] + sys.argv[2:], test_one_input, custom_mutator=custom_mutator)
atheris.Fuzz()
