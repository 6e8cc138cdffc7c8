"""A run in a bucket: `--workdir gs://...` and gs:// data paths, through the same code as local
paths (`transfusion_jax.paths`, etils.epath).

No bucket is reachable here, so `fake_bucket` serves gs:// from a local directory at the two
places a real run talks to GCS: epath's fsspec backend (what gcsfs does: every file the run
writes or reads itself) and Orbax's TensorStore kvstore (the checkpoints' arrays). Orbax itself
takes its GCS code paths (no atomic rename: a commit file marks a finished step). The fake
refuses appends, as an object store does. Every test runs from an empty current directory and
checks it stays empty: a path mangled by pathlib (`gs:/bucket/...`) would be written there.
"""

import json
import os
import pathlib

import jax
import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath
from flax import nnx
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from orbax.checkpoint._src.path import gcs_utils
from PIL import Image

from tests.helpers import importable_torchvision
from tests.test_training import small_config
from transfusion_jax import paths
from transfusion_jax.checkpoint import Checkpointer
from transfusion_jax.data.images import load_image
from transfusion_jax.data.sources import ImageFolderSource, TextSource
from transfusion_jax.evaluate import evaluate
from transfusion_jax.export import export
from transfusion_jax.inference import load_trained
from transfusion_jax.plot import plot_runs
from transfusion_jax.sample import main as sample_main
from transfusion_jax.train import MetricsWriter, train
from transfusion_jax.workdir import WorkdirLock

BUCKET = "gs://fake-bucket"


class FakeBucket(DirFileSystem):
    """gs://NAME/KEY as ROOT/NAME/KEY; appends refused, as GCS refuses them."""

    protocol = ("gs", "gcs")
    cachable = False

    def open(self, path, mode="rb", *args, **kwargs):
        if "a" in mode or "+" in mode:
            raise OSError(f"{path}: an object store cannot append to (or update) an object")
        return super().open(path, mode, *args, **kwargs)


@pytest.fixture
def fake_bucket(tmp_path, monkeypatch):
    """The local directory behind gs://; the test runs in an empty current directory."""
    root = tmp_path / "gcs"
    root.mkdir()
    bucket = FakeBucket(path=str(root), fs=LocalFileSystem())
    fs = epath_backend._FileSystemSpecBackend.fs

    def fake_fs(self, path):
        return bucket if os.fspath(path).startswith("gs://") else fs(self, path)

    def kvstore(path):  # TensorStore's gcs driver, on the same directory
        name, key = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
        return {"driver": "file", "path": str(root / name / key)}

    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # fsspec, not gfile
    monkeypatch.setattr(epath_backend._FileSystemSpecBackend, "fs", fake_fs)
    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", kvstore)
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield root
    assert not list(cwd.iterdir()), "files were written to the current directory"


def local(root, url) -> pathlib.Path:
    return root / url.removeprefix("gs://")


def test_path_helpers_keep_urls_and_make_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = paths.as_path("gs://bucket/run")
    assert (
        str(url) == "gs://bucket/run" and str(url / "checkpoints") == "gs://bucket/run/checkpoints"
    )
    assert str(paths.absolute("gs://bucket/run")) == "gs://bucket/run"
    assert str(pathlib.Path("gs://bucket/run")) == "gs:/bucket/run"  # what the helpers avoid
    assert not paths.is_local("gs://bucket/run") and not paths.is_local(url)
    assert paths.is_local("runs/a") and paths.is_local(tmp_path)
    assert paths.absolute("runs/a") == tmp_path / "runs" / "a"
    assert str(paths.absolute("runs/../b")) == f"{tmp_path}/runs/../b"  # as pathlib makes it
    assert isinstance(paths.as_path(tmp_path), epath.Path)


def test_atomic_write_and_lock_on_a_bucket(fake_bucket, caplog):
    run = paths.as_path(f"{BUCKET}/run")
    run.mkdir(parents=True, exist_ok=True)
    paths.write_atomically(run / "a.json", "one\n")
    paths.write_atomically(run / "a.json", b"two\n")
    assert (local(fake_bucket, f"{BUCKET}/run") / "a.json").read_text() == "two\n"
    assert sorted(p.name for p in run.iterdir()) == ["a.json"]  # no temporary file left
    WorkdirLock.warned = False
    for _ in range(2):
        WorkdirLock(run).release()
    warnings = [r for r in caplog.records if "no file locks" in r.getMessage()]
    assert len(warnings) == 1  # once per process
    assert not (run / "lock").exists()


