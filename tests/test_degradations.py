"""Degradations: shapes, value ranges, mask semantics (1 = hidden), determinism, config validation."""
import pytest
import torch

from cgml_lightning.data.degradations import (
    Degradation, add_noise, apply_mask, box_mask, degrade, downsample, half_mask, rect_mask, sample_seed,
    stroke_mask, to_grayscale,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def rgb() -> torch.Tensor:
    return torch.rand(3, 32, 24, generator=gen(1))                    # [C, H, W], H != W on purpose


def test_half_mask_sides():
    m = half_mask((1, 5, 4), "bottom")
    assert m.shape == (1, 5, 4) and m[0, :2].sum() == 0 and m[0, 2:].all()
    assert half_mask((5, 4), "top")[0, :3].all() and half_mask((5, 4), "top")[0, 3:].sum() == 0
    assert half_mask((5, 4), "left")[0, :, :2].all() and half_mask((5, 4), "right")[0, :, 2:].all()
    assert ((half_mask((6, 6), "top") + half_mask((6, 6), "bottom")) == 1).all()
    with pytest.raises(ValueError, match="top, bottom, left or right"):
        half_mask((4, 4), "middle")


def test_box_mask_is_centred():
    m = box_mask((3, 8, 8), 0.5)
    assert m.shape == (1, 8, 8) and m.sum() == 16 and m[0, 2:6, 2:6].all()


@pytest.mark.parametrize("make", [rect_mask, stroke_mask])
def test_random_masks_binary_deterministic_and_varied(make):
    a, b, c = make((1, 32, 32), gen(0)), make((1, 32, 32), gen(0)), make((1, 32, 32), gen(1))
    assert a.shape == (1, 32, 32) and a.dtype == torch.float32
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    assert 0 < a.mean() < 0.9                                           # hides something, not everything
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_stroke_mask_non_square_and_large():
    m = stroke_mask((3, 20, 50), gen(2), count=4, width=0.2)
    assert m.shape == (1, 20, 50) and m.sum() > 0


def test_apply_mask_semantics(rgb):
    mask = rect_mask(rgb.shape, gen(0))
    x = apply_mask(rgb, mask)
    assert x.shape == (4, 32, 24)
    assert torch.equal(x[-1:], mask)                                    # last channel = mask, 1 = hidden
    visible = mask.expand_as(rgb) == 0
    assert torch.equal(x[:-1][visible], rgb[visible])                  # visible pixels preserved exactly
    assert (x[:-1][~visible] == 0).all()                               # hidden pixels zeroed
    batch = apply_mask(rgb.expand(5, -1, -1, -1), mask)                 # one mask broadcast over a batch
    assert batch.shape == (5, 4, 32, 24)


def test_grayscale_luminance(rgb):
    g = to_grayscale(rgb)
    assert g.shape == (1, 32, 24) and 0 <= g.min() and g.max() <= 1
    assert torch.allclose(to_grayscale(torch.ones(3, 2, 2)), torch.ones(1, 2, 2))     # weights sum to 1
    assert torch.allclose(to_grayscale(torch.tensor([1.0, 0, 0]).view(3, 1, 1)), torch.tensor(0.299))
    with pytest.raises(ValueError, match="RGB images .3 channels.; got 1 channel"):
        to_grayscale(torch.rand(1, 4, 4))


def test_noise_clamped_and_seeded(rgb):
    x = add_noise(rgb, 0.5, gen(3))
    assert x.shape == rgb.shape and x.min() >= 0 and x.max() <= 1 and not torch.equal(x, rgb)
    assert torch.equal(x, add_noise(rgb, 0.5, gen(3)))
    assert torch.equal(add_noise(rgb, 0.0, gen(3)), rgb)


@pytest.mark.parametrize("scale,mode", [(2, "nearest"), (4, "bilinear"), (4, "bicubic"), (3, "bilinear")])
def test_downsample_keeps_size(rgb, scale, mode):
    x = downsample(rgb, scale, mode)
    assert x.shape == rgb.shape and x.min() >= 0 and x.max() <= 1
    if mode == "nearest":                                               # blocks of scale x scale share one value
        assert torch.equal(x[:, ::scale, ::scale].repeat_interleave(scale, 1).repeat_interleave(scale, 2), x)
    constant = torch.full((1, 8, 8), 0.3)
    assert torch.allclose(downsample(constant, scale, mode), constant, atol=1e-6)
    assert downsample(rgb[None].expand(2, -1, -1, -1), scale, mode).shape == (2, 3, 32, 24)


def test_downsample_warns_where_the_scale_does_not_divide_the_size(rgb):
    import warnings

    with pytest.warns(UserWarning, match=r"data.scale=3 does not divide the image size 24x32 \(W x H\): .* 8x10, "
                                         r"factors of 3.00 x 3.20"):
        downsample(rgb, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        downsample(rgb, 4)


@pytest.mark.parametrize("task,kwargs,channels", [
    ("completion", {"mask": "half"}, 4), ("completion", {"mask": "box"}, 4), ("completion", {"mask": "rects"}, 4),
    ("completion", {"mask": "strokes"}, 4), ("completion", {"mask": "mixed"}, 4), ("denoise", {"noise_sigma": 0.3}, 3), ("superres", {"scale": 2}, 3),
    ("colorization", {}, 1), ("identity", {}, 3),
])
def test_degrade_dispatch(rgb, task, kwargs, channels):
    x = degrade(rgb, task, generator=gen(0), **kwargs)
    assert x.shape == (channels, 32, 24) and x.min() >= 0 and x.max() <= 1
    assert torch.equal(x, degrade(rgb, task, generator=gen(0), **kwargs))
    assert Degradation(task=task, **kwargs).mask_channel == (task == "completion")


def test_apply_is_per_sample_deterministic():
    y = torch.rand(6, 1, 16, 16, generator=gen(0))
    for d in (Degradation("completion", mask="strokes"), Degradation("completion", mask="rects"), Degradation("denoise")):
        x = d.apply(y, seed=5, stream=1)
        assert torch.equal(x, d.apply(y, seed=5, stream=1))                            # same every call
        assert not torch.equal(x, d.apply(y, seed=6, stream=1))                        # the seed matters
        assert not torch.equal(x, d.apply(y, seed=5, stream=2))                        # so does the stream
        assert not torch.equal(x[0], x[1]) if d.task == "denoise" else not torch.equal(x[0, -1], x[1, -1])
        for i in (0, 4):                                                              # sample i = its own generator
            assert torch.equal(x[i], d(y[i], gen(sample_seed(5, i, 1))))
        assert torch.equal(d.apply(y[3:], seed=5, stream=1, first_index=3), x[3:])    # independent of the others


def test_apply_deterministic_tasks_are_vectorised():
    y = torch.rand(3, 3, 8, 8, generator=gen(0))
    assert torch.equal(Degradation("colorization").apply(y), to_grayscale(y))
    assert torch.equal(Degradation("identity").apply(y), y)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        Degradation("identity").apply(y[0])


@pytest.mark.parametrize("kwargs,message", [
    ({"task": "inpaint"}, "data.task must be one of completion, denoise"),
    ({"mask": "circle"}, "data.mask must be one of half, box, rects, strokes, mixed"),
    ({"mask_side": "middle"}, "data.mask_side must be top, bottom"),
    ({"mask_size": 0}, r"data.mask_size must be in \(0, 1\]"),
    ({"mask_count": 0}, "data.mask_count must be >= 1"),
    ({"noise_sigma": -1}, "data.noise_sigma must be >= 0"),
    ({"scale": 1.5}, "data.scale must be an integer >= 1"),
    ({"upsample": "area"}, "data.upsample must be one of nearest, bilinear, bicubic"),
])
def test_bad_degradation_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Degradation(**kwargs)


def test_pop_from_leaves_other_keys():
    kwargs = {"task": "denoise", "noise_sigma": 0.1, "batch_size": 8}
    d = Degradation.pop_from(kwargs)
    assert (d.task, d.noise_sigma) == ("denoise", 0.1) and kwargs == {"batch_size": 8}


def test_mixed_mask_is_strokes_plus_rectangles():
    d = Degradation("completion", mask="mixed", mask_count=4, mask_size=0.3)
    mixed = d.make_mask((32, 32), gen(5))
    g = gen(5)                                                          # the same draws, in the same order
    strokes = stroke_mask((32, 32), g, 4, d.stroke_width)
    boxes = rect_mask((32, 32), g, 2, 0.3, 0.1)
    assert torch.equal(mixed, torch.maximum(strokes, boxes)) and (boxes > strokes).any()
    assert d.random and 0 < mixed.mean() < 0.9


def test_sample_seed_per_draw():
    """A training draw's seed depends on the epoch; the fixed seed (epoch None) is the seed of old."""
    assert sample_seed(3, 5, 1) == ((3 * 1_000_003 + 1) * 1_000_000_007 + 5) % (2**63 - 1)
    draws = {sample_seed(3, 5, 0, epoch) for epoch in range(50)}
    assert len(draws) == 50 and sample_seed(3, 5, 0) not in draws
    assert sample_seed(3, 5, 0, 2) == sample_seed(3, 5, 0, 2) != sample_seed(3, 6, 0, 2) != sample_seed(4, 5, 0, 2)


def test_apply_seeded_matches_per_sample_generators():
    y = torch.rand(4, 3, 12, 12, generator=gen(0))
    seeds = [11, 12, 11, 2**62 + 5]
    for d in (Degradation("completion", mask="strokes"), Degradation("denoise", noise_sigma=0.3)):
        x = d.apply_seeded(y, seeds)
        for i, s in enumerate(seeds):
            assert torch.equal(x[i], d(y[i], gen(s)))
        assert torch.equal(x, d.apply_seeded(y, torch.tensor(seeds)))
    assert torch.equal(Degradation("colorization").apply_seeded(y, None), to_grayscale(y))
    with pytest.raises(ValueError, match="3 seeds for 4 images"):
        Degradation("denoise").apply_seeded(y, [1, 2, 3])
