"""experiments/compare_chameleon.py: the commands it runs, the parity it reads off the curves, the
table and plot it writes from runs' logs, and a micro run end to end (slow)."""

import csv
import json

import pytest

from experiments import compare_chameleon as cc


def test_dry_run_trains_the_tokenizer_then_both_methods_at_every_size(capsys, tmp_path):
    cc.main(["--scale", "cpu", "--out", str(tmp_path), "--dry_run"])
    out = capsys.readouterr().out
    blocks = [b for b in out.split("# ") if b]
    assert blocks[0].startswith("the VQ tokenizer") and "--config vq_tiny" in blocks[0]
    runs = [b.splitlines()[0] for b in blocks[1:]]
    assert runs == [f"{m} {s}" for s in ("d64x2", "d128x4") for m in cc.METHODS]
    transfusion, chameleon = blocks[1], blocks[2]
    assert "--config.model.image_repr=discrete" in chameleon
    assert f"--config.image.vae_path={tmp_path.resolve() / 'tokenizer'}" in chameleon
    assert "image_repr" not in transfusion and "--config.patch.kind=linear" in transfusion
    for block in (transfusion, chameleon):  # the same rows, data and guidance for both
        assert "--config.data.image_size=16" in block and "--config.image.patch_size=2" in block
        assert "--config.eval.cfg_scale=5.0" in block and "--cfg_scale 5.0" in block
        assert "--config.model.d_model=64" in block


def test_parity_is_read_off_the_curve_by_interpolation():
    curve = [(1.0, 0.1), (2.0, 0.3), (4.0, 0.5)]
    flops, bound = cc.parity_flops(curve, 0.4, higher=True)
    assert flops == pytest.approx(3.0) and not bound
    assert cc.parity_flops(curve, 0.05, higher=True) == (1.0, True)  # only an upper bound
    assert cc.parity_flops(curve, 0.6, higher=True) is None
    losses = [(1.0, 3.0), (3.0, 2.0)]
    assert cc.parity_flops(losses, 2.5, higher=False) == (pytest.approx(2.0), False)


def fake_run(workdir, per_step, evals: dict, final: dict):
    """A run directory as the trainer and evaluate leave it: metrics.jsonl and eval/STEP.json."""
    (workdir / "eval").mkdir(parents=True)
    lines = []
    for step, metrics in evals.items():
        lines.append({"step": step, "loss": 1.0, "train_flops": step * per_step})
        lines.append({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}})
    (workdir / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    last = max(evals)
    (workdir / "eval" / f"{last}.json").write_text(json.dumps({"metrics": final}))


def test_results_table_and_plot_from_the_runs_logs(tmp_path):
    t2i, bpb = "shapes/text_to_image_accuracy", "text/bits_per_byte"
    runs = {
        ("transfusion", "d64x2"): tmp_path / "runs" / "t",
        ("chameleon", "d64x2"): tmp_path / "runs" / "c",
    }
    fake_run(runs["transfusion", "d64x2"], 10.0, {100: {t2i: 0.2, bpb: 3.0},
             200: {t2i: 0.6, bpb: 2.5}}, {t2i: 0.7, bpb: 2.4})  # fmt: skip
    fake_run(runs["chameleon", "d64x2"], 11.0, {100: {t2i: 0.1, bpb: 3.2},
             200: {t2i: 0.4, bpb: 2.6}}, {t2i: 0.4, bpb: 2.75})  # fmt: skip
    # the EMA weights' scores are not compared
    ema = runs["chameleon", "d64x2"] / "eval" / "200-ema.json"
    ema.write_text(json.dumps({"metrics": {t2i: 0.99}}))
    cc.write_results(tmp_path, "cpu", ["d64x2"], runs)
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    t2i_rows = [r for r in rows if r["method"] == "transfusion" and r["metric"] == t2i]
    assert [(r["source"], float(r["value"])) for r in t2i_rows] == [
        ("final", 0.7),
        ("training", 0.2),
        ("training", 0.6),
    ]
    assert [float(r["train_flops"]) for r in t2i_rows] == [2000.0, 1000.0, 2000.0]
    assert 0.99 not in [float(r["value"]) for r in rows]
    table = (tmp_path / "table.md").read_text()
    # the table holds the evaluate command's scores of the last step
    assert "| d64x2 | transfusion | 2e+03 | 0.7 |" in table
    assert "| d64x2 | chameleon | 2.2e+03 | 0.4 |" in table
    # parity on the training-time curves (one sample size): Chameleon's last t2i 0.4, which
    # Transfusion passes between 1000 (0.2) and 2000 (0.6) FLOPs, at 1500 = 68.2% of 2200; its
    # bpb 2.6, between 3.0 and 2.5, at 1800 = 81.8%
    assert "t2i acc: Chameleon ends at 0.4; Transfusion reaches it at 68.2%" in table
    assert "text bpb: Chameleon ends at 2.6; Transfusion reaches it at 81.8%" in table
    assert (tmp_path / "flops.png").stat().st_size > 0


def test_parity_reached_at_the_first_evaluation_is_reported_as_a_bound(tmp_path):
    bpb, t2i = "text/bits_per_byte", "shapes/text_to_image_accuracy"
    runs = {("transfusion", "s"): tmp_path / "t", ("chameleon", "s"): tmp_path / "c"}
    fake_run(
        runs["transfusion", "s"], 1.0, {10: {bpb: 2.0, t2i: 0.0}, 20: {bpb: 1.9, t2i: 0.0}}, {}
    )
    fake_run(runs["chameleon", "s"], 1.0, {10: {bpb: 3.0, t2i: 0.0}, 20: {bpb: 2.5, t2i: 0.0}}, {})
    cc.write_results(tmp_path, "cpu", ["s"], runs)
    table = (tmp_path / "table.md").read_text()
    assert "reaches it by its first evaluation, at 50.0% of Chameleon's FLOPs (a bound)" in table
    # a score at the floor all along is no target to reach
    assert (
        "t2i acc: no parity read: Chameleon's score did not improve over its run (0 -> 0)" in table
    )


def test_micro_run_writes_results_and_skips_finished_runs(tmp_path, capsys, tiny_tokenizer):
    text = tmp_path / "corpus.txt"  # a corpus of its own: ../shared need not exist
    text.write_text("\n\n".join(f"paragraph {i}: the quick brown fox. " * 4 for i in range(60)))
    out = tmp_path / "out"
    args = ["--scale", "cpu", "--out", str(out), "--sizes", "d64x2", "--steps", "4",
            "--text", str(text),
            "--vq", str(tiny_tokenizer), "--num", "2", "--sampling_steps", "2", "--suites",
            "shapes,text", "--set", "eval.num_examples=2", "--set", "eval.batch_size=2",
            "--set", "eval.sampling_steps=2", "--set", "train.eval_suites=text"]  # fmt: skip
    cc.main(args)
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["method"] for r in rows} == set(cc.METHODS)
    assert {"shapes/text_to_image_accuracy", "text/bits_per_byte"} <= {r["metric"] for r in rows}
    assert all(float(r["train_flops"]) > 0 for r in rows)
    assert (out / "flops.png").is_file()
    assert "Transfusion vs Chameleon" in (out / "table.md").read_text()
    capsys.readouterr()
    cc.main(args)
    assert capsys.readouterr().out.count("finished earlier") == 2
