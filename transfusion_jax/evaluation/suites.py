"""The evaluation suites: each scores one thing about a model and returns {"suite/metric": value}.

- `shapes`: the built-in data's exact scorer as a GenEval-style suite, text -> image and
  captioning on held-out scenes: overall accuracy and per aspect (count, colours, shapes, sizes,
  relation), and the exact accuracy of one- and two-object scenes apart. Needs a run trained on
  data.source=shapes.
- `text`: perplexity and bits per byte of held-out text (`language.py`).
- `diffusion`: the held-out diffusion loss (the caption-first documents' image MSE) on a fixed
  grid of noise levels with fixed noise: the cheapest image-quality signal, comparable between
  checkpoints of a run.
- `captions`: CIDEr-D of greedy captions of held-out images against all their captions, and
  whether captioning reads the image at all: the captions' likelihood after their own image and
  after another one (`image_information`, nats per token; 0 = the image is ignored).
- `images`: FID (Inception pool features, `--inception_weights`) of images drawn from held-out
  captions against the held-out images, and their CLIP score (`--clip_weights`).
Every suite reads held-out data only (`heldout.py`) and draws with `eval.seed`.
"""

import jax
import jax.numpy as jnp
import numpy as np

from transfusion_jax.batch import caption_first_document, image_first_document, text_target_mask
from transfusion_jax.data import shapes
from transfusion_jax.data.images import to_uint8
from transfusion_jax.evaluation.heldout import HELD_OUT_SEED, held_out_texts
from transfusion_jax.evaluation.language import bits_per_byte, perplexity, text_windows
from transfusion_jax.loss import after_an_image


def _chunks(items: list, size: int):
    """`items` in chunks of exactly `size` (the last padded with its first item), so batched
    generation compiles once (the generator pads prompt lengths to a few widths, too); yields
    (chunk, how many are real). The chunks are eval.batch_size whatever the devices, so an
    evaluation during training draws what the evaluate command draws."""
    for start in range(0, len(items), size):
        chunk = items[start : start + size]
        yield chunk + [chunk[0]] * (size - len(chunk)), len(chunk)


def draw(ev, prompts: list[str]) -> list[np.ndarray]:
    """uint8 images drawn for the prompts, batched, with the eval seed and settings."""
    e, images = ev.settings, []
    limit = ev.cfg.data.max_caption_tokens  # as training cut the captions
    for i, (chunk, real) in enumerate(_chunks(prompts, e.batch_size)):
        drawn = ev.pipeline.text_to_image(
            chunk,
            steps=e.sampling_steps,
            cfg_scale=e.cfg_scale,
            seed=e.seed + i,
            max_prompt_tokens=limit,
        )
        images += [np.asarray(x) for x in drawn[:real]]
    return images


def write_captions(ev, pictures: np.ndarray) -> list[str]:
    """Greedy captions of pictures [N, S, S, 3] in [-1, 1], batched."""
    limit = ev.cfg.data.max_caption_tokens + 2
    captions = []
    for chunk, real in _chunks(list(pictures), ev.settings.batch_size):
        written = ev.pipeline.caption(np.stack(chunk), max_new_tokens=limit, seed=ev.settings.seed)
        captions += written[:real]
    return captions


def _rates(scores: list[dict], prefix: str) -> dict:
    """The share of examples with each score true; `correct` is reported as `accuracy`."""
    return {
        f"{prefix}_{'accuracy' if key == 'correct' else key}": float(
            np.mean([s[key] for s in scores])
        )
        for key in scores[0]
    }


def shapes_suite(ev) -> dict:
    if ev.cfg.data.source != "shapes":
        raise ValueError(
            f"--suite shapes: the run trained on data.source={ev.cfg.data.source!r}; the shapes "
            f"suite scores runs trained on the built-in shapes data"
        )
    num, size = ev.settings.num_examples, ev.cfg.data.image_size
    scenes = [shapes.scene_for_index(i, HELD_OUT_SEED) for i in range(num)]
    drawn = draw(ev, [shapes.caption(s) for s in scenes])
    image_scores = [shapes.score_image(x, s) for x, s in zip(drawn, scenes, strict=True)]

    truth = [shapes.scene_for_index(i, HELD_OUT_SEED + 1) for i in range(num)]
    pictures = np.stack([shapes.render(s, size) for s in truth])
    captions = write_captions(ev, pictures.astype(np.float32) / 127.5 - 1.0)
    caption_scores = [shapes.score_caption(c, s) for c, s in zip(captions, truth, strict=True)]
    ev.artifacts["shapes"] = dict(
        drawn=drawn,
        prompts=[shapes.caption(s) for s in scenes],
        image_scores=image_scores,
        pictures=list(pictures),
        captions=captions,
        truths=[shapes.caption(s) for s in truth],
        caption_scores=caption_scores,
    )
    rates = _rates(image_scores, "text_to_image") | _rates(caption_scores, "captioning")
    rates |= _by_object_count(image_scores, scenes, "text_to_image")
    rates |= _by_object_count(caption_scores, truth, "captioning")
    return {f"shapes/{k}": v for k, v in rates.items()}


