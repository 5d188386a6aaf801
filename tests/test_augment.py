"""Augmentation presets: views, shapes, sizing for small images, errors, use in a DataLoader."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from s2bnn.config import AugmentConfig
from s2bnn.data import (
    PRESETS,
    build_dataset,
    build_eval_transform,
    build_train_transform,
    preset_params,
)
from s2bnn.errors import DataError


def grey28() -> torch.Tensor:
    return build_dataset("synthetic:1:28:20:4").images[0]


def rgb32() -> torch.Tensor:
    return build_dataset("synthetic:3:32:20:4").images[0]


def ops_of(transform) -> list[type]:
    """Types of every op in a view pipeline, looking inside RandomApply."""
    found = []
    for t in transform.transforms[0].transforms:
        found.append(type(t))
        if isinstance(t, v2.RandomApply):
            found += [type(x) for x in t.transforms]
    return found


@pytest.mark.parametrize("preset", ["mocov2", "s2bnn_lite", "multicrop"])
@pytest.mark.parametrize("image,size,chans", [(grey28, 28, 1), (rgb32, 32, 3)])
def test_views_differ_and_have_shape(preset, image, size, chans):
    torch.manual_seed(0)
    tf = build_train_transform(preset, size, chans, num_views=2)
    img = image()
    views = tf(img)
    assert len(views) == 2
    for v in views:
        assert v.shape == (chans, size, size) and v.dtype == torch.float32
        assert torch.isfinite(v).all()
    assert not torch.allclose(views[0], views[1])
    assert img.dtype == torch.uint8  # the stored image is not modified in place


def test_same_seed_same_views():
    tf = build_train_transform("mocov2", 32, 3)
    img = rgb32()
    torch.manual_seed(5)
    a = tf(img)
    torch.manual_seed(5)
    b = tf(img)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_sizing_small_and_large():
    small = preset_params("mocov2", 28)
    assert small["crop_scale"][0] > 0.2 and small["blur_kernel"] == 3
    assert small["blur_sigma"][1] < 2.0
    large = preset_params("s2bnn_lite", 224)
    assert large["crop_scale"] == (0.2, 1.0) and large["blur_kernel"] == 23
    assert large["blur_sigma"] == (0.1, 2.0)
    assert preset_params("multicrop", 224)["local_size"] == 96
    assert preset_params("multicrop", 224)["local_crop_scale"] == (0.05, 0.4)
    assert preset_params("multicrop", 28)["local_size"] == 12
    tf = build_train_transform("mocov2", 28, 1)
    crop = tf.transforms[0].transforms[0]
    assert isinstance(crop, v2.RandomResizedCrop) and crop.scale == small["crop_scale"]


def test_colour_auto_off_for_grey_on_for_rgb():
    grey = ops_of(build_train_transform("mocov2", 28, 1))
    assert v2.ColorJitter not in grey and v2.RandomGrayscale not in grey
    assert v2.GaussianBlur in grey
    rgb = ops_of(build_train_transform("mocov2", 32, 3))
    assert v2.ColorJitter in rgb and v2.RandomGrayscale in rgb
    forced = build_train_transform("mocov2", 28, 1, color=True)
    assert v2.ColorJitter in ops_of(forced)
    assert forced(grey28())[0].shape == (1, 28, 28)  # brightness/contrast only on grey
    assert v2.GaussianBlur not in ops_of(build_train_transform("mocov2", 28, 1, blur=False))


def test_lite_is_weaker_than_mocov2():
    def probs(preset):
        pipeline = build_train_transform(preset, 32, 3).transforms[0].transforms
        applies = [t for t in pipeline if isinstance(t, v2.RandomApply)]
        return {type(a.transforms[0]): a.p for a in applies}

    moco, lite = probs("mocov2"), probs("s2bnn_lite")
    assert moco == {v2.ColorJitter: 0.8, v2.GaussianBlur: 0.5}
    assert lite == {v2.ColorJitter: 0.6, v2.GaussianBlur: 0.2}


def test_multicrop_global_and_local_views():
    tf = build_train_transform("multicrop", 28, 1, num_views=2, local_crops=3)
    views = tf(grey28())
    assert [tuple(v.shape) for v in views] == [(1, 28, 28)] * 2 + [(1, 12, 12)] * 3
    tf = build_train_transform("multicrop", 32, 3, local_crops=2, local_size=16,
                               local_crop_scale=[0.1, 0.3])
    assert [v.shape[-1] for v in tf(rgb32())] == [32, 32, 16, 16]


def test_local_crops_with_the_mocov2_and_lite_presets():
    """Small crops are not DINO's alone: with mocov2 or s2bnn_lite they follow the preset's
    jitter and blur, after the preset's own (identical) full views."""
    from s2bnn.data.augment import view_specs

    for preset, blur_p in (("mocov2", 0.5), ("s2bnn_lite", 0.2)):
        specs = view_specs(preset, 28, 1, num_views=2, local_crops=3)
        assert [s["size"] for s in specs] == [28, 28, 12, 12, 12]
        assert all(s["blur_p"] == blur_p and "solarize_p" not in s for s in specs)
        assert specs[2]["scale"] == preset_params(preset, 28)["local_crop_scale"]
        assert specs[0]["scale"] == preset_params(preset, 28)["crop_scale"]
    views = build_train_transform("mocov2", 28, 1, num_views=2, local_crops=2)(grey28())
    assert [tuple(v.shape) for v in views] == [(1, 28, 28)] * 2 + [(1, 12, 12)] * 2


