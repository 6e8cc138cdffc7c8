"""The `tfds` source on a dataset prepared by TFDS itself: tests/fixtures/tfds/ holds
`tiny_captions`, ArrayRecord files and their metadata in coco_captions' feature layout, written
by tests/fixtures/make_tfds_fixture.py (which needs TensorFlow; reading here does not)."""

import hashlib
import io
import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.helpers import ROOT, command_env

tfds = pytest.importorskip("tensorflow_datasets", reason="the tfds source needs it")

from array_record.python.array_record_module import ArrayRecordReader  # noqa: E402
from PIL import Image as PILImage  # noqa: E402

from tests.test_data import folder_config  # noqa: E402
from transfusion_jax.cli import is_user_error  # noqa: E402
from transfusion_jax.data import make_source  # noqa: E402
from transfusion_jax.data.sources import TfdsSource  # noqa: E402
from transfusion_jax.train import train  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "tfds"
PREPARED = FIXTURE / "tiny_captions" / "1.0.0"
if not (FIXTURE / "expected.json").is_file():  # an sdist: the fixture ships with the repository
    pytest.skip(f"no TFDS fixture in {FIXTURE}", allow_module_level=True)
EXPECTED = json.loads((FIXTURE / "expected.json").read_text(encoding="utf-8"))


def open_fixture(split="train", name="tiny_captions", data_dir=FIXTURE):
    return TfdsSource(name, split, str(data_dir), "image", "captions/text")


