"""The scored figure shows the given images in order, each under its own text and framed by its
own verdict, and counts the verdicts over the whole test, not only the panels shown."""

import textwrap

import numpy as np
from matplotlib.colors import to_hex
from PIL import Image

from transfusion_jax.data import shapes
from transfusion_jax.paths import save_figure
from transfusion_jax.scored_figure import RIGHT, WRAP, WRONG, scored_figure


def _panels(count, seed, right_every):
    scenes = [shapes.scene_for_index(i, seed) for i in range(count)]
    return [
        (shapes.render(scene, 16), shapes.caption(scene), i % right_every == 0)
        for i, scene in enumerate(scenes)
    ]


def _shown_axes(subfigure):
    return [ax for ax in subfigure.axes if ax.get_visible()]


def test_panels_are_the_first_num_in_order_with_their_text_and_verdict():
    drawn, captioned = _panels(20, seed=1, right_every=3), _panels(5, seed=2, right_every=2)
    figure = scored_figure(drawn, captioned, num=16)
    top, bottom = figure.subfigs
    for subfigure, panels, shown in ((top, drawn, 16), (bottom, captioned, 5)):
        axes = _shown_axes(subfigure)
        assert len(axes) == shown  # the spare cells of the last row are hidden
        for ax, (image, text, correct) in zip(axes, panels[:shown], strict=True):
            np.testing.assert_array_equal(ax.images[0].get_array(), image)
            mark, color = ("\u2713", RIGHT) if correct else ("\u2717", WRONG)
            assert ax.get_title() == f"{mark} {textwrap.fill(text, WRAP)}"
            assert {to_hex(s.get_edgecolor()) for s in ax.spines.values()} == {color}
    # 7 of 20 drawings right (indices 0, 3, ..., 18), 3 of 5 captions (0, 2, 4)
    assert ": 7 of 20 exactly right (the first 16 shown)" in top.get_suptitle()
    assert ": 3 of 5 exactly right (the first 5 shown)" in bottom.get_suptitle()


def test_the_figure_is_written_as_a_png_of_its_size(tmp_path):
    figure = scored_figure(_panels(3, 1, 2), _panels(9, 2, 2), num=16)
    out = tmp_path / "samples" / "scored.png"  # the folder is made
    save_figure(figure, out, dpi=50)
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == tuple(round(50 * v) for v in figure.get_size_inches())