def test_metrics_are_rewritten_whole_in_a_bucket_and_appended_locally(fake_bucket, tmp_path):
    expected = '{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.5}\n'
    for workdir in (f"{BUCKET}/w", tmp_path / "w"):  # the fake bucket refuses appends
        paths.as_path(workdir).mkdir(parents=True, exist_ok=True)
        for step in (1, 2):  # a second writer, as a resumed run has, continues the file
            writer = MetricsWriter(workdir, tensorboard=False)
            writer.write({"step": step, "loss": 0.5})
            writer.close()
        assert (paths.as_path(workdir) / "metrics.jsonl").read_text() == expected


def test_local_copy_and_save_image_through_the_bucket(fake_bucket):
    url = f"{BUCKET}/files/red.png"
    paths.as_path(url).parent.mkdir(parents=True, exist_ok=True)
    paths.save_image(Image.new("RGB", (4, 4), (255, 0, 0)), url)
    with paths.local_copy(url) as copy, Image.open(copy) as image:
        assert paths.is_local(copy) and image.getpixel((0, 0)) == (255, 0, 0)
    assert not copy.exists()  # the temporary copy is gone
    with pytest.raises(ValueError, match="unknown image file extension"):
        paths.save_image(Image.new("RGB", (4, 4)), f"{BUCKET}/files/red.nope")
    assert not paths.as_path(f"{BUCKET}/files/red.nope").exists()


@pytest.fixture
def bucket_run(fake_bucket):
    """(workdir URL, its local directory, config) of a run trained to step 2 and resumed to 4,
    with a held-out text file in the bucket for the evaluation."""
    workdir = f"{BUCKET}/runs/one"
    (fake_bucket / "fake-bucket").mkdir()
    (fake_bucket / "fake-bucket" / "held_out.txt").write_text("a red circle\n\na blue square\n")
    cfg = small_config(fsdp=1)
    cfg.train.update(num_steps=4, checkpoint_every=2, eval_every=0)
    cfg.image.latent_channels, cfg.data.image_size = 3, cfg.image.latent_size  # pixels: PNGs
    cfg.eval.text_path = f"{BUCKET}/held_out.txt"
    train(cfg, workdir, devices=jax.devices()[:1], stop_at_step=2)
    on_disk = local(fake_bucket, workdir)
    assert sorted(p.name for p in (on_disk / "checkpoints").iterdir()) == ["2"]
    # Orbax took its GCS path: no rename, a commit file marks the finished step
    assert (on_disk / "checkpoints" / "2" / "commit_success.txt").is_file()
    first = (on_disk / "metrics.jsonl").read_text().splitlines()
    with open(on_disk / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss"')  # torn: cut on resume
    train(cfg, workdir, devices=jax.devices()[:1])  # from step 2; metrics.jsonl written whole
    lines = (on_disk / "metrics.jsonl").read_text().splitlines()
    assert lines[:2] == first and [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]
    assert json.loads((on_disk / "config.json").read_text())["train"]["num_steps"] == 4
    return workdir, on_disk, cfg


def test_train_resume_load_sample_evaluate_export_and_plot_in_a_bucket(bucket_run, capsys):
    workdir, on_disk, cfg = bucket_run
    checkpoints = Checkpointer(f"{workdir}/checkpoints", keep=None, read_only=True)
    assert str(checkpoints.directory) == f"{workdir}/checkpoints"
    assert checkpoints.manager.all_steps() == [2, 4]
    checkpoints.close()

    model, loaded, step = load_trained(workdir)
    assert step == 4 and loaded.model.d_model == cfg.model.d_model

    result = evaluate(workdir, ["text"], num=2, batch_size=2)  # eval.text_path in the bucket
    assert str(result.path) == f"{workdir}/eval/4.json"
    assert "text/bits_per_byte" in json.loads((on_disk / "eval" / "4.json").read_text())["metrics"]

    sample_main(["--workdir", workdir, "--prompt", "a red circle", "--num", "1", "--steps", "2"])
    assert Image.open(on_disk / "samples" / "grid.png").format == "PNG"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(on_disk / "red.png")
    sample_main(["--workdir", workdir, "--image", f"{workdir}/red.png", "--max_new_tokens", "2"])

    export(model, loaded, step, f"{workdir}/model.safetensors")
    _, exported_cfg, exported_step = load_trained(f"{workdir}/model.safetensors")
    assert exported_step == 4 and exported_cfg.model.depth == cfg.model.depth

    plot_runs([workdir], f"{workdir}/curves.png", metrics=["loss"])
    assert Image.open(on_disk / "curves.png").format == "PNG"
    capsys.readouterr()


def test_text_and_image_folder_data_in_a_bucket(fake_bucket):
    data = local(fake_bucket, f"{BUCKET}/data")
    (data / "text" / "sub").mkdir(parents=True)
    (data / "text" / "a.txt").write_text("first one\n\nsecond one\n")
    (data / "text" / "sub" / "b.jsonl").write_text(json.dumps({"text": "third"}) + "\n")
    text = TextSource(f"{BUCKET}/data/text")
    assert sorted(text[i]["text"] for i in range(len(text))) == ["first one", "second one", "third"]

    folder = data / "images"
    folder.mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(folder / "red.png")
    rows = [
        {"file_name": "red.png", "text": "red"},
        {"file_name": "../text/a.txt", "text": "outside"},
        {"file_name": "/etc/passwd", "text": "absolute"},
    ]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    images = ImageFolderSource(f"{BUCKET}/data/images")
    assert len(images) == 1 and images.skipped == 2
    assert images[0]["image"] == f"{BUCKET}/data/images/red.png"
    pixels = load_image(images[0]["image"], 4)
    assert pixels.shape == (4, 4, 3) and np.allclose(pixels[..., 0], 1.0)


def same_arrays(a, b) -> bool:
    """Two trees of arrays with the same structure and equal leaves."""
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        jax.tree.leaves(jax.tree.map(np.array_equal, a, b))
    )


