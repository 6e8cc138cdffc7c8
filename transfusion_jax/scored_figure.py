"""One picture of what a shapes model learned: prompts over their drawings and pictures over the
captions written for them, each framed green or red by the exact scorer's verdict.

The panels are the first `num` of each task, in the held-out order, so the picture is a sample of
the test and not a selection; the section titles give the rates over all of it.
"""

import textwrap

import numpy as np

RIGHT, WRONG = "#1a9641", "#d7191c"  # frame colours: scored exactly right / not
COLUMNS = 8
WRAP = 22  # characters per title line: a two-object caption takes two or three lines


TITLES = (
    "text -> image: each caption, and what the model drew for it",
    "image -> text: each picture, under the caption the model wrote",
)


def _panel(ax, image, text, correct) -> None:
    ax.imshow(np.asarray(image), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    color = RIGHT if correct else WRONG
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(3)
    mark = "\u2713" if correct else "\u2717"
    ax.set_title(f"{mark} {textwrap.fill(text, WRAP)}", fontsize=7, color=color)


def scored_figure(drawn, captioned, num: int = 16):
    """A matplotlib Figure of two sections, `drawn` (prompt, drawing) and `captioned` (picture,
    caption written), each a sequence of (image, text, correct): the first `num` panels of each,
    titled by the text and framed by the verdict."""
    from matplotlib.figure import Figure  # plotting is not needed to train

    sections = [list(drawn), list(captioned)]
    rows = [-(-min(num, len(panels)) // COLUMNS) for panels in sections]
    figure = Figure(figsize=(1.6 * COLUMNS, 2.1 * sum(rows) + 0.8), layout="constrained")
    subfigures = figure.subfigures(len(sections), 1, height_ratios=rows)
    for sub, count, title, panels in zip(subfigures, rows, TITLES, sections, strict=True):
        right = sum(bool(correct) for _, _, correct in panels)
        sub.suptitle(
            f"{title}: {right} of {len(panels)} exactly right (the first {min(num, len(panels))} "
            "shown)",
            fontsize=10,
        )
        axes = sub.subplots(count, COLUMNS, squeeze=False).ravel()
        for ax, panel in zip(axes, panels[:num], strict=False):
            _panel(ax, *panel)
        for ax in axes[len(panels[:num]) :]:
            ax.set_visible(False)
    return figure
