"""The data pipeline: packing invariants, determinism and exact resume, image decoding, bad input,
and the real folders in ../shared/data."""

import io
import json
import logging
import multiprocessing
import os
import signal
import time

import grain
import jax
import numpy as np
import pytest
from PIL import Image as PILImage

from tests.helpers import ROOT, tiny_config
from transfusion_jax.batch import Image, SpecialTokens, document_length, image_slots
from transfusion_jax.data import make_source
from transfusion_jax.data.documents import Skipped
from transfusion_jax.data.images import load_image
from transfusion_jax.data.packing import NoUsableRecordError, PackedBatches, first_fit
from transfusion_jax.data.pipeline import training_split
from transfusion_jax.data.sources import ImageFolderSource
from transfusion_jax.data.tokenizer import make_tokenizer
from transfusion_jax.train import train

SHARED = ROOT.parent / "shared" / "data"
EMOJI, FLICKR = SHARED / "noto_emoji_72", SHARED / "flickr8k_1k"


def folder_config(path, **data):
    cfg = tiny_config()
    defaults = dict(
        source="imagefolder",
        path=str(path),
        image_size=16,
        seq_len=160,
        max_caption_tokens=24,
        pack_window=16,
        num_threads=2,
    )
    cfg.data.update({**defaults, **data})
    cfg.image.update(latent_size=16, latent_channels=3, patch_size=4, max_images=3)
    return cfg