def _by_object_count(scores: list[dict], scenes: list, prefix: str) -> dict:
    """Exact accuracy over the one-object and the two-object scenes apart (a key only where
    there are some): a two-object scene asks for seven things right at once, so the two rates
    differ many-fold and the mix alone hides which one moved."""
    rates = {}
    for count, name in ((1, "one_object"), (2, "two_objects")):
        pairs = zip(scores, scenes, strict=True)
        chosen = [s["correct"] for s, x in pairs if len(x.objects) == count]
        if chosen:
            rates[f"{prefix}_accuracy_{name}"] = float(np.mean(chosen))
    return rates


def text_suite(ev) -> dict:
    texts, where = held_out_texts(ev.cfg, ev.settings.num_examples)
    token_lists = [ev.tokenizer.encode(t) for t in texts]
    kept = [(t, ids) for t, ids in zip(texts, token_lists, strict=True) if ids]
    if not kept:
        raise ValueError(f"--text_path: the held-out text ({where}) is empty; give another")
    special = ev.tokenizer.special
    windows = text_windows([ids for _, ids in kept], ev.cfg.data.seq_len, special.bos, special.pad)
    tokens, weights, lengths = windows
    # one document per row: its only part is the window's tokens
    rows = [[[row[:n].tolist()]] for row, n in zip(tokens, lengths, strict=True)]
    total, count = 0.0, 0.0
    for batch, (w,), _ in ev.batches(rows, [weights]):
        nll, n = ev.text_nll(batch, w)
        total, count = total + nll, count + n
    num_bytes = sum(len(t.encode("utf-8")) for t, _ in kept)
    return {
        "text/perplexity": perplexity(total, int(round(count))),
        "text/bits_per_byte": bits_per_byte(total, num_bytes),
        "text/nll_per_token": total / count,
        "text/tokens": count,
    }


def diffusion_suite(ev) -> dict:
    cfg = ev.cfg
    if cfg.model.image_repr == "discrete":
        raise ValueError(
            "--suite diffusion: the run has model.image_repr='discrete' (VQ code tokens) and no "
            "diffusion loss; its image tokens' loss is in the training logs (image_token_loss)"
        )
    examples = ev.examples()
    per_level = image_loss_per_level(ev, [x.captions[0] for x in examples])
    result = {f"diffusion/val_loss_t{t}": v for t, v in per_level.items()}
    result["diffusion/val_loss"] = float(np.mean(list(per_level.values())))
    return result


def image_loss_per_level(
    ev, captions: list[str], drop_caption: bool = False, keep: list[int] | None = None
) -> dict[int, float]:
    """{t: mean diffusion loss} of the held-out images, each after its caption in `captions` (or
    none with `drop_caption`), at each of eval.diffusion_levels with fixed noise. `keep`: only
    these examples (indices into the held-out list; each keeps its own noise)."""
    cfg, settings = ev.cfg, ev.settings
    examples = ev.examples()
    if len(captions) != len(examples):
        raise ValueError(f"{len(captions)} captions for {len(examples)} held-out images")
    keep = list(range(len(captions))) if keep is None else list(keep)
    latents = ev.model_images(np.stack([examples[k].image for k in keep]))
    special = ev.tokenizer.special
    limit = cfg.data.max_caption_tokens
    rows = [
        [caption_first_document(ev.tokenizer.encode(captions[k])[:limit], z, special, drop_caption)]
        for k, z in zip(keep, latents, strict=True)
    ]
    m = cfg.image.max_images
    levels = [
        min(int(f * ev.diffusion.num_timesteps), ev.diffusion.num_timesteps - 1)
        for f in settings.diffusion_levels
    ]
    # Example k's noise at level j is drawn from (seed, k, j): the same whatever the batching.
    key, shape = jax.random.key(settings.seed), latents.shape[1:]

    def draw_noise(k, j):
        return jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, k), j), shape)

    ks, js = np.meshgrid(np.array(keep), np.arange(len(levels)), indexing="ij")
    noise = np.asarray(jax.vmap(draw_noise)(ks.ravel(), js.ravel()))
    noise = noise.reshape(len(rows), len(levels), *shape)
    errors = {t: [] for t in levels}
    for batch, (batch_noise,), real in ev.batches(rows, [noise]):
        for j, t in enumerate(levels):
            times = np.full((len(batch_noise), m), t, np.int32)
            slots = np.zeros((len(batch_noise), m, *latents.shape[1:]), np.float32)
            slots[:, 0] = batch_noise[:, j]  # each document's one image sits in slot 0
            err, used = ev.image_errors(batch, times, slots)
            errors[t] += list(err[:real][used[:real]])
    return {t: float(np.mean(v)) for t, v in errors.items()}


