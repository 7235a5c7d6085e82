"""The border colour (the pad colour of `resize_crop` and the fill of rotations) has one
definition: `preprocessing.border_colour` (numpy, cached crops) and `augment.border_colour`
(jnp, inside the jitted step) must give the same colour for the same crop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sipak_jax import augment, preprocessing


def _ring(crop):
    return np.concatenate([crop[0], crop[-1], crop[1:-1, 0], crop[1:-1, -1]], axis=0)


# (H, W): square, wide, tall, a single row or column, a single pixel.
SHAPES = [(7, 7), (5, 12), (13, 4), (1, 9), (9, 1), (1, 1), (2, 2), (31, 20)]


@pytest.mark.parametrize("shape", SHAPES)
def test_numpy_and_jax_border_colours_are_equal_on_random_crops(shape):
    rng = np.random.default_rng(sum(shape))
    jitted = jax.jit(augment.border_colour)
    for _ in range(5):
        crop = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        ring = _ring(crop)
        assert len(ring) % 2 == 0  # always even: the median has two middle values
        want = np.sort(ring, axis=0)[(len(ring) - 1) // 2]  # the lower one
        ours = preprocessing.border_colour(crop)
        np.testing.assert_array_equal(ours, want)
        np.testing.assert_array_equal(np.asarray(augment.border_colour(jnp.asarray(crop))), ours)
        np.testing.assert_array_equal(np.asarray(jitted(jnp.asarray(crop))), ours)


def test_the_two_middle_values_differ_and_the_lower_one_is_taken():
    """A ring of 4 pixels per channel (2 x 2 crop) whose two middle values are far apart: an
    averaged median (125) would be a colour that is not in the ring."""
    crop = np.array([[[0, 0, 0], [100, 100, 100]], [[150, 150, 150], [255, 255, 255]]], np.uint8)
    np.testing.assert_array_equal(preprocessing.border_colour(crop), (100, 100, 100))
    np.testing.assert_array_equal(np.asarray(augment.border_colour(jnp.asarray(crop))), (100,) * 3)