def write_folder(root, n, corrupt=False):
    """n small PNGs with captions; with corrupt, also one of each kind of bad input."""
    (root / "images").mkdir(parents=True)
    rows = []
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)
        PILImage.fromarray(pixels).save(root / "images" / f"{i}.png")
        rows.append(json.dumps({"file_name": f"images/{i}.png", "text": f"picture number {i}"}))
    if corrupt:
        data = (root / "images" / "0.png").read_bytes()
        (root / "images" / "truncated.png").write_bytes(data[: len(data) // 2])
        rows += [
            json.dumps({"file_name": "images/truncated.png", "text": "half a file"}),
            json.dumps({"file_name": "images/missing.png", "text": "no such file"}),
            '{"file_name": "images/1.png", "text": ',  # bad JSON
            json.dumps({"file_name": "images/2.png", "text": "   "}),  # empty caption
        ]
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")


def test_first_fit_packs_every_document_whole_and_never_overfills():
    rng = np.random.default_rng(0)
    img = np.zeros((8, 8, 3), np.float32)  # 4 patches with k=4
    docs = []  # document i starts with the tag token 1000 + i
    for i in range(60):
        text = [1000 + i, *rng.integers(5, 100, rng.integers(0, 30))]
        docs.append([text, Image(img), [2]] if rng.random() < 0.6 else [text])
    long_text = [[2000, *range(5, 134)]]  # 130 tokens, longer than a row: chunked
    rows = first_fit([*docs, long_text], seq_len=48, max_images=2, num_patches=4)
    for row in rows:
        assert sum(document_length(d, 4) for d in row) <= 48
        assert sum(isinstance(p, Image) for d in row for p in d) <= 2
    placed = {d[0][0]: (r, d) for r, row in enumerate(rows) for d in row if d[0][0] >= 1000}
    assert sorted(placed) == [1000 + i for i in range(60)] + [2000]
    for i, doc in enumerate(docs):
        r, got = placed[1000 + i]
        assert got is doc  # whole, unchanged
        # First fit: every earlier-opened row lacked room when document i arrived.
        for earlier in rows[:r]:
            before = [d for d in earlier if d[0][0] < 1000 + i]  # arrived before doc i
            used = sum(document_length(d, 4) for d in before)
            images = sum(isinstance(p, Image) for d in before for p in d)
            has_image = any(isinstance(p, Image) for p in doc)
            assert used + document_length(doc, 4) > 48 or images + has_image > 2
    chunks = [d for row in rows for d in row if d[0][0] < 1000 or d[0][0] == 2000]
    assert [t for c in chunks for t in c[0]] == long_text[0]
    assert [len(c[0]) for c in chunks] == [48, 48, 34]


def test_imagefolder_batches_fields_agree(tmp_path):
    write_folder(tmp_path, 12)
    cfg = folder_config(tmp_path)
    source = make_source(cfg, local_batch_size=4)
    for _ in range(3):
        b = next(source)
        assert b.tokens.shape == (4, 160) and b.latents.shape == (4, 3, 16, 16, 3)
        start, used = image_slots(b.image_ids, 3)
        special = SpecialTokens()
        for r in range(4):
            for m in range(3):
                positions = np.flatnonzero(b.image_ids[r] == m)
                if not used[r, m]:
                    assert positions.size == 0 and not b.latents[r, m].any()
                    continue
                assert positions.tolist() == list(range(start[r, m], start[r, m] + 16))
                assert b.tokens[r, positions[0] - 1] == special.boi
                assert b.tokens[r, positions[-1] + 1] == special.eoi
                assert np.abs(b.latents[r, m]).max() <= 1.0 and b.latents[r, m].std() > 0.1
            # Documents are contiguous runs numbered 1, 2, ... and then padding.
            seg = b.segment_ids[r]
            real = seg[seg > 0]
            assert (np.diff(real) >= 0).all() and real[0] == 1 and (seg[len(real) :] == 0).all()
            # noise limiting is on exactly for image-first documents (a caption follows EOI)
            for m in np.flatnonzero(used[r]):
                after_eoi = b.tokens[r, start[r, m] + 16 + 1]
                assert b.noise_limited[r, m] == (after_eoi != special.eos)


def test_same_seed_same_batches_and_exact_resume(tmp_path):
    write_folder(tmp_path, 12)
    cfg = folder_config(tmp_path)
    straight = make_source(cfg, 4)
    expected = [next(straight) for _ in range(7)]
    again = make_source(cfg, 4)
    for b in expected[:3]:
        np.testing.assert_array_equal(next(again).tokens, b.tokens)
    state = json.loads(json.dumps(again.get_state()))  # survives JSON, as in a checkpoint
    resumed = make_source(cfg, 4)
    resumed.set_state(state)
    for b in expected[3:]:
        got = next(resumed)
        np.testing.assert_array_equal(got.tokens, b.tokens)
        np.testing.assert_array_equal(got.latents, b.latents)
        np.testing.assert_array_equal(got.noise_limited, b.noise_limited)
    cfg.train.seed = 1
    assert not np.array_equal(next(make_source(cfg, 4)).tokens, expected[0].tokens)


def test_corrupt_folder_is_read_with_the_right_skip_count(tmp_path, caplog):
    write_folder(tmp_path, 6, corrupt=True)
    with caplog.at_level(logging.WARNING):
        records = ImageFolderSource(tmp_path)
    assert len(records) == 7 and records.skipped == 3  # the truncated file is found on decode
    assert "metadata.jsonl:9: not valid JSON" in caplog.text
    assert "missing.png does not exist" in caplog.text
    assert "metadata.jsonl:10: empty" in caplog.text
    cfg = folder_config(tmp_path)
    source = make_source(cfg, 2)
    with caplog.at_level(logging.WARNING):
        for _ in range(12):
            next(source)
    assert "truncated.png: cannot decode the image" in caplog.text
    # Reference: replay the shuffled order grain read of the training split (the held-out
    # records never enter it), and count the truncated file.
    consumed = source.documents.get_state()["next_index"]
    train = training_split(records, cfg.data.held_out_percent, "data.path")
    assert len(train) < len(records)  # this folder has a held-out record
    order = grain.MapDataset.source(train).seed(cfg.train.seed).shuffle().repeat(None)
    truncated = sum("truncated" in order[i]["origin"] for i in range(consumed))
    assert truncated >= 2
    # One bad record drawn many times counts once (and is warned about once); draws separately.
    assert source.skipped_examples == 3 + 1 and source.skipped_draws == truncated
    assert caplog.text.count("truncated.png: cannot decode the image") == 1


def test_corrupt_folder_trains_on(tmp_path):
    write_folder(tmp_path, 6, corrupt=True)
    cfg = folder_config(tmp_path)
    cfg.model.update(d_model=64, depth=2)
    cfg.train.update(batch_size=2, num_steps=4, log_every=2, checkpoint_every=4)
    cfg.mesh.fsdp = 1
    record = train(cfg, tmp_path / "run", devices=jax.devices()[:1])
    assert record["step"] == 4 and np.isfinite(record["loss"])
    assert record["skipped_examples"] == 4  # 3 bad rows + the truncated image, once
    assert record["skipped_draws"] >= 1


def test_a_folder_with_no_valid_example_fails_at_start(tmp_path):
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\nnot json\n')
    with pytest.raises(ValueError, match="has no valid example"):
        make_source(folder_config(tmp_path), 2)
    with pytest.raises(FileNotFoundError, match="metadata.jsonl does not exist"):
        make_source(folder_config(tmp_path / "nowhere"), 2)
    with pytest.raises(FileNotFoundError, match="data.path: not set; give --config.data.path="):
        make_source(folder_config(""), 2)  # not "./metadata.jsonl does not exist"


def test_a_folder_whose_every_image_is_unreadable_stops_with_an_error(tmp_path):
    # Metadata alone cannot tell: the files exist, and only decoding fails. Drawing on would
    # skip them forever; the stream stops once a run of skips has covered a whole epoch.
    rows = [{"file_name": f"{i}.png", "text": "x"} for i in range(4)]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for row in rows:
        (tmp_path / row["file_name"]).write_bytes(b"not a png")
    source = make_source(folder_config(tmp_path), 2)
    with pytest.raises(NoUsableRecordError, match=r"every record of the data was skipped \(4 "):
        next(source)
    assert source.skipped_examples == 4 and 9 <= source.skipped_draws <= 12  # 2 epochs + 1 draw


def test_a_run_of_bad_records_across_an_epoch_boundary_is_not_an_error():
    # Epochs of 3 records, shuffled: [good, Y, X] then [X, Y, good]. The skips around the
    # boundary draw X and Y twice each with no document between, and a good record still follows.
    order = [[[1, 2, 3]], Skipped("Y", "bad"), Skipped("X", "bad")]
    order += order[::-1]

    class Stream:
        i = 0

        def __next__(self):
            self.i += 1
            return order[(self.i - 1) % len(order)]

        def get_state(self):
            return self.i

    batches = PackedBatches(Stream(), 1, 16, 1, (4, 4, 3), 2, SpecialTokens(), window=3)
    next(batches)  # a window of three documents: good, (Y X X Y), good, good
    assert (batches.skipped_examples, batches.skipped_draws) == (2, 4)


def test_a_caption_too_long_for_a_row_is_cut_to_fit_beside_its_image(tmp_path):
    # 16 patches and 4 markers leave 10 of a row's 30 positions: the 57-byte caption (under
    # max_caption_tokens) used to stop the run at the batch that drew it.
    text = "a very long description of a small picture, in many words"
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": text}))
    PILImage.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
    cfg = folder_config(tmp_path, seq_len=30, max_caption_tokens=64, caption_first_prob=1.0)
    cfg.diffusion.cond_drop_rate = 0.0
    batch = next(make_source(cfg, 2))
    tokens = make_tokenizer(cfg.data.tokenizer).encode(text)[:10]
    row = batch.tokens[0].tolist()  # BOS, the caption, BOI, the image, EOI, EOS
    assert row[1:11] == tokens and row[11] == SpecialTokens().boi


def test_images_are_composited_made_rgb_cropped_and_scaled():
    rgba = np.zeros((10, 20, 4), np.uint8)  # fully transparent: must come out white
    rgba[:, 5:15] = (255, 0, 0, 255)  # an opaque red band in the centre
    out = load_image(PILImage.fromarray(rgba, "RGBA"), 10)
    assert out.shape == (10, 10, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[5, 5], [1, -1, -1], atol=0.02)  # red, centre-cropped
    grey = PILImage.fromarray(np.full((30, 30), 0, np.uint8), "L")
    np.testing.assert_allclose(load_image(grey, 8), -1.0)
    buf = io.BytesIO()
    PILImage.fromarray(np.full((8, 8, 3), 255, np.uint8)).save(buf, "JPEG")
    np.testing.assert_allclose(load_image(buf.getvalue(), 4), 1.0, atol=0.02)


@pytest.mark.skipif(not EMOJI.is_dir(), reason="../shared/data/noto_emoji_72 is absent")
def test_real_folders_are_read_completely():
    emoji = ImageFolderSource(EMOJI)
    assert (len(emoji), emoji.num_images, emoji.skipped) == (3543, 3543, 0)
    if FLICKR.is_dir():
        flickr = ImageFolderSource(FLICKR)
        assert (len(flickr), flickr.num_images, flickr.skipped) == (5000, 1000, 0)


@pytest.mark.skipif(not EMOJI.is_dir(), reason="../shared/data/noto_emoji_72 is absent")
def test_emoji_smoke():
    cfg = folder_config(EMOJI)
    b = next(make_source(cfg, 4))
    assert (b.image_ids >= 0).any()
    # white background composited: the corners of emoji are mostly white
    used = image_slots(b.image_ids, 3)[1]
    corners = b.latents[used][:, 0, 0]
    assert (corners > 0.9).mean() > 0.8


class FakeTfdsSource:
    """What `tfds.data_source` returns for coco_captions-like features: random access to dicts of
    numpy values, images decoded to uint8, captions as arrays of byte strings."""

    def __init__(self, n):
        rng = np.random.default_rng(0)
        self.examples = [
            {
                "image": rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8),
                "captions": {
                    "text": np.array(
                        [f"photo {i} a".encode(), f"photo {i} b".encode()], dtype=object
                    )
                },
            }
            for i in range(n)
        ]

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


def test_tfds_source_reads_nested_caption_lists(monkeypatch):
    from transfusion_jax.data import sources

    calls = []

    def data_source(name, split, data_dir):
        calls.append((name, split, data_dir))
        return FakeTfdsSource(6)

    monkeypatch.setattr(sources, "open_tfds", data_source)
    cfg = folder_config("unused", source="tfds", tfds_name="coco_captions", tfds_split="val")
    source = make_source(cfg, 2)
    assert calls == [("coco_captions", "val", None)]
    texts = []
    for _ in range(6):
        b = next(source)
        assert (b.image_ids >= 0).any()
        texts += [bytes(t - 5 for t in row if 5 <= t < 261).decode() for row in b.tokens]
    assert any("photo" in t and (t.endswith(" a") or " a" in t) for t in texts)
    assert any(" b" in t for t in texts), "one caption of the list is drawn per use"
    cfg.data.tfds_caption_key = "captions/nope"
    with pytest.raises(KeyError, match="no field 'captions/nope'"):
        make_source(cfg, 2)  # checked on the first example, at start


def test_latent_cache_round_trip_and_training_source(tmp_path):
    from transfusion_jax.data.cache import write_cache
    from transfusion_jax.data.sources import CachedSource

    write_folder(tmp_path / "folder", 5, corrupt=True)
    records = ImageFolderSource(tmp_path / "folder")
    written, skipped = write_cache(records, 16, tmp_path / "cache.array_record")
    assert (written, skipped) == (5, 1)  # the 5 good rows; the truncated image is skipped
    cached = CachedSource(tmp_path / "cache.array_record")
    assert len(cached) == 5
    first = cached[0]
    expected = load_image(str(tmp_path / "folder" / "images" / "0.png"), 16)
    np.testing.assert_allclose(first["latent"], expected, atol=1e-2)  # stored as float16
    assert first["text"] == ["picture number 0"]
    cfg = folder_config(tmp_path / "cache.array_record", source="cached")
    b = next(make_source(cfg, 2))
    assert (b.image_ids >= 0).any() and np.abs(b.latents).max() <= 1.0


def with_workers(folder, workers: int):
    """The folder's stream read by `workers` worker processes, and the first 4 batches' tokens
    as the same stream read without any (the reference)."""
    write_folder(folder, 8)
    cfg = folder_config(folder)
    plain = make_source(cfg, 2)
    expected = [next(plain).tokens for _ in range(4)]
    cfg.data.num_workers = workers
    return cfg, make_source(cfg, 2), expected


def test_worker_processes_give_the_same_batches(tmp_path):
    cfg, source, expected = with_workers(tmp_path, 2)
    for tokens in expected[:2]:
        np.testing.assert_array_equal(next(source).tokens, tokens)
    state = json.loads(json.dumps(source.get_state()))
    resumed = make_source(cfg, 2)
    resumed.set_state(state)
    for tokens in expected[2:]:
        np.testing.assert_array_equal(next(resumed).tokens, tokens)


def test_worker_processes_outlive_a_stop_signal_sent_to_the_process_group(tmp_path):
    """Ctrl-C or a group SIGTERM reaches grain's workers too; the training process then needs
    them for the batch it checkpoints with, so they ignore it (grain stops them on close)."""
    _, source, expected = with_workers(tmp_path, 1)
    np.testing.assert_array_equal(next(source).tokens, expected[0])
    workers = multiprocessing.active_children()
    assert workers, "no worker process started"
    for worker in workers:
        for sig in (signal.SIGINT, signal.SIGTERM):
            os.kill(worker.pid, sig)
    time.sleep(1.0)  # a worker that died of them is gone by now
    for tokens in expected[1:]:
        np.testing.assert_array_equal(next(source).tokens, tokens)
    assert all(worker.is_alive() for worker in workers)


def test_text_mixing_keeps_the_token_ratio(tmp_path):
    write_folder(tmp_path / "folder", 8)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"paragraph {i} " * (1 + i % 5) for i in range(50)))
    cfg = folder_config(tmp_path / "folder", text_path=str(corpus), text_ratio=1.0)
    source = make_source(cfg, 4)
    text = image = 0
    for _ in range(15):
        b = next(source)
        for r in range(4):
            for doc in np.unique(b.segment_ids[r][b.segment_ids[r] > 0]):
                positions = b.segment_ids[r] == doc
                if (b.image_ids[r][positions] >= 0).any():
                    image += positions.sum()
                else:
                    text += positions.sum()
    assert text > 0 and image > 0
    assert 0.8 < text / image < 1.25, (text, image)


