"""Does captioning keep up with generation on real class-caption data? Fashion-MNIST, measured.

  python -m experiments.class_captions --out runs/fashion               # quickstart, 16 px
  python -m experiments.class_captions --out runs/fashion --steps 3000 --num 500
  python -m experiments.class_captions --out /tmp/fm --steps 30 --num 20   # a smoke run

An issue reported a tiny model that drew the right class 75% of the time on a 10-class set
("a photo of a {class}") but captioned it right only 24% of the time, mostly with the same word
whatever the picture. This runs the same check on Fashion-MNIST (../shared/data/fashion_mnist.npz,
nothing is downloaded), through the project's own paths:
1. OUT/data: an ImageFolder (`data.source=imagefolder`) of `--per_class` training images per class,
   greyscale written as RGB PNGs at 28 px (the pipeline resizes them to `data.image_size`),
   captioned "a photo of a {class}" (lower case); kept if already there. The run holds out
   `data.held_out_percent` of these records by file-name hash, as every ImageFolder run does.
2. OUT/run: `python -m transfusion_jax.train` on it (log in OUT/run/train.log); running the command
   again resumes the run, and skips training once it has `--steps` steps.
3. The scores, on `--num` Fashion-MNIST test images the run never saw (x_test, classes taken in
   turn, so any prefix is stratified and neighbours differ in class):
   - captioning: the greedy caption (the captions suite's `write_captions`) names the true class;
     also the share of captions naming any class and a histogram of the classes named;
   - likelihood ranking: the caption of the ten with the highest log-likelihood after the image
     (the captions suite's documents and weights, summed per row), and `image_information`, the
     captions suite's figure (nats per token gained from the own image over the next one's);
   - generation: one image per prompt "a photo of a {class}" (classes in turn, the suite's `draw`,
     guidance `--cfg_scale`, the Pipeline's default denoising steps), classified by a 2-layer MLP
     trained here on real training images at the same size; its accuracy on all real test
     images is the ceiling.
It writes OUT/report.json, OUT/drawn.png (drawn images, a row per class), OUT/captions.txt and
prints one `name=value` line per figure.
"""

import argparse
import inspect
import json
import pathlib
import re
import time

import numpy as np
from PIL import Image

from experiments.runs import SHARED, parse_sets, run_logged, train_cli

TEMPLATE = "a photo of a {}"


# -- the data ------------------------------------------------------------------------------------


def caption_of(name: str) -> str:
    return TEMPLATE.format(name.lower())


def write_image_folder(data, folder, per_class: int) -> int:
    """An ImageFolder of the first `per_class` training images of each class (RGB PNGs named
    after their class and x_train index); kept as it is when metadata.jsonl exists. Returns its
    number of rows."""
    folder = pathlib.Path(folder)
    names, labels = [str(n) for n in data["class_names"]], np.asarray(data["y_train"])
    metadata = folder / "metadata.jsonl"
    if metadata.is_file():
        rows = len(metadata.read_text().splitlines())
        if rows != per_class * len(names):
            raise SystemExit(
                f"error: {folder} holds {rows} images, not --per_class {per_class} x "
                f"{len(names)}; give another --out or the --per_class it was written with"
            )
        return rows
    (folder / "images").mkdir(parents=True, exist_ok=True)
    pixels, lines = data["x_train"], []
    for label, name in enumerate(names):
        for index in np.flatnonzero(labels == label)[:per_class]:
            file_name = f"images/{label}_{index:05d}.png"
            Image.fromarray(pixels[index]).convert("RGB").save(folder / file_name)
            lines.append(json.dumps({"file_name": file_name, "text": caption_of(name)}))
    partial = metadata.with_suffix(".partial")  # an interrupted write is written again
    partial.write_text("\n".join(lines) + "\n")
    partial.rename(metadata)
    return len(lines)