def test_clip_weights_in_a_bucket(fake_bucket, tmp_path):
    """eval.clip_weights as a gs:// directory loads as the same directory on disk does."""
    torch = pytest.importorskip("torch", reason="the CLIP directory is written by transformers")
    importable_torchvision(torch)  # transformers imports torchvision whenever it is installed
    pytest.importorskip("transformers", reason="the CLIP directory is written by transformers")
    from tests.test_clip import SENTENCES, learn_merges, reference_clip, write_tokenizer
    from transfusion_jax.evaluation import clip as clip_lib

    (tmp_path / "tokenizer").mkdir()
    write_tokenizer(tmp_path / "tokenizer", learn_merges(" ".join(SENTENCES), 40))
    url = f"{BUCKET}/clip"
    on_disk = local(fake_bucket, url)
    on_disk.mkdir(parents=True)
    reference_clip(on_disk, tmp_path / "tokenizer", act="quick_gelu", legacy_eos=False)
    size = {"size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 32}}
    (on_disk / clip_lib.PREPROCESSOR).write_text(json.dumps(size))

    remote, here = clip_lib.load_clip(url), clip_lib.load_clip(on_disk)
    assert remote.cfg == here.cfg and remote.preprocess == here.preprocess
    assert remote.preprocess.shortest_edge == 40  # preprocessor_config.json was read
    assert remote.tokenizer.vocab == here.tokenizer.vocab
    assert remote.tokenizer.ranks == here.tokenizer.ranks
    assert same_arrays(
        nnx.to_pure_dict(nnx.state(remote.model)), nnx.to_pure_dict(nnx.state(here.model))
    )
    with pytest.raises(FileNotFoundError, match=f"--clip_weights {BUCKET}/absent: expected"):
        clip_lib.load_clip(f"{BUCKET}/absent")


def test_inception_weights_in_a_bucket(fake_bucket):
    """eval.inception_weights as a gs:// file (torch's zip format, and the legacy one of
    pytorch-fid's published file) loads as the same file on disk does."""
    torch = pytest.importorskip("torch", reason="the Inception weights are written by torch")
    torchvision = importable_torchvision(torch)
    if torchvision is None:
        pytest.skip("the Inception weights are torchvision's Inception3")
    from tests.test_fid import perturbed_inception_state
    from transfusion_jax.evaluation import inception
    from transfusion_jax.evaluation.torch_weights import load_torch_state_dict

    state = perturbed_inception_state(torch, torchvision)
    url = f"{BUCKET}/{inception.FID_WEIGHTS_NAME}"
    on_disk = local(fake_bucket, url)
    on_disk.parent.mkdir(parents=True)
    torch.save(state, on_disk)
    torch.save(state, on_disk.with_suffix(".legacy"), _use_new_zipfile_serialization=False)

    assert str(inception.check_weights(url)) == url
    remote, here = inception.load_inception(url), inception.load_inception(on_disk)
    assert same_arrays(nnx.to_pure_dict(remote._state), nnx.to_pure_dict(here._state))
    legacy = load_torch_state_dict(url.removesuffix(".pth") + ".legacy")
    assert same_arrays(legacy, load_torch_state_dict(on_disk.with_suffix(".legacy")))
    with pytest.raises(FileNotFoundError, match=f"--inception_weights.*{BUCKET}/absent.pth"):
        inception.check_weights(f"{BUCKET}/absent.pth")