def captions_suite(ev) -> dict:
    from transfusion_jax.evaluation.cider import cider_scores

    examples = ev.examples()
    captions = write_captions(ev, np.stack([x.image for x in examples]))
    references = [x.captions for x in examples]
    scores = cider_scores(captions, references)
    ev.artifacts["captions"] = dict(
        pictures=[to_uint8(x.image) for x in examples],
        captions=captions,
        references=references,
        scores=list(scores),
    )
    own, other = caption_nll(ev, examples)
    return {
        "captions/cider": float(np.mean(scores)),
        "captions/nll": own,
        "captions/nll_other_image": other,
        "captions/image_information": other - own,
        "captions/images": len(examples),
    }


def caption_nll(ev, examples) -> tuple[float, float]:
    """Whether captioning reads the image: the negative log likelihood (nats per token) of each
    example's first caption (and its EOS) after its own image, clean, as captioning sees it,
    and after the next example's image. A model that ignores images scores the two alike;
    `image_information` is their difference."""
    special, limit = ev.tokenizer.special, ev.cfg.data.max_caption_tokens
    captions = [ev.tokenizer.encode(x.captions[0])[:limit] for x in examples]
    images = ev.model_images(np.stack([x.image for x in examples]))
    results = []
    for shift in (0, 1):
        shown = np.roll(images, -shift, axis=0)
        rows = [[image_first_document(z, c, special)] for z, c in zip(shown, captions, strict=True)]
        total = count = 0.0
        for batch, _, _ in ev.batches(rows, []):
            segments, image_ids = jnp.asarray(batch.segment_ids), jnp.asarray(batch.image_ids)
            weights = text_target_mask(segments, image_ids) & after_an_image(segments, image_ids)
            nll, n = ev.text_nll(batch, np.asarray(weights, np.float32))
            total, count = total + nll, count + n
        results.append(total / count)
    return results[0], results[1]


def images_suite(ev) -> dict:
    settings = ev.settings
    if not (settings.inception_weights or settings.clip_weights):
        raise ValueError(
            "--suite images needs --inception_weights (FID: pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth) and/or --clip_weights (CLIP score: a Hugging "
            "Face CLIP directory such as openai/clip-vit-large-patch14); the code never "
            "downloads them (config fields eval.inception_weights, eval.clip_weights)"
        )
    examples = ev.examples()
    if len(examples) < 2 and settings.inception_weights:
        raise ValueError(
            f"--num {settings.num_examples}: FID compares feature covariances, which need at "
            f"least 2 images (and hundreds to mean much)"
        )
    prompts = [x.captions[0] for x in examples]
    drawn = np.stack(draw(ev, prompts))
    ev.artifacts["images"] = dict(drawn=list(drawn), prompts=prompts)
    result = {"images/num": len(drawn)}
    if settings.inception_weights:
        from transfusion_jax.evaluation.frechet import fid_from_features
        from transfusion_jax.evaluation.inception import load_inception

        inception = load_inception(settings.inception_weights)
        real = np.stack([to_uint8(x.image) for x in examples])
        result["images/fid"] = fid_from_features(inception(drawn), inception(real))
    if settings.clip_weights:
        from transfusion_jax.evaluation.clip import load_clip

        result["images/clip_score"] = float(
            load_clip(settings.clip_weights).clip_score(drawn, prompts)
        )
    return result


SUITES = {
    "shapes": shapes_suite,
    "text": text_suite,
    "diffusion": diffusion_suite,
    "captions": captions_suite,
    "images": images_suite,
}
