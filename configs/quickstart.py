"""The main job's config: `tiny` tuned to show learning within about 15 CPU minutes.

tiny's model (4 layers of width 128, U-Net patch layers; 1.5M parameters at these sizes), trained
where it learns fastest per CPU second (measured in the issue notes and the README's quickstart
section):
- 16x16 images in 2x2 patches: still 64 positions per image, but the U-Net works on a quarter of
  the pixels, so a step takes about 0.4 of tiny's; shapes are 4 and 6 pixels wide, which the exact
  scorer reads back from every rendered scene;
- a token per caption word (the `words` tokenizer over the shapes vocabulary, bytes for anything
  else): a caption is 4-10 tokens instead of 18-56 bytes, so two documents fit rows of 160
  positions instead of 256 and a step costs 0.6 of the bytes run's, and each attribute is one
  position for the images and captions to bind to;
- the flow (rectified-flow) objective, which drew clean shapes sooner than epsilon at equal steps;
- half of the documents image-first (the paper: 20%), so captioning sees as many examples as
  generation and the captions read the image;
- 4000 steps.
`configs/tiny.py` keeps the richer 32 px scenes, byte-level text and the paper's recipe.
"""

from transfusion_jax.config import load_config
from transfusion_jax.data.shapes import caption_words


def get_config(arg=None):
    del arg
    c = load_config("tiny")
    c.data.image_size = 16
    c.image.patch_size = 2
    c.data.tokenizer = "words:" + ",".join(caption_words())
    c.data.seq_len = 160
    c.diffusion.objective = "flow"
    c.data.caption_first_prob = 0.5
    c.train.num_steps = 4000
    c.train.checkpoint_every = 1000
    c.train.eval_every = 1000
    return c
