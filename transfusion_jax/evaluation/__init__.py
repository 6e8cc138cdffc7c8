"""Evaluation: metrics and the suites that compute them for a trained run."""

# The one number of each suite that says most (what plots and summaries show by default); the
# suites write more (per aspect, per noise level, counts).
HEADLINE_METRICS = (
    "shapes/text_to_image_accuracy",
    "shapes/captioning_accuracy",
    "text/bits_per_byte",
    "text/perplexity",
    "diffusion/val_loss",
    "captions/cider",
    "images/fid",
    "images/clip_score",
)
# Sizes rather than scores: plots leave them out unless asked for every key.
COUNT_METRICS = ("text/tokens", "captions/images", "images/num")