def stratified(labels: np.ndarray, num: int, num_classes: int) -> np.ndarray:
    """Indices of `num` examples, classes taken in turn (0, 1, ..., 9, 0, 1, ...), each class's in
    order."""
    by_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    return np.array([by_class[i % num_classes][i // num_classes] for i in range(num)])


def model_pixels(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 greyscale [N, 28, 28] as the pipeline feeds them: float32 [N, size, size, 3] in
    [-1, 1], resized by the same function."""
    from transfusion_jax.data.images import load_image

    return np.stack([load_image(Image.fromarray(x).convert("RGB"), size) for x in images])


# -- captions to classes -------------------------------------------------------------------------


def normalise(text: str) -> str:
    """Lower case, each run of anything but letters and digits one space: "T-shirt/top" ->
    "t shirt top"."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def named_class(caption: str, class_names) -> int | None:
    """The class a caption names, as whole words after `normalise`. A name found only inside
    a longer name's match does not count ("shirt" in "t-shirt/top", "boot" in "ankle boot");
    None when the caption names no class or several."""
    text, matches = f" {normalise(caption)} ", []
    for k, name in enumerate(class_names):
        needle = f" {normalise(name)} "
        start = text.find(needle)
        while start >= 0:
            matches.append((start, start + len(needle), k))
            start = text.find(needle, start + 1)
    named = {
        k
        for s, e, k in matches
        if not any(s2 <= s and e <= e2 and e2 - s2 > e - s for s2, e2, _ in matches)
    }
    return named.pop() if len(named) == 1 else None


def histogram(classes, class_names) -> dict[str, int]:
    """How often each class (and "none") is named or drawn."""
    counts = {name: 0 for name in class_names} | {"none": 0}
    for k in classes:
        counts["none" if k is None else class_names[k]] += 1
    return counts


# -- the classifier ------------------------------------------------------------------------------


def _grey(images: np.ndarray) -> np.ndarray:
    """[N, S, S, 3] in [-1, 1] (or uint8) -> [N, S * S], the mean of the channels."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        images = images / 127.5 - 1.0
    return images.astype(np.float32).mean(-1).reshape(len(images), -1)


def train_classifier(images, labels, num_classes: int = 10, steps: int = 1000, seed: int = 0):
    """A 2-layer MLP (128 hidden ReLU units) on the grey pixels, Adam on batches of 256: the
    judge of drawn images. Returns its parameters."""
    import jax
    import jax.numpy as jnp
    import optax

    x, y = _grey(images), np.asarray(labels)
    k1, k2 = jax.random.split(jax.random.key(seed))
    d, h = x.shape[1], 128
    params = {
        "w1": jax.random.normal(k1, (d, h)) * np.sqrt(2 / d),
        "b1": jnp.zeros(h),
        "w2": jax.random.normal(k2, (h, num_classes)) * np.sqrt(1 / h),
        "b2": jnp.zeros(num_classes),
    }
    optimizer = optax.adam(1e-3)

    def step(carry, batch):
        params, state = carry

        def loss(p):
            logits = _logits(p, x[batch])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y[batch]).mean()

        updates, state = optimizer.update(jax.grad(loss)(params), state)
        return (optax.apply_updates(params, updates), state), None

    x, y = jnp.asarray(x), jnp.asarray(y)
    batches = jnp.asarray(np.random.default_rng(seed).integers(0, len(x), (steps, 256)))
    run = jax.jit(lambda start: jax.lax.scan(step, start, batches)[0])
    return run((params, optimizer.init(params)))[0]


def _logits(params, x):
    import jax

    hidden = jax.nn.relu(x @ params["w1"] + params["b1"])
    return hidden @ params["w2"] + params["b2"]


def classify(params, images) -> np.ndarray:
    """The classifier's class of each image ([N, S, S, 3], in [-1, 1] or uint8)."""
    return np.asarray(_logits(params, _grey(images)).argmax(-1))


# -- scoring the model ---------------------------------------------------------------------------


def row_log_likelihoods(ev):
    """batch -> log-likelihood [B] of each row's text after its image: the captions suite's
    `caption_nll` weights (read from the batch as built, before a discrete run's images become
    code tokens) and the evaluator's clean-image pass (`Evaluator.token_ce`), summed per row (the
    evaluator's `text_nll` sums over the whole batch). Jitted once per evaluator."""
    import jax
    import jax.numpy as jnp

    from transfusion_jax.batch import text_target_mask
    from transfusion_jax.loss import after_an_image

    def score(params, batch, weights):
        ce, _ = ev.token_ce(params, batch)
        return -jnp.sum(jnp.where(weights, ce, 0.0), axis=1)

    compiled = jax.jit(score)

    def rows(batch):
        segments, image_ids = jnp.asarray(batch.segment_ids), jnp.asarray(batch.image_ids)
        weights = text_target_mask(segments, image_ids) & after_an_image(segments, image_ids)
        placed = ev.place((ev.images_as_tokens(batch), np.asarray(weights)))
        return np.asarray(compiled(ev.params, *placed))

    return rows


def caption_log_likelihoods(ev, pictures: np.ndarray, captions: list[str], row_score=None):
    """[N, K]: the log-likelihood (nats) of caption k and its EOS after picture n
    (`BOS BOI image EOI caption EOS`, clean image, as captioning sees it), batched; `row_score`
    (default `row_log_likelihoods(ev)`) scores a batch's rows."""
    images, tokens = ev.model_images(pictures), _caption_tokens(ev, captions)
    rows = [(z, t) for z in images for t in tokens]
    return _log_likelihoods(ev, rows, row_score).reshape(len(images), len(tokens))


def paired_log_likelihoods(ev, pictures: np.ndarray, captions: list[str], row_score=None):
    """[N]: the log-likelihood of caption n after picture n, as `caption_log_likelihoods`."""
    pairs = zip(ev.model_images(pictures), _caption_tokens(ev, captions), strict=True)
    return _log_likelihoods(ev, list(pairs), row_score)


def _caption_tokens(ev, captions: list[str]) -> list[list[int]]:
    """The captions' tokens, cut as training cut them."""
    return [ev.tokenizer.encode(c)[: ev.cfg.data.max_caption_tokens] for c in captions]


def _log_likelihoods(ev, pairs: list, row_score=None) -> np.ndarray:
    """[len(pairs)]: the caption's log-likelihood of each (model image, caption tokens) pair."""
    from transfusion_jax.batch import image_first_document

    row_score = row_score or row_log_likelihoods(ev)
    special = ev.tokenizer.special
    rows = [[image_first_document(z, t, special)] for z, t in pairs]
    return np.concatenate([row_score(batch)[:real] for batch, _, real in ev.batches(rows, [])])


def image_information(log_likelihoods: np.ndarray, labels: np.ndarray, lengths) -> float:
    """The captions suite's `image_information` from the [N, K] table: nats per token (caption
    and EOS) of the true captions after the next picture minus after their own."""
    n = np.arange(len(labels))
    own = log_likelihoods[n, labels].sum()
    other = log_likelihoods[(n + 1) % len(labels), labels].sum()
    tokens = sum(lengths[k] + 1 for k in labels)
    return float((own - other) / tokens)


def train_images(cfg) -> int:
    """How many images of the folder the run trained on (the rest it held out)."""
    from transfusion_jax.data.sources import ImageFolderSource
    from transfusion_jax.data.split import split

    return len(split(ImageFolderSource(cfg.data.path), cfg.data.held_out_percent, held=False))


def per_class(correct: np.ndarray, labels: np.ndarray, class_names) -> dict[str, float]:
    return {name: float(correct[labels == k].mean()) for k, name in enumerate(class_names)}


def score(workdir, data, args) -> tuple[dict, dict]:
    """(report, what was drawn and written) of the trained run on the test images."""
    from transfusion_jax.evaluation.evaluator import Evaluator
    from transfusion_jax.evaluation.suites import draw, write_captions
    from transfusion_jax.inference import load_trained

    timings, start = {}, time.perf_counter()
    model, cfg, step = load_trained(workdir)
    if cfg.data.image_size != args.image_size:
        raise SystemExit(
            f"error: --image_size {args.image_size}: the run in {workdir} trained at "
            f"{cfg.data.image_size} px; give another --out or --image_size {cfg.data.image_size}"
        )
    cfg.eval.update(cfg_scale=args.cfg_scale, sampling_steps=args.sampling_steps)
    ev = Evaluator(cfg, model, step=step)
    names, size = [str(n) for n in data["class_names"]], cfg.data.image_size
    captions = [caption_of(n) for n in names]

    classifier_data = np.asarray(data["y_train"])[: args.classifier_images]
    real_train = model_pixels(data["x_train"][: args.classifier_images], size)
    classifier = train_classifier(real_train, classifier_data, len(names))
    real_test, test_labels = model_pixels(data["x_test"], size), np.asarray(data["y_test"])
    ceiling = float((classify(classifier, real_test) == test_labels).mean())
    timings["classifier"], start = time.perf_counter() - start, time.perf_counter()

    chosen = stratified(test_labels, args.num, len(names))
    pictures, labels = real_test[chosen], test_labels[chosen]
    written = write_captions(ev, pictures)
    named = [named_class(c, names) for c in written]
    timings["captions"], start = time.perf_counter() - start, time.perf_counter()

    table = caption_log_likelihoods(ev, pictures, captions)
    ranked = table.argmax(-1)
    lengths = [len(ev.tokenizer.encode(c)[: cfg.data.max_caption_tokens]) for c in captions]
    timings["likelihood"], start = time.perf_counter() - start, time.perf_counter()

    prompt_labels = np.arange(args.num) % len(names)
    drawn = np.stack(draw(ev, [captions[k] for k in prompt_labels]))
    judged = classify(classifier, drawn)
    timings["drawing"] = time.perf_counter() - start

    caption_right = np.array([k == y for k, y in zip(named, labels, strict=True)])
    report = {
        "step": step,
        "num": args.num,
        "image_size": size,
        "train_images": train_images(cfg),
        "classifier_accuracy": ceiling,
        "generation_accuracy": float((judged == prompt_labels).mean()),
        "caption_accuracy": float(caption_right.mean()),
        "caption_names_a_class": float(np.mean([k is not None for k in named])),
        "likelihood_accuracy": float((ranked == labels).mean()),
        "image_information": image_information(table, labels, lengths),
        "caption_classes": histogram(named, names),
        "likelihood_classes": histogram(ranked.tolist(), names),
        "drawn_classes": histogram(judged.tolist(), names),
        "per_class": {
            "caption": per_class(caption_right, labels, names),
            "likelihood": per_class(ranked == labels, labels, names),
            "generation": per_class(judged == prompt_labels, prompt_labels, names),
        },
        "seconds": timings,
    }
    outputs = dict(
        names=names, labels=labels, written=written, named=named, ranked=ranked, drawn=drawn,
        prompt_labels=prompt_labels, judged=judged,
    )  # fmt: skip
    return report, outputs


# -- outputs -------------------------------------------------------------------------------------


def write_captions_file(path, outputs) -> None:
    """One line per test image: its class, the class its caption names, the likelihood's pick,
    and the caption."""
    names = outputs["names"]
    lines = ["# true class\tnamed\tlikelihood's pick\tcaption"]
    for y, k, r, text in zip(
        outputs["labels"], outputs["named"], outputs["ranked"], outputs["written"], strict=True
    ):
        lines.append(f"{names[y]}\t{'-' if k is None else names[k]}\t{names[r]}\t{text!r}")
    pathlib.Path(path).write_text("\n".join(lines) + "\n")


def plot_drawn(path, outputs) -> None:
    """The drawn images, one row per prompted class, each labelled with the share the
    classifier judged right."""
    from matplotlib.figure import Figure

    names, drawn, prompted = outputs["names"], outputs["drawn"], outputs["prompt_labels"]
    right = outputs["judged"] == prompted
    width = max(int((prompted == k).sum()) for k in range(len(names)))
    size, margin = drawn.shape[1], 1.3  # inches left of the images, for the labels
    figure = Figure(figsize=(margin + 0.45 * width, 0.5 * len(names)))
    figure.subplots_adjust(left=margin / (margin + 0.45 * width), right=0.98, top=0.98, bottom=0.02)
    for k, ax in enumerate(figure.subplots(len(names), 1, squeeze=False)[:, 0]):
        row = np.full((size, width * (size + 1), 3), 255, np.uint8)
        for j, image in enumerate(drawn[prompted == k]):
            row[:, j * (size + 1) : j * (size + 1) + size] = image
        ax.imshow(row, interpolation="nearest")
        ax.set_axis_off()
        share = f"{right[prompted == k].sum()}/{(prompted == k).sum()}"
        label = f"{names[k]} {share}"
        ax.text(-0.02, 0.5, label, transform=ax.transAxes, ha="right", va="center", fontsize=8)
    figure.savefig(path, dpi=110)


def print_report(report: dict) -> None:
    for key, value in report.items():
        if isinstance(value, float):
            print(f"{key}={value:.4f}")
        elif isinstance(value, int):
            print(f"{key}={value}")
        elif key.endswith("_classes"):
            print(f"{key}=" + ",".join(f"{n}:{c}" for n, c in value.items()))


# -- training ------------------------------------------------------------------------------------


def train_command(args, folder, workdir) -> list[str]:
    overrides = {
        "data.source": "imagefolder",
        "data.path": folder,
        "data.image_size": args.image_size,
        # The class names are outside the quickstart's shapes words: byte-level text and rows
        # of 256, as in the recorded results (experiments/results/class_captions_fashion).
        "data.tokenizer": "bytes",
        "data.seq_len": 256,
        "train.num_steps": args.steps,
        **parse_sets(args.set),
    }
    return train_cli(args.config, workdir, overrides)


def trained_steps(workdir) -> int:
    """The newest checkpoint's step (0 for none)."""
    from transfusion_jax.checkpoint import Checkpointer

    directory = pathlib.Path(workdir) / "checkpoints"
    if not directory.is_dir():
        return 0
    return Checkpointer(directory, None, read_only=True).latest_step() or 0


def train(args, folder, workdir) -> float:
    """Trains (or resumes) the run to `--steps`, logging to workdir/train.log; the seconds."""
    if trained_steps(workdir) >= args.steps:
        return 0.0
    command = train_command(args, folder, workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    run_logged(command, workdir / "train.log", "training")
    return time.perf_counter() - start


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv=None):
    from transfusion_jax.inference import Pipeline

    default_steps = inspect.signature(Pipeline.text_to_image).parameters["steps"].default
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--out", required=True, help="data, run, report, plots")
    parser.add_argument("--data", default=str(SHARED / "fashion_mnist.npz"), help="the npz")
    parser.add_argument("--config", default="quickstart", help="the run's config")
    parser.add_argument("--steps", type=int, default=3000, help="training steps")
    parser.add_argument("--image_size", type=int, default=16, help="data.image_size")
    parser.add_argument("--per_class", type=int, default=600, help="training images per class")
    parser.add_argument("--num", type=int, default=200, help="test images and drawn images")
    parser.add_argument("--cfg_scale", type=float, default=3.0, help="guidance when drawing")
    parser.add_argument(
        "--sampling_steps", type=int, default=default_steps, help="denoising steps when drawing"
    )
    parser.add_argument(
        "--classifier_images", type=int, default=20000, help="real images training the judge"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a config override"
    )
    args = parser.parse_args(argv)
    for flag in ("steps", "image_size", "per_class", "num", "sampling_steps", "classifier_images"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} {getattr(args, flag)}: must be at least 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not pathlib.Path(args.data).is_file():
        raise SystemExit(f"error: --data {args.data} does not exist (nothing is downloaded)")
    out = pathlib.Path(args.out).absolute()
    data = dict(np.load(args.data, allow_pickle=False))
    folder, workdir = out / "data", out / "run"
    write_image_folder(data, folder, args.per_class)
    train_seconds = train(args, folder, workdir)
    report, outputs = score(workdir, data, args)
    report["seconds"]["training"] = train_seconds
    report["settings"] = {k: v for k, v in vars(args).items() if k != "out"}
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    write_captions_file(out / "captions.txt", outputs)
    plot_drawn(out / "drawn.png", outputs)
    print_report(report)
    return report


if __name__ == "__main__":
    main()