def test_eval_preset_and_transform():
    img = rgb32()
    views = build_train_transform("eval", 32, 3, num_views=2)(img)
    assert torch.equal(views[0], views[1])
    out = build_eval_transform(32, 3, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(img)
    assert torch.allclose(out, img.float() / 255 * 2 - 1, atol=1e-6)
    big = build_eval_transform(224, 3)(torch.zeros(3, 300, 400, dtype=torch.uint8))
    assert big.shape == (3, 224, 224)
    up = build_eval_transform(28, 1)(torch.zeros(1, 20, 24, dtype=torch.uint8))
    assert up.shape == (1, 28, 28)


def test_large_images_are_cropped_to_size():
    tf = build_train_transform("s2bnn_lite", 64, 3)
    img = torch.randint(0, 256, (3, 90, 120), dtype=torch.uint8)
    assert all(v.shape == (3, 64, 64) for v in tf(img))


def test_accepts_augment_config_fields():
    from dataclasses import asdict

    cfg = AugmentConfig(preset="mocov2", crop_scale=[0.5, 1.0])
    tf = build_train_transform(**asdict(cfg), image_size=28, in_chans=1, mean=[0.3], std=[0.3])
    assert tf.transforms[0].transforms[0].scale == (0.5, 1.0)
    assert len(tf(grey28())) == cfg.num_views


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(preset="simclr"), "mocov2, s2bnn_lite, eval, multicrop"),
        (dict(preset="eval", local_crops=2), "needs a training preset"),
        (dict(preset="mocov2", crop_scale=[0.8, 0.2]), "crop_scale"),
        (dict(preset="mocov2", crop_scale=[0.2]), "crop_scale"),
        (dict(preset="mocov2", num_views=0), "num_views"),
        (dict(preset="mocov2", mean=[0.1, 0.2]), "one per channel"),
        (dict(preset="mocov2", in_chans=4), "channels"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = dict(image_size=28, in_chans=1) | kwargs
    with pytest.raises(DataError, match=match) as err:
        build_train_transform(**args)
    assert "\n" not in str(err.value)


def test_presets_listed():
    assert set(PRESETS) == {"mocov2", "s2bnn_lite", "eval", "multicrop"}


def test_in_a_dataloader_and_picklable():
    tf = build_train_transform("s2bnn_lite", 16, 1)
    pickle.loads(pickle.dumps(tf))  # spawn-started workers need this
    ds = build_dataset("synthetic:1:16:12:3", transform=tf)
    views, labels = next(iter(DataLoader(ds, batch_size=4)))
    assert len(views) == 2 and views[0].shape == (4, 1, 16, 16) and labels.shape == (4,)


# --------------------------------------------------------------------------- batched twin
@pytest.mark.parametrize("preset,chans,size", [("mocov2", 3, 32), ("s2bnn_lite", 1, 28),
                                                ("multicrop", 3, 32), ("eval", 1, 28)])
def test_batch_transform_shapes_and_views(preset, chans, size):
    from s2bnn.data import build_batch_train_transform

    images = build_dataset(f"synthetic:{chans}:{size}:16:4").images
    kw = {"local_crops": 2} if preset == "multicrop" else {}
    torch.manual_seed(0)
    views = build_batch_train_transform(preset, size, chans, **kw)(images)
    assert len(views) == (4 if preset == "multicrop" else 2)
    assert views[0].shape == (16, chans, size, size) and views[0].dtype == torch.float32
    assert all(torch.isfinite(v).all() for v in views)
    if preset == "multicrop":
        assert views[2].shape[-1] == preset_params("multicrop", size)["local_size"]
    if preset == "eval":
        assert torch.equal(views[0], views[1])
    else:
        assert not torch.allclose(views[0], views[1])
        # per-image randomness: the images of one view are not all cropped alike
        assert not torch.allclose(views[0][0], views[0][1])


def test_batch_crop_boxes_follow_scale():
    from s2bnn.data.batch_augment import crop_boxes

    boxes = crop_boxes(2000, 28, 28, (0.35, 1.0), "cpu")
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    frac = w * h / (28 * 28)
    assert boxes.min() >= 0 and boxes[:, 2].max() <= 28 and boxes[:, 3].max() <= 28
    assert frac.min() > 0.3 and frac.max() <= 1.0 and frac.std() > 0.1


def test_batch_eval_matches_per_sample_normalisation():
    from s2bnn.data import build_batch_train_transform

    images = build_dataset("synthetic:1:28:8:4").images
    batch = build_batch_train_transform("eval", 28, 1, mean=[0.5], std=[0.25])(images)[0]
    single = torch.stack([build_eval_transform(28, 1, [0.5], [0.25])(im) for im in images])
    assert torch.allclose(batch, single, atol=1e-5)


def test_batch_identity_when_nothing_random():
    """Full-size crop, no colour, no blur: only the flip remains, so views equal the image."""
    from s2bnn.data import build_batch_train_transform

    images = build_dataset("synthetic:1:16:32:4").images
    aug = build_batch_train_transform("mocov2", 16, 1, crop_scale=[1.0, 1.0], blur=False,
                                      mean=[0.0], std=[1.0])
    out = aug(images)[0]
    ref = images.float() / 255
    same = [torch.allclose(o, r, atol=1e-5) or torch.allclose(o, r.flip(-1), atol=1e-5)
            for o, r in zip(out, ref)]
    assert all(same)
