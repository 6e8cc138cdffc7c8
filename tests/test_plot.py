"""Training-curve plots from fake runs: the panels drawn, the image written, --x flops, --metrics,
evaluation results from DIR/eval/*.json, and the errors for runs that cannot be drawn."""

import json

import pytest
from PIL import Image

from transfusion_jax.plot import PlotError, main, plot_runs, read_runs


def write_run(run_dir, steps=5, flops=False, eval_every=2, torn=True):
    """A metrics.jsonl as training writes it, eval keys on some rows, a torn last line."""
    run_dir.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        row = {
            "step": step * 10,
            "loss": 3.0 / step,
            "lm_loss": 2.0 / step,
            "diffusion_loss": 1.0 / step,
            "learning_rate": 1e-3 * step / steps,
            "tokens_per_s": 1000.0 + step,
            "note": "text is skipped",
            "bad": None,
        }
        if flops:
            row["train_flops"] = 1e12 * step * 10
        if step % eval_every == 0:
            row["eval/shapes/text_to_image_accuracy"] = 0.1 * step
        lines.append(json.dumps(row))
    text = "\n".join(lines) + "\n"
    if torn:
        text += '{"step": 60, "loss": 0.4, "lm_lo'
    (run_dir / "metrics.jsonl").write_text(text)
    return run_dir


@pytest.fixture
def runs(tmp_path):
    small = write_run(tmp_path / "small", flops=True)
    large = write_run(tmp_path / "large", eval_every=3)
    return small, large


EXPECTED = ["loss", "lm_loss", "diffusion_loss", "learning_rate",
            "eval/shapes/text_to_image_accuracy"]  # fmt: skip


def check_image(path, min_size=(300, 200)):
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
        assert image.size[0] <= 4000 and image.size[1] <= 4000
        return image.size


def test_read_runs_skips_torn_lines_and_non_numbers(runs):
    small, large = runs
    data = read_runs([small, large])
    assert list(data) == ["small", "large"]
    assert [row["step"] for row in data["small"]] == [10, 20, 30, 40, 50]  # torn step 60 skipped
    assert "note" not in data["small"][0] and "bad" not in data["small"][0]
    assert data["small"][0]["train_flops"] == 1e13


def test_plot_runs_draws_one_panel_per_metric(runs, tmp_path):
    out = tmp_path / "plots" / "curves.png"
    keys = plot_runs(runs, out)
    assert keys == EXPECTED
    width, height = check_image(out)
    assert width > height  # a 3 x 2 grid


def test_main_writes_the_image(runs, tmp_path, capsys):
    out = tmp_path / "main.png"
    main([str(d) for d in runs] + ["--out", str(out)])
    check_image(out)
    assert "5 panels" in capsys.readouterr().out


def test_metrics_restrict_the_panels(runs, tmp_path):
    out = tmp_path / "some.png"
    main([str(d) for d in runs] + ["--out", str(out), "--metrics", "loss,tokens_per_s"])
    check_image(out, min_size=(300, 150))
    assert plot_runs(runs, out, metrics=["learning_rate"]) == ["learning_rate"]
    with pytest.raises(PlotError, match="no run logs nope"):
        plot_runs(runs, out, metrics=["loss", "nope"])


def test_x_flops_needs_train_flops(runs, tmp_path, capsys):
    small, large = runs
    out = tmp_path / "flops.png"
    assert plot_runs([small], out, x="flops") == EXPECTED
    check_image(out)
    with pytest.raises(SystemExit) as error:
        main([str(small), str(large), "--out", str(out), "--x", "flops"])
    message = capsys.readouterr().err
    assert error.value.code == 2 and message.startswith("error: ")
    assert "large" in message and "train_flops" in message


def test_missing_metrics_file_names_the_directory(runs, tmp_path, capsys):
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    with pytest.raises(SystemExit) as error:
        main([str(runs[0]), str(empty), "--out", str(tmp_path / "x.png")])
    message = capsys.readouterr().err
    assert error.value.code == 2 and str(empty) in message and "metrics.jsonl" in message
    with pytest.raises(PlotError, match="does not exist"):
        read_runs([tmp_path / "missing"])
    assert not (tmp_path / "x.png").exists()


def test_eval_results_add_points(runs, tmp_path):
    small, large = runs
    eval_dir = small / "eval"
    eval_dir.mkdir()
    (eval_dir / "30.json").write_text(json.dumps({
        "step": 30, "ema": False, "metrics": {"captions/cider": 0.5, "shapes/images": 8},
        "settings": {"seed": 0},
    }))  # fmt: skip
    (eval_dir / "50-ema.json").write_text(json.dumps({
        "step": 50, "ema": True, "metrics": {"captions/cider": 0.7, "text/note": "skipped"},
    }))  # fmt: skip
    (eval_dir / "50.json.tmp").write_text("{")  # an evaluation still being written
    data = read_runs([small])["small"]
    cider = [
        (row["step"], row["eval/captions/cider"]) for row in data if "eval/captions/cider" in row
    ]
    assert cider == [(30, 0.5)]
    assert [row["step"] for row in data if "eval/ema/captions/cider" in row] == [50]
    keys = plot_runs([small, large], tmp_path / "eval.png", metrics=["all"])
    assert keys == EXPECTED[:4] + [
        "eval/captions/cider",
        "eval/ema/captions/cider",
        "eval/shapes/images",
        "eval/shapes/text_to_image_accuracy",
    ]
    # by default every metric but the counts (captions/images is one); "headline": one a suite
    default = plot_runs([small, large], tmp_path / "eval.png")
    assert default == keys
    (eval_dir / "40.json").write_text(json.dumps({"step": 40, "metrics": {"captions/images": 3}}))
    assert plot_runs([small, large], tmp_path / "eval.png") == keys
    assert "eval/captions/images" in plot_runs([small], tmp_path / "e.png", metrics=["all"])
    headline = plot_runs([small, large], tmp_path / "eval.png", metrics=["headline"])
    assert headline == EXPECTED[:4] + [
        "eval/captions/cider",
        "eval/ema/captions/cider",
        "eval/shapes/text_to_image_accuracy",
    ]
    # the evaluation rows have no train_flops: their x comes from the training rows around them
    assert plot_runs([small], tmp_path / "eval_flops.png", x="flops")[4] == "eval/captions/cider"