def test_text_cached_and_tfds_sources_train_through_the_trainer(tmp_path, monkeypatch):
    from transfusion_jax.data import sources
    from transfusion_jax.data.cache import write_cache

    monkeypatch.setattr(sources, "open_tfds", lambda name, split, data_dir: FakeTfdsSource(6))

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"line {i} " * 5}) for i in range(30)))
    write_folder(tmp_path / "folder", 4)
    write_cache(ImageFolderSource(tmp_path / "folder"), 16, tmp_path / "c.array_record")
    for name, path, data in [
        ("text", tmp_path / "folder", {"text_path": str(corpus)}),
        ("cached", tmp_path / "c.array_record", {}),
        ("tfds", tmp_path / "unused", {"tfds_name": "coco_captions"}),
    ]:
        cfg = folder_config(path, source=name, **data)
        cfg.model.update(d_model=64, depth=2)
        cfg.train.update(batch_size=2, num_steps=2, log_every=2, checkpoint_every=2)
        cfg.mesh.fsdp = 1
        record = train(cfg, tmp_path / name, devices=jax.devices()[:1])
        assert record["step"] == 2 and np.isfinite(record["lm_loss"]), name


@pytest.mark.parametrize(
    "caption, expected",
    [
        (b"a photo", "a photo"),
        (np.bytes_(b"a photo"), "a photo"),
        (np.array(b"a photo", dtype=object), "a photo"),  # 0-d object array
        (np.array([b"one", b"two"], dtype=object), ["one", "two"]),  # a Sequence(Text) feature
        (np.array([b"one", b"two"]), ["one", "two"]),  # fixed-width byte strings
        ([b"one", "two"], ["one", "two"]),
        (b"caf\xe9", "caf\ufffd"),
    ],
)
def test_tfds_text_fields_arrive_as_str(caption, expected):
    from transfusion_jax.data.sources import as_text

    assert as_text(caption) == expected
