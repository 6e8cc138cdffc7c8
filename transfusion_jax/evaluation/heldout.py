"""The examples evaluation reads: never trained on, the same every time.

- Image folders, TFDS datasets and text files: the records `data.split` holds out of training
  (`data.held_out_percent`, a fixed hash of each record's name), in the order of the source.
  Rows that share an image (Flickr8k: five captions per photo) become one example whose
  references are all its captions.
- The built-in shapes data: scenes drawn with seeds training never uses (`HELD_OUT_SEED`). The
  caption space is small, so most captions were seen in training; the scenes and drawings are
  new.
- Text: `eval.text_path` (a file the user holds out, all of it), else the held-out paragraphs of
  `data.text_path`, else the held-out captions (a run with no text corpus still gets a language
  score, on the caption language it learned).
"""

import dataclasses

import numpy as np

from transfusion_jax.data import shapes
from transfusion_jax.data.documents import Skipped, decode_image
from transfusion_jax.data.shapes import ShapesDataset
from transfusion_jax.data.sources import ImageFolderSource, TextSource, TfdsSource, as_text
from transfusion_jax.data.split import split

HELD_OUT_SEED = 987_654  # shapes scenes drawn with seeds training does not use


@dataclasses.dataclass
class Example:
    image: np.ndarray  # float32 [S, S, 3] in [-1, 1]
    captions: list[str]  # every reference caption of the image (the first is the prompt)


def image_source(cfg):
    """The source the captions and images suites read: eval.data_path (an ImageFolder), else
    the run's own data; None for the shapes data."""
    d, path = cfg.data, cfg.eval.data_path
    if path:
        return ImageFolderSource(path)
    if d.source == "imagefolder":
        return ImageFolderSource(d.path)
    if d.source == "tfds":
        return TfdsSource(
            d.tfds_name, d.tfds_split, d.tfds_data_dir, d.tfds_image_key, d.tfds_caption_key
        )
    if d.source == "shapes":
        return None
    raise ValueError(
        f"config field eval.data_path: the run trained on data.source={d.source!r}; give the "
        f"image folder to evaluate on (--data_path, e.g. the folder a latent cache was written "
        f"from: its held-out split is what the cache left out)"
    )


def held_out_examples(cfg, num: int) -> list[Example]:
    """Up to `num` held-out images with their captions, decoded at data.image_size."""
    source = image_source(cfg)
    size = cfg.data.image_size
    if source is None:
        data = ShapesDataset(size, seed=HELD_OUT_SEED + 2)
        items = (data[i] for i in range(num))
        return [Example(decode_image(item, size), ways_to_say(item["text"])) for item in items]
    held = split(source, cfg.data.held_out_percent, held=True)
    by_image: dict[str, Example] = {}
    for i in range(len(held)):
        record = held[i]
        key = record["origin"]
        if isinstance(source, ImageFolderSource):
            key = str(record["image"])  # the rows of one image share its captions
        captions = record["text"] if isinstance(record["text"], list) else [record["text"]]
        captions = [c.strip() for c in as_text(captions) if c.strip()]
        if key in by_image:
            by_image[key].captions.extend(captions)
            continue
        if len(by_image) == num or not captions:
            continue
        pixels = decode_image(record, size, cfg.data.max_image_pixels)
        if not isinstance(pixels, Skipped):
            by_image[key] = Example(pixels, captions)
    if not by_image:
        raise ValueError(
            f"config field data.held_out_percent: the held-out split ({cfg.data.held_out_percent}"
            f"% of {len(source)} records) holds no readable image to evaluate on"
        )
    return list(by_image.values())


def ways_to_say(caption: str) -> list[str]:
    """A shapes caption and its other order ("B below A" for "A above B"): both are right."""
    scene = shapes.parse_caption(caption)
    return list(dict.fromkeys([caption, shapes.caption(scene.swapped())]))


def held_out_texts(cfg, num: int) -> tuple[list[str], str]:
    """Up to `num` held-out text documents, and where they came from."""
    if cfg.eval.text_path:
        docs = TextSource(cfg.eval.text_path)
        return [docs[i]["text"] for i in range(min(num, len(docs)))], cfg.eval.text_path
    if cfg.data.text_path:
        held = split(TextSource(cfg.data.text_path), cfg.data.held_out_percent, held=True)
        if len(held):
            where = f"the held-out split of {cfg.data.text_path}"
            return [held[i]["text"] for i in range(min(num, len(held)))], where
    examples = held_out_examples(cfg, num)
    return [e.captions[0] for e in examples], "the held-out captions"
