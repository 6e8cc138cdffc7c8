"""The examples evaluation reads: never trained on, the same every time.

- `eval.data_path` / `eval.text_path`: a folder or text file the user keeps out of training (a
  validation set), read whole.
- Otherwise the run's own image folder, TFDS dataset or text corpus: the records `data.split`
  holds out of training (`data.held_out_percent`, a fixed hash of each record's name), in the
  order of the source. A run trained on a latent cache reads the held-out split of the source the
  cache was written from (recorded beside it by `data.cache`). Rows that share an image (Flickr8k:
  five captions per photo) become one example whose references are all its captions.
- The built-in shapes data: scenes drawn with seeds training never uses (`HELD_OUT_SEED`). The
  caption space is small, so most captions were seen in training; the scenes and drawings are
  new. Both orders of a two-object caption are references ("A above B", "B below A").
- Text without `eval.text_path` or a text corpus: the held-out captions (a run with no text
  corpus still gets a language score, on the caption language it learned).
"""

import dataclasses

import ml_collections
import numpy as np

from transfusion_jax.data import shapes
from transfusion_jax.data.documents import Skipped, decode_image
from transfusion_jax.data.shapes import ShapesDataset
from transfusion_jax.data.sources import (
    ImageFolderSource,
    TextSource,
    TfdsSource,
    as_text,
    read_split_record,
    split_record_path,
)
from transfusion_jax.data.split import Subset, split

HELD_OUT_SEED = 987_654  # shapes scenes drawn with seeds training does not use


@dataclasses.dataclass
class Example:
    image: np.ndarray  # float32 [S, S, 3] in [-1, 1]
    captions: list[str]  # every reference caption of the image (the first is the prompt)


def _open(d):
    if d.source == "imagefolder":
        return ImageFolderSource(d.path)
    return TfdsSource(
        d.tfds_name, d.tfds_split, d.tfds_data_dir, d.tfds_image_key, d.tfds_caption_key
    )


def image_records(cfg):
    """(records to evaluate on, what they are) for the captions, images and diffusion suites;
    None for the shapes data."""
    d, path = cfg.data, cfg.eval.data_path
    if path:
        source = ImageFolderSource(path, field="eval.data_path")
        return Subset(source, range(len(source))), f"{path} (all of it)"
    if d.source == "shapes":
        return None
    if d.source == "cached":
        written_from = read_split_record(d.path)
        if written_from is None:
            raise ValueError(
                f"config field eval.data_path: the cache {d.path} was written before held-out "
                f"splits (no {split_record_path(d.path).name}), so it may hold every record; give "
                f"--data_path an image folder the run never trained on, or write the cache again"
            )
        d = ml_collections.ConfigDict(written_from)
    elif d.source not in ("imagefolder", "tfds"):
        raise ValueError(
            f"config field eval.data_path: the run trained on data.source={d.source!r}, which "
            f"holds no images to evaluate on; give --data_path an image folder"
        )
    if d.held_out_percent <= 0:
        raise ValueError(
            "config field data.held_out_percent: 0, so this run held nothing out of training "
            "(it predates held-out splits, or was told so); give --data_path an image folder "
            "the run never trained on"
        )
    where = f"the held-out {d.held_out_percent}% of {d.path or d.tfds_name}"
    return split(_open(d), d.held_out_percent, held=True), where


def held_out_examples(cfg, num: int) -> list[Example]:
    """Up to `num` held-out images with their captions, decoded at data.image_size."""
    found = image_records(cfg)
    size = cfg.data.image_size
    if found is None:
        data = ShapesDataset(size, seed=HELD_OUT_SEED + 2)
        items = (data[i] for i in range(num))
        return [Example(decode_image(item, size), ways_to_say(item["text"])) for item in items]
    records, where = found
    by_image: dict[str, Example] = {}
    for i in range(len(records)):
        record = records[i]
        key = str(record["origin"])
        if isinstance(records.source, ImageFolderSource):
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
            f"config field data.held_out_percent: {where} holds no readable image; raise it, "
            f"or give --data_path an image folder the run never trained on"
        )
    return list(by_image.values())


def ways_to_say(caption: str) -> list[str]:
    """A shapes caption and its other order ("B below A" for "A above B"): both are right."""
    scene = shapes.parse_caption(caption)
    return list(dict.fromkeys([caption, shapes.caption(scene.swapped())]))


def held_out_texts(cfg, num: int) -> tuple[list[str], str]:
    """Up to `num` held-out text documents, and where they came from."""
    data = cfg.data
    if cfg.eval.text_path:
        docs = TextSource(cfg.eval.text_path, field="eval.text_path")
        return [docs[i]["text"] for i in range(min(num, len(docs)))], cfg.eval.text_path
    text_path = data.text_path
    if text_path:
        if data.held_out_percent <= 0:
            raise ValueError(
                f"config field data.held_out_percent: 0, so this run held none of "
                f"{text_path} out of training; give --text_path a text file it never saw"
            )
        held = split(TextSource(text_path), data.held_out_percent, held=True)
        if len(held):
            where = f"the held-out {data.held_out_percent}% of {text_path}"
            return [held[i]["text"] for i in range(min(num, len(held)))], where
    if data.source in ("text", "synthetic"):
        raise ValueError(
            f"config field eval.text_path: the run trained on data.source={data.source!r} and "
            f"holds no text out; give --text_path a text file it never saw"
        )
    examples = held_out_examples(cfg, num)
    return [e.captions[0] for e in examples], "the held-out captions"


def why_not(cfg, suite: str) -> str | None:
    """Why `suite` has no held-out data to read for this run (None: it has), from the config
    alone: the trainer checks its suites before step 1."""
    data, settings = cfg.data, cfg.eval
    if cfg.model.get("image_repr", "continuous") == "discrete" and suite == "diffusion":
        return "a run with model.image_repr='discrete' has no diffusion loss"
    if suite == "text":
        if settings.text_path:
            return None
        if data.text_path:
            return None if data.held_out_percent > 0 else "data.held_out_percent is 0"
        if why_not(cfg, "captions") is None:  # the held-out captions serve as the text
            return None
        return f"data.source={data.source!r} holds no text out of training; set eval.text_path"
    if suite in ("diffusion", "captions", "images"):
        if settings.data_path or data.source == "shapes":
            return None
        if data.source == "cached" and read_split_record(data.path) is None:
            return f"the cache {data.path} records no held-out split; set eval.data_path"
        if data.source not in ("imagefolder", "tfds", "cached"):
            return (
                f"data.source={data.source!r} holds no images out of training; set eval.data_path"
            )
        return None if data.held_out_percent > 0 else "data.held_out_percent is 0"
    return None