def sha256(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


def png_in(record: bytes) -> np.ndarray:
    """The PNG inside a serialized example, decoded by PIL rather than by TFDS."""
    start = record.index(b"\x89PNG\r\n\x1a\n")
    end = record.index(b"IEND", start) + 8  # the chunk type and its CRC
    return np.asarray(PILImage.open(io.BytesIO(record[start:end])))


@pytest.mark.parametrize("split", ["train", "val"])
def test_reads_str_captions_and_uint8_images_as_written(split):
    source = open_fixture(split)
    expected = {e["image/id"]: e for e in EXPECTED[split]}
    shard = PREPARED / f"tiny_captions-{split}.array_record-00000-of-00001"
    raw = ArrayRecordReader(str(shard)).read_all()  # record i of the one shard is example i
    assert len(source) == len(raw) == len(expected)
    seen = set()
    for i in range(len(source)):
        record = source[i]
        want = expected[int(source.source[i]["image/id"])]
        assert record["text"] == want["captions"]
        assert all(type(t) is str for t in record["text"])  # real TFDS gives bytes
        image = record["image"]
        assert image.dtype == np.uint8 and list(image.shape) == want["image_shape"]
        assert sha256(image) == want["image_sha256"]
        np.testing.assert_array_equal(image, png_in(raw[i]))
        for caption in want["captions"]:
            assert caption.encode() in raw[i]
        assert record["origin"] == f"tiny_captions[{i}]"
        seen.add(want["image/id"])
    assert seen == set(expected)
    # the fixture exercises what coco_captions holds: lists of several captions, non-ASCII text
    texts = [t for e in EXPECTED["train"] for t in e["captions"]]
    assert any(len(e["captions"]) > 1 for e in EXPECTED["train"])
    assert "piñata" in texts and any(not t.isascii() for t in texts)


def test_captions_reach_the_batches_decoded():
    cfg = folder_config(
        "unused", source="tfds", tfds_name="tiny_captions", tfds_data_dir=str(FIXTURE)
    )
    cfg.data.held_out_percent = 0.0
    source = make_source(cfg, 2)
    texts = []
    for _ in range(8):
        b = next(source)
        assert (b.image_ids >= 0).any() and np.isfinite(b.latents).all()
        texts.append(b"".join(bytes(t - 5 for t in row if 5 <= t < 261) for row in b.tokens))
    seen = b"".join(texts).decode("utf-8", errors="replace")
    assert "piñata" in seen or "woman’s hat" in seen  # UTF-8 decoded once, not twice
    assert "b'" not in seen and "\\x" not in seen  # no repr of bytes in the captions


def test_trains_on_the_prepared_fixture(tmp_path):
    cfg = folder_config(
        "unused", source="tfds", tfds_name="tiny_captions", tfds_data_dir=str(FIXTURE)
    )
    cfg.model.update(d_model=64, depth=2)
    cfg.train.update(batch_size=2, num_steps=2, log_every=2, checkpoint_every=2)
    cfg.mesh.fsdp = 1
    record = train(cfg, tmp_path / "run", devices=jax.devices()[:1])
    assert record["step"] == 2 and np.isfinite(record["lm_loss"])
    assert np.isfinite(record["diffusion_loss"])


def as_coco_captions(tmp_path):
    """The fixture laid out as `tfds build coco_captions` lays out its prepared files."""
    target = tmp_path / "coco_captions" / "2014" / "1.1.0"
    shutil.copytree(PREPARED, target)
    for file in target.glob("tiny_captions-*"):
        file.rename(target / file.name.replace("tiny_captions", "coco_captions"))
    info = json.loads((target / "dataset_info.json").read_text())
    info.update(name="coco_captions", version="1.1.0")
    (target / "dataset_info.json").write_text(json.dumps(info))
    return target


def test_reads_a_dataset_tfds_defines_without_its_code(tmp_path):
    """coco_captions' builder code imports TensorFlow; its prepared files do not need it."""
    as_coco_captions(tmp_path)
    source = open_fixture("val", name="coco_captions", data_dir=tmp_path)
    captions = sorted(e["captions"] for e in EXPECTED["val"])
    assert sorted(source[i]["text"] for i in range(len(source))) == captions
    assert len(open_fixture("val", name="coco_captions/2014:1.1.0", data_dir=tmp_path)) == 3


@pytest.mark.parametrize("name", ["tiny_captions", "coco_captions"])
def test_an_unprepared_dataset_says_how_to_prepare_it(tmp_path, name):
    build = f"tfds build {name} --data_dir {tmp_path} --file_format=array_record"
    with pytest.raises(FileNotFoundError, match="config field data.tfds_name") as e:
        open_fixture(name=name, data_dir=tmp_path)  # coco_captions: not "No module named..."
    assert build in str(e.value) and "data.tfds_data_dir" in str(e.value)
    with pytest.raises(FileNotFoundError, match=f"no prepared TFDS dataset '{name}'"):
        open_fixture(name=name, data_dir=tmp_path / "missing")


def test_another_split_or_file_format_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="config field data.tfds_split: 'test' .* train, val"):
        open_fixture("test")
    assert len(open_fixture("train[:50%]")) == 3  # TFDS's split slicing passes through
    copy = tmp_path / "tiny_captions" / "1.0.0"
    shutil.copytree(PREPARED, copy)
    info = json.loads((copy / "dataset_info.json").read_text())
    (copy / "dataset_info.json").write_text(json.dumps(info | {"fileFormat": "tfrecord"}))
    with pytest.raises(ValueError, match="prepared as tfrecord, and random access needs") as e:
        open_fixture(data_dir=tmp_path)
    assert "--file_format=array_record --overwrite" in str(e.value)


def test_a_wrong_field_name_lists_the_fields():
    message = "config field data.tfds_caption_key: tiny_captions has no field 'caption/text'"
    with pytest.raises(KeyError, match=message) as e:
        TfdsSource("tiny_captions", "val", str(FIXTURE), "image", "caption/text")
    assert "(its fields: captions/id, captions/text, image, image/id)" in str(e.value)
    assert is_user_error(e.value)
    image_ids = TfdsSource("tiny_captions", "val", str(FIXTURE), "image", "image/id")
    assert sorted(int(image_ids[i]["text"]) for i in range(3)) == [201, 202, 203]


def test_cli_refuses_an_unprepared_dataset_in_one_line(tmp_path):
    (tmp_path / "data").mkdir()
    cmd = [sys.executable, "-m", "transfusion_jax.train", "--config", "tiny"]
    args = [
        "--workdir=run",
        "--config.data.source=tfds",
        "--config.data.tfds_name=coco_captions",
        f"--config.data.tfds_data_dir={tmp_path / 'data'}",
    ]
    env = command_env()
    proc = subprocess.run(
        cmd + args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.strip().endswith(errors[0]), proc.stderr
    assert errors[0].startswith("error: config field data.tfds_name: no prepared TFDS dataset")
    assert "--file_format=array_record" in errors[0]
    assert "Traceback" not in proc.stderr and "No module named" not in proc.stderr
