"""The reference model's procedural data: deterministic, captions that say what is drawn, drawn where said."""
import numpy as np

from postdiff_compile.lab.scenes import (BACKGROUNDS, COLOURS, PATTERNS, POSITIONS, SHAPES, Scene,
                                               SceneObject, make_batch, render, vocabulary)


def test_deterministic_from_the_seed():
    a, captions_a, _ = make_batch(3, 16)
    b, captions_b, _ = make_batch(3, 16)
    c, _, _ = make_batch(4, 16)
    assert np.array_equal(a, b) and captions_a == captions_b
    assert not np.array_equal(a, c)
    assert a.shape == (16, 3, 32, 32) and a.dtype == np.float32 and -1 <= a.min() and a.max() <= 1


def test_captions_cover_the_vocabulary_and_follow_reading_order():
    _, captions, scenes = make_batch(0, 400)
    vocab = set(vocabulary())
    used = {word for caption in captions for word in caption.replace(",", " ").split()}
    assert used == vocab
    for scene in scenes:
        cells = [POSITIONS.index(o.position) for o in scene.objects]
        assert cells == sorted(cells) and len(set(cells)) == len(cells)
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    assert {o.shape for s in scenes for o in s.objects} == set(SHAPES)
    assert {s.pattern for s in scenes} == set(PATTERNS) and {s.background for s in scenes} == set(BACKGROUNDS)


def _single(shape, colour, size, position, background="black"):
    return Scene((SceneObject(shape, colour, size, position),), "plain", background)


def test_objects_are_drawn_where_and_as_the_caption_says():
    image = render(_single("square", "red", "large", "top left"))
    red = np.array(COLOURS["red"])[:, None, None]
    is_red = np.abs(image - red).max(axis=0) < 0.05
    ys, xs = np.nonzero(is_red)
    assert len(ys) > 40 and ys.mean() < 32 / 3 and xs.mean() < 32 / 3
    assert np.allclose(image[:, 20:, 20:], np.array(BACKGROUNDS["black"])[:, None, None], atol=1e-6)
    assert _single("square", "red", "large", "top left").caption == "large red square top left, on black"


def test_shapes_and_sizes_differ_in_pixels():
    area = {shape: (np.abs(render(_single(shape, "white", "small", "center")) - 0.06).max(axis=0) > 0.3).sum()
            for shape in SHAPES}
    assert len(set(area.values())) == len(SHAPES)        # each shape covers a different set of pixels
    large = (np.abs(render(_single("circle", "white", "large", "center")) - 0.06).max(axis=0) > 0.3).sum()
    assert large > 2 * area["circle"]
