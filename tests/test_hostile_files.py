"""Hostile input files are skipped, named and counted; nothing outside the data directory is
opened; nothing is decoded that would not fit in memory."""

import json
import logging
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image as PILImage

from tests.test_data import folder_config, write_folder
from transfusion_jax.data import make_source
from transfusion_jax.data.images import load_image
from transfusion_jax.data.sources import ImageFolderSource, TextSource


def append_rows(root, rows: list[bytes]):
    with (root / "metadata.jsonl").open("ab") as f:
        f.write(b"".join(row + b"\n" for row in rows))


def row(file_name, text="a caption") -> bytes:
    return json.dumps({"file_name": file_name, "text": text}).encode()


def test_invalid_utf8_in_metadata_skips_that_row_only(tmp_path, caplog):
    write_folder(tmp_path, 3)
    bad = b'{"file_name": "images/0.png", "text": "caf\xe9"}'  # byte 43 is Latin-1
    append_rows(tmp_path, [bad, row("images/1.png")])
    with caplog.at_level(logging.WARNING):
        records = ImageFolderSource(tmp_path)
    assert len(records) == 4 and records.skipped == 1
    assert "metadata.jsonl:4: not valid UTF-8 (byte 43), skipped" in caplog.text


def test_file_names_are_confined_to_the_data_directory(tmp_path, caplog):
    root = tmp_path / "data"
    write_folder(root, 2)
    secret = tmp_path / "secret.png"
    PILImage.new("RGB", (8, 8)).save(secret)  # exists, but outside data.path
    append_rows(root, [row("../secret.png"), row(str(secret)), row("images/../../secret.png")])
    with caplog.at_level(logging.WARNING):
        records = ImageFolderSource(root)
    assert len(records) == 2 and records.skipped == 3
    assert caplog.text.count("is outside") == 3
    assert all("secret" not in records[i]["image"] for i in range(len(records)))


def test_special_files_are_named_for_what_they_are(tmp_path, caplog):
    write_folder(tmp_path, 2)
    os.symlink("/dev/null", tmp_path / "images" / "device.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "images" / "dangling.png")
    (tmp_path / "images" / "folder.png").mkdir()
    append_rows(tmp_path, [row("images/device.png"), row("images/dangling.png")])
    append_rows(tmp_path, [row("images/folder.png"), row("images/none.png")])
    with caplog.at_level(logging.WARNING):
        records = ImageFolderSource(tmp_path)
    assert records.skipped == 4
    assert "device.png is a character device, not a regular file" in caplog.text
    assert "dangling.png is a broken symlink" in caplog.text
    assert "folder.png is a directory, not a regular file" in caplog.text
    assert "none.png does not exist" in caplog.text


def png_header(width, height) -> bytes:
    """A PNG whose header claims width x height RGBA pixels (a decompression bomb's header)."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_oversized_images_are_refused_before_decoding():
    with pytest.raises(
        ValueError, match="13000 x 13000 = 169000000 pixels is over data.max_image_"
    ):
        load_image(png_header(13000, 13000), 16)  # default limit: 64M pixels
    pixels = np.zeros((40, 50, 3), np.uint8)
    with pytest.raises(ValueError, match="2000 pixels is over data.max_image_pixels=1000"):
        load_image(PILImage.fromarray(pixels), 16, max_pixels=1000)


def test_an_oversized_image_in_a_folder_is_skipped_and_counted(tmp_path, caplog):
    write_folder(tmp_path, 4)
    (tmp_path / "images" / "bomb.png").write_bytes(png_header(13000, 13000))
    append_rows(tmp_path, [row("images/bomb.png")])
    source = make_source(folder_config(tmp_path), 2)
    with caplog.at_level(logging.WARNING):
        for _ in range(6):
            next(source)
    assert source.skipped_examples == 1 and source.skipped_draws >= 1
    assert "bomb.png: cannot decode the image (ValueError: 13000 x 13000" in caplog.text


def test_text_files_skip_what_is_not_utf8_text(tmp_path, caplog):
    (tmp_path / "good.txt").write_text("first paragraph\n\nsecond paragraph\n")
    (tmp_path / "mixed.txt").write_bytes(b"fine text\n\nbad \xff\xfe byte\n\nmore fine text")
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "lines.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n{"x": 1}\n')
    with caplog.at_level(logging.WARNING):
        source = TextSource(tmp_path)
    texts = sorted(source[i]["text"] for i in range(len(source)))
    assert texts == ["fine text", "first paragraph", "more fine text", "ok", "second paragraph"]
    assert source.skipped == 1 + 1 + 2  # the binary file, one paragraph, two jsonl lines
    assert "binary.txt: a binary file (it holds NUL bytes), skipped" in caplog.text
    assert "mixed.txt: 1 paragraphs are not valid UTF-8, skipped" in caplog.text
    assert "lines.jsonl:2: not valid UTF-8" in caplog.text
    assert 'lines.jsonl:3: no "text" field, skipped' in caplog.text


def test_symlinks_out_of_the_directory_nul_bytes_and_deep_json_are_skipped(tmp_path, caplog):
    root = tmp_path / "data"
    write_folder(root, 2)
    outside = tmp_path / "outside"
    outside.mkdir()
    PILImage.new("RGB", (8, 8)).save(outside / "x.png")
    os.symlink(outside, root / "images" / "elsewhere")  # a directory link pointing outside
    os.symlink(root / "images" / "0.png", root / "images" / "alias.png")  # inside: fine
    deep = b'{"file_name": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    rows = [row("images/elsewhere/x.png"), row("images/alias.png"), row("images/\0.png"), deep]
    append_rows(root, rows)
    with caplog.at_level(logging.WARNING):
        records = ImageFolderSource(root)
    assert len(records) == 3 and records.skipped == 3
    assert "'images/elsewhere/x.png' is outside" in caplog.text
    assert "file_name holds a NUL character" in caplog.text
    assert "JSON nested too deeply" in caplog.text


def test_text_sources_skip_special_files(tmp_path, caplog):
    (tmp_path / "good.txt").write_text("a paragraph\n")
    (tmp_path / "folder.txt").mkdir()
    os.mkfifo(tmp_path / "pipe.txt")  # reading it would block forever
    os.symlink("/dev/zero", tmp_path / "zeros.jsonl")  # reading it would never end
    os.symlink(tmp_path / "gone.txt", tmp_path / "dangling.txt")
    with caplog.at_level(logging.WARNING):
        source = TextSource(tmp_path)
    assert len(source) == 1 and source.skipped == 4
    assert "pipe.txt is a pipe, not a regular file" in caplog.text
    assert "zeros.jsonl is a character device" in caplog.text
    assert "dangling.txt is a broken symlink" in caplog.text
