"""The sample command line and the quickstart evaluation, end to end on a freshly trained tiny
checkpoint of the shapes data."""

import json
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from tests.helpers import ROOT, command_env
from transfusion_jax import Pipeline
from transfusion_jax import sample as sample_cli
from transfusion_jax.data import shapes
from transfusion_jax.data.images import load_image, to_uint8
from transfusion_jax.evaluation.heldout import HELD_OUT_SEED
from transfusion_jax.generator import SamplingOptions
from transfusion_jax.quickstart import evaluate


@pytest.fixture(scope="module")
def trained(tiny_shapes_run, tmp_path_factory):
    """The shared tiny run of the shapes data (tests.helpers.tiny_shapes_config: 6 steps on 2
    devices, with EMA weights), copied: the quickstart evaluation writes into it, while the
    evaluate tests may be copying the shared run in another worker."""
    run = tmp_path_factory.mktemp("trained") / "run"
    shutil.copytree(tiny_shapes_run, run)
    return run


def run(*args):
    env = command_env()
    cmd = [sys.executable, "-m", "transfusion_jax.sample", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_sample_cli_draws_a_grid_and_captions_an_image(trained, tmp_path):
    out = tmp_path / "out"
    proc = run(
        "--workdir",
        str(trained),
        "--prompt",
        "a small red circle",
        "--num",
        "3",
        "--steps",
        "4",
        "--cfg_scale",
        "2",
        "--out",
        str(out),
        "--ema",
    )
    assert "denoising" in proc.stderr and "4/4" in proc.stderr  # the progress bar
    singles = sorted(out.glob("0*.png"))
    assert [p.name for p in singles] == ["000.png", "001.png", "002.png"]
    assert Image.open(singles[0]).size == (16, 16)
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape[0] >= 2 * 128 and grid.shape[1] >= 2 * 128  # 2x2 cells, enlarged
    proc = run("--workdir", str(trained), "--image", str(singles[0]), "--max_new_tokens", "5")
    caption = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert len(caption) <= 5 * 4  # at most 5 tokens of bytes
    assert "loaded" in proc.stderr


def test_sample_cli_refuses_bad_arguments(trained, tmp_path):
    env = command_env()
    cmd = [sys.executable, "-m", "transfusion_jax.sample", "--workdir", str(tmp_path)]
    proc = subprocess.run(
        cmd + ["--prompt", "x"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "no checkpoint (is it a training run?)" in proc.stderr
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "exactly one of --prompt" in proc.stderr


def test_quickstart_evaluation_scores_with_the_exact_scorer(trained):
    report = evaluate(trained, num=2, steps=3, cfg_scale=3.0)
    assert report["num"] == 2 and 0.0 <= report["text_to_image_accuracy"] <= 1.0
    assert set(report["text_to_image_aspects"]) == set(shapes.ASPECTS)
    kinds = {len(shapes.scene_for_index(i, HELD_OUT_SEED).objects) for i in range(2)}
    apart = report["by_object_count"]
    assert ("text_to_image_accuracy_one_object" in apart) == (1 in kinds)
    assert ("text_to_image_accuracy_two_objects" in apart) == (2 in kinds)
    samples = trained / "samples"
    assert json.loads((samples / "report.json").read_text()) == report
    lines = (samples / "captions.txt").read_text().splitlines()
    assert len(lines) == 4 and "asked: " in lines[0] and "truth: " in lines[2]
    with Image.open(samples / "scored.png") as figure:  # the two tasks' panels, drawn
        assert figure.format == "PNG" and figure.width > 16 * 8
    # The scorer behind the report is exact: it accepts the truth and rejects the drawings of an
    # untrained model (6 steps) - so an accuracy of 0 here is a measurement, not a default.
    scene = shapes.scene_for_index(0, 987_654)
    assert shapes.score_image(shapes.render(scene, 16), scene)["correct"]
    drawn = np.asarray(Image.open(samples / "000.png"))
    assert not shapes.score_image(drawn, scene)["correct"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "x", "--cfg-scale", "nan"], "--cfg_scale nan: must be finite and >= 0"),
        (["--prompt", "x", "--num", "0"], "--num 0: must be at least 1"),
        (["--prompt", "x", "--steps", "1"], "--steps 1: ddpm needs 2 to 1000 steps"),
        (["--prompt", "x", "--sampler", "euler"], "--sampler euler: a model trained with"),
        (["--prompt", "x" * 120], "--prompt: the context would need 139 positions, but the"),
        (["--image", "nowhere.png"], "--image nowhere.png: no such file"),
        (["--image", "x.png", "--prompt", "x"], "exactly one of --prompt"),
        (["--prompt", "x", "--step", "-1"], "--step -1: must be a checkpoint's step number"),
    ],
)
def test_sample_arguments_are_checked_before_the_model_loads(
    trained, monkeypatch, capsys, args, message
):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(sample_cli.Pipeline, "from_workdir", must_not_load)
    with pytest.raises(SystemExit) as exit_info:
        sample_cli.main(["--workdir", str(trained), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_sample_names_a_missing_step_and_draws_from_an_empty_prompt(trained, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample_cli.main(["--workdir", str(trained), "--prompt", "x", "--step", "99"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: --step 99: " in err and "holds steps [6]" in err
    out = tmp_path / "empty"
    args = [
        "--workdir",
        str(trained),
        "--prompt",
        "",
        "--num",
        "1",
        "--steps",
        "2",
        "--out",
        str(out),
    ]
    sample_cli.main(args)  # an empty prompt is the unconditional branch, not "no prompt"
    assert (out / "000.png").is_file()


def test_the_readme_pipeline_example_runs(trained, tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "Pipeline" in b)
    block = block.replace('"workdirs/quickstart"', repr(str(trained))).replace(
        "steps=100", "steps=3"
    )
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert (tmp_path / "circle.png").is_file() and len(scope["images"]) == 2
    assert len(scope["captions"]) == 2 and all(isinstance(c, str) for c in scope["captions"])
    assert all(isinstance(p, str | Image.Image) for p in scope["parts"])


def test_pipeline_matches_the_generator_it_wraps(trained):
    pipe = Pipeline.from_workdir(trained)
    prompt = "a small red circle"
    # 2 prompts, 3 steps at the default guidance scale (3): the README example's compiled sampler
    drawn = pipe.text_to_image([prompt, prompt], steps=3, seed=5)
    tokens = [pipe.tokenizer.special.bos, *pipe.tokenizer.encode(prompt)]
    options = SamplingOptions(max_new_tokens=1, steps=3, cfg_scale=3.0, sampler="ddpm", clip_x0=1.0)
    direct = pipe.generator.generate([tokens] * 2, jax.random.key(5), options, force_image=True)
    for image, row in zip(drawn, direct.images, strict=True):
        np.testing.assert_array_equal(np.asarray(image), to_uint8(row[0]))
    captions = pipe.caption(drawn, max_new_tokens=5)
    again = pipe.caption(np.stack([load_image(image, 16) for image in drawn]), max_new_tokens=5)
    assert captions == again and all(len(c) <= 20 for c in captions)
    parts = pipe.generate("a", max_new_tokens=6, max_images=1, steps=2)
    result = pipe.generator.generate(
        [pipe._prompt("a")], jax.random.key(0), pipe.options(max_new_tokens=6, steps=2)
    )
    assert "".join(p for p in parts if isinstance(p, str)) == "".join(
        pipe.tokenizer.decode(t) for t in _text_runs(result.tokens[0], pipe.tokenizer.special)
    )
    assert sum(isinstance(p, Image.Image) for p in parts) == len(result.images[0])
    with pytest.raises(ValueError, match="sampler 'heun': a model trained with"):
        pipe.text_to_image(prompt, sampler="heun")
    with pytest.raises(ValueError, match="cfg_scale nan"):
        pipe.text_to_image(prompt, cfg_scale=float("nan"))


def _text_runs(tokens, special):
    """The text token runs outside BOI ... EOI (an independent split of the token stream)."""
    runs, current, inside = [], [], False
    for token in tokens:
        if token == special.boi:
            runs.append(current)
            current, inside = [], True
        elif token == special.eoi:
            inside = False
        elif not inside:
            current.append(token)
    return [*runs, current]


def test_pipeline_caption_reads_every_image_form_and_refuses_wrong_scales(trained):
    pipe = Pipeline.from_workdir(trained)
    rendered = shapes.render(shapes.scene_for_index(3, 1), 16)  # uint8 [16, 16, 3]
    reference = pipe.caption(Image.fromarray(rendered), max_new_tokens=4)
    as_float = rendered.astype(np.float32) / 127.5 - 1.0
    for form in (rendered, rendered.astype(np.int64), as_float, jax.numpy.asarray(as_float)[None]):
        assert pipe.caption(form, max_new_tokens=4) == reference
    with pytest.raises(ValueError, match="scaled to \\[-1, 1\\]"):
        pipe.caption(rendered.astype(np.float32), max_new_tokens=4)  # 0-255 floats


def test_export_writes_named_tensors_and_config_and_reads_back_exactly(trained, tmp_path):
    from safetensors.numpy import load_file

    from transfusion_jax import export
    from transfusion_jax.inference import load_trained

    out = tmp_path / "model.safetensors"
    export.main(["--workdir", str(trained), "--out", str(out), "--ema"])
    tensors = load_file(str(out))  # read independently of our loader
    model, cfg, step = load_trained(trained, use_ema=True)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    assert set(tensors) == {export.tensor_name(p) for p, _ in flat}
    assert "transformer/blocks/attn/q/kernel" in tensors
    for path, leaf in flat:
        np.testing.assert_array_equal(tensors[export.tensor_name(path)], np.asarray(leaf))
    loaded, loaded_cfg, loaded_step = load_trained(out)
    assert loaded_step == step and loaded_cfg.to_dict() == cfg.to_dict()
    again = nnx.to_pure_dict(nnx.state(loaded, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, again, params)
    pipe, from_file = Pipeline(model, cfg), Pipeline.from_workdir(out)
    one = pipe.text_to_image("a small red circle", steps=2)[0]
    two = from_file.text_to_image("a small red circle", steps=2)[0]
    np.testing.assert_array_equal(np.asarray(one), np.asarray(two))
    bad = tmp_path / "bad.safetensors"
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(2, np.float32)}, str(bad))
    with pytest.raises(ValueError, match="not a transfusion_jax export"):
        load_trained(bad)


def test_sample_draws_from_an_exported_file_and_refuses_ema_for_it(trained, tmp_path, capsys):
    from transfusion_jax.export import main as export_main

    exported = tmp_path / "model.safetensors"
    export_main(["--workdir", str(trained), "--out", str(exported)])
    with pytest.raises(SystemExit) as exit_info:
        sample_cli.main(["--workdir", str(exported), "--prompt", "x", "--ema"])
    assert exit_info.value.code == 2
    assert "an export holds one set of weights; drop --ema and --step" in capsys.readouterr().err
    sample_cli.main(["--workdir", str(exported), "--prompt", "a red circle", "--num", "1"]
                    + ["--steps", "2"])  # fmt: skip
    assert (tmp_path / "samples" / "000.png").is_file()  # beside the file, by default
