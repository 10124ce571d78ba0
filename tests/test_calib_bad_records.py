"""Calibration readers on hostile input: every bad record, path or image is one named error.

Records of the wrong type, paths that leave the file's directory, files that are not images, and
decompression bombs (a PNG header claiming 400 Mpx in a few bytes: refused from the header,
never decoded, so the test takes milliseconds).
"""

import json
import struct
import zlib

import pytest
from PIL import Image

from atv_sparse.calib import read_calibration_text
from atv_sparse.calib.multimodal import MAX_IMAGE_PIXELS, read_multimodal_file
from atv_sparse.errors import AtvSparseError


def write_records(path, records):
    if path.suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    else:
        path.write_text(json.dumps(records))
    return path


def sharegpt(image, question="<image>\nWhat is it?"):
    return {"image": image, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "A."}]}


def png_header_only(path, width, height):
    """A PNG whose IHDR claims width x height, with one empty IDAT: tiny on disk."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "data" / "img").mkdir(parents=True)
    Image.new("RGB", (12, 9), (200, 10, 10)).save(tmp_path / "data" / "img" / "ok.png")
    Image.new("RGB", (12, 9), (0, 0, 0)).save(tmp_path / "outside.png")
    return tmp_path / "data"


WRONG_TYPES = [
    (["a record"], "expected a JSON object, got str"),
    ([None], "expected a JSON object, got NoneType"),
    ([[1, 2]], "expected a JSON object, got list"),
    ([{"text": 5}], '"text" must be a string'),
    ([{"text": "\ud800 lone"}], '"text" must be a string'),
    ([{"image": 5, "text": "x"}], '"image" must be one image path'),
    ([{"image": ["img/ok.png", "img/ok.png"], "text": "x"}], '"image" must be one image path'),
    ([{"conversations": "hi"}], '"conversations" must be a non-empty list'),
    ([{"conversations": [5]}], "turn 0 is not a"),
    ([{"conversations": [{"from": ["human"], "value": "x"}]}], "turn 0 is from ['human']"),
    ([{"conversations": [{"from": {"a": 1}, "value": "x"}]}], "turn 0 is from"),
    ([{"conversations": [{"from": "human", "value": 7}]}], "turn 0 is not a"),
    ([{"other": 1}], 'no "conversations" or "text" field'),
]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
@pytest.mark.parametrize("records,words", WRONG_TYPES, ids=[w for _, w in WRONG_TYPES])
def test_record_of_wrong_type(folder, suffix, records, words):
    path = write_records(folder / f"data{suffix}", [{"text": "fine"}] + records)
    with pytest.raises(AtvSparseError) as e:
        read_multimodal_file(path)
    assert f"{path}, sample 1" in str(e.value) and words in str(e.value)


@pytest.mark.parametrize("image", ["../../etc/passwd", "../outside.png", "img/../../outside.png", "img/../../../x"])
def test_path_escaping_the_directory_is_refused(folder, image):
    path = write_records(folder / "data.json", [sharegpt(image)])
    with pytest.raises(AtvSparseError, match=r"points outside .*data; relative image paths must stay inside"):
        read_multimodal_file(path)


def test_paths_inside_and_absolute_are_kept(folder, monkeypatch):
    records = [sharegpt("img/../img/ok.png"), sharegpt(str(folder.parent / "outside.png"))]
    path = write_records(folder / "data.json", records)
    assert [c.image.size for c in read_multimodal_file(path)] == [(12, 9), (12, 9)]
    monkeypatch.chdir(folder)  # a file named relative to the working directory
    assert [c.image.size for c in read_multimodal_file("data.json")] == [(12, 9), (12, 9)]
    with pytest.raises(AtvSparseError, match="points outside"):
        read_multimodal_file(write_records(folder / "bad.json", [sharegpt("../outside.png")]).name)


@pytest.mark.parametrize("image,words", [("img/a\0b.png", "does not exist"), ("img/" + "x" * 5000, "not a usable path"),
                                         ("img", "does not exist"),
                                         ("~no_such_user_atv/x.png", "no home directory for")])
def test_unusable_paths(folder, image, words):
    path = write_records(folder / "data.jsonl", [sharegpt(image)])
    with pytest.raises(AtvSparseError, match=words):
        read_multimodal_file(path)


@pytest.mark.parametrize("name,content", [
    ("notes.png", b"just some text, not an image\n"),
    ("doc.png", b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n"),
    ("drawing.png", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"),  # EPS would run Ghostscript
    ("cut.png", None),
], ids=["text", "pdf", "eps", "truncated"])
def test_non_image_file_as_image(folder, name, content):
    if content is None:
        content = (folder / "img" / "ok.png").read_bytes()[:40]
    (folder / "img" / name).write_bytes(content)
    path = write_records(folder / "data.json", [sharegpt(f"img/{name}")])
    with pytest.raises(AtvSparseError, match=f"{path}, sample 0: cannot read image .*{name}"):
        read_multimodal_file(path)


@pytest.mark.parametrize("side,words", [(10000, "10000 x 10000 pixels"), (20000, "400000000 pixels")])
def test_decompression_bomb_is_refused_from_its_header(folder, side, words):
    """100 Mpx passes PIL's error limit (179 Mpx) and only warns there; 400 Mpx PIL refuses itself."""
    assert side * side > MAX_IMAGE_PIXELS
    bomb = png_header_only(folder / "img" / "bomb.png", side, side)
    assert bomb.stat().st_size < 100
    path = write_records(folder / "data.jsonl", [{"image": "img/bomb.png", "text": "x"}])
    with pytest.raises(AtvSparseError, match=f"sample 0 .*bomb.png.*{words}.*at most {MAX_IMAGE_PIXELS} pixels"):
        read_multimodal_file(path)


@pytest.mark.parametrize("text,words", [
    ("[" * 100000, "nested too deeply"),
    ('{"a": ' + "7" * 5000 + "}", "not valid JSON"),
    ("{", "not valid JSON"),
])
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_unparseable_multimodal_file(folder, text, words, suffix):
    path = folder / f"data{suffix}"
    path.write_text(text)
    with pytest.raises(AtvSparseError, match=words):
        read_multimodal_file(path)


@pytest.mark.parametrize("line, words", [
    ("[1, 2]", "expected a JSON object"), ('"text"', "expected a JSON object"), ("5", "expected a JSON object"),
    ("null", "expected a JSON object"), ('{"txt": "a"}', "expected a JSON object"),
    ("[" * 100000, r"not valid JSON \(nested too deeply\)"), ('{"text": ' + "7" * 5000 + "}", "not valid JSON"),
    ("{", "not valid JSON")])
def test_text_jsonl_line_of_wrong_type(tmp_path, line, words):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n\n' + line + "\n")  # a blank line between: line numbers count it
    with pytest.raises(AtvSparseError, match=f"calibration file {path}, line 3: {words}"):
        read_calibration_text(path)


def test_text_jsonl_values(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": 5}\n')
    with pytest.raises(AtvSparseError, match='line 1: "text" is not a string'):
        read_calibration_text(path)
    path.write_text('{"text": "a \\ud800 b"}\n')
    with pytest.raises(AtvSparseError, match="line 1: \"text\" holds an unpaired surrogate"):
        read_calibration_text(path)
    path.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(AtvSparseError, match="not UTF-8 text"):
        read_calibration_text(path)
