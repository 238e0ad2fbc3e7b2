"""ObjectShareTrainingSampler and ClassAwareObjectShareTrainingSampler (data/samplers.py): the repeat
factors by hand, the share they really sample, determinism per seed, DDP sharding, their
refusals, and the training loader using them."""

import itertools
import logging

import pytest
import torch
from detectron2.data.samplers import distributed_sampler

from balanced_rcnn.data.samplers import (
    CLASS_AWARE_OBJECT_SHARE_SAMPLER,
    OBJECT_SHARE_SAMPLER,
    build_object_share_sampler,
    class_aware_object_share_repeat_factors,
    object_share_repeat_factors,
)


def _dicts(num_with_objects, num_empty, num_crowd_only=0):
    obj = [{"annotations": [{"iscrowd": 0, "category_id": 0}]}] * num_with_objects
    crowd = [{"annotations": [{"iscrowd": 1, "category_id": 0}]}] * num_crowd_only
    return obj + [{"annotations": []}] * num_empty + crowd


def _cfg(share=0.5, seed=3, sampler=OBJECT_SHARE_SAMPLER):
    from balanced_rcnn import add_balanced_rcnn_config
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_balanced_rcnn_config(cfg)
    cfg.DATALOADER.SAMPLER_TRAIN = sampler
    cfg.DATALOADER.OBJECT_IMAGE_SHARE = share
    cfg.SEED = seed
    return cfg


@pytest.mark.core
def test_repeat_factors_by_hand():
    # 2 of 10 images hold objects; share 0.5: r = 0.5 * 10 / 2 = 2.5 and 0.5 * 10 / 8 = 0.625.
    factors = object_share_repeat_factors(_dicts(2, 8), 0.5)
    torch.testing.assert_close(factors, torch.tensor([2.5] * 2 + [0.625] * 8))
    assert factors.sum().item() == pytest.approx(10)  # an epoch keeps N images in expectation
    # Crowd-only images count as empty, as detectron2's FILTER_EMPTY_ANNOTATIONS does.
    factors = object_share_repeat_factors(_dicts(1, 2, num_crowd_only=1), 0.25)
    torch.testing.assert_close(factors, torch.tensor([1.0, 1.0, 1.0, 1.0]))
    # Only images with objects, or already at least the share: nothing to rebalance.
    torch.testing.assert_close(object_share_repeat_factors(_dicts(3, 0), 0.5), torch.ones(3))
    torch.testing.assert_close(object_share_repeat_factors(_dicts(9, 1), 0.5), torch.ones(10))


@pytest.mark.core
def test_sampled_share_and_determinism():
    dicts = _dicts(20, 80)
    stream = list(itertools.islice(iter(build_object_share_sampler(_cfg(), dicts)), 20000))
    share = sum(i < 20 for i in stream) / len(stream)
    assert share == pytest.approx(0.5, abs=0.02)  # the dataset's own share is 0.2
    again = list(itertools.islice(iter(build_object_share_sampler(_cfg(), dicts)), 20000))
    assert again == stream
    other = list(itertools.islice(iter(build_object_share_sampler(_cfg(seed=4), dicts)), 20000))
    assert other != stream


@pytest.mark.core
def test_ddp_workers_share_one_stream(monkeypatch):
    dicts = _dicts(5, 45)
    single = list(itertools.islice(iter(build_object_share_sampler(_cfg(), dicts)), 40))
    per_worker = []
    for rank in (0, 1):
        monkeypatch.setattr(distributed_sampler.comm, "get_rank", lambda r=rank: r)
        monkeypatch.setattr(distributed_sampler.comm, "get_world_size", lambda: 2)
        sampler = build_object_share_sampler(_cfg(), dicts)
        per_worker.append(list(itertools.islice(iter(sampler), 20)))
    # Worker r takes every second index of the one-process stream, from index r.
    assert per_worker[0] == single[0::2] and per_worker[1] == single[1::2]


@pytest.mark.core
@pytest.mark.parametrize("share", [0.0, -0.5, 1.5])
def test_share_outside_zero_one_is_refused(share):
    with pytest.raises(ValueError, match=rf"DATALOADER.OBJECT_IMAGE_SHARE must be in \(0, 1\], "
                                         rf"got {share}"):
        build_object_share_sampler(_cfg(share), _dicts(2, 8))


@pytest.mark.core
def test_no_image_with_objects_is_refused():
    with pytest.raises(ValueError, match="none of the 4 training images has a non-crowd "
                                         "annotation"):
        build_object_share_sampler(_cfg(), _dicts(0, 3, num_crowd_only=1))


@pytest.mark.core
def test_a_share_already_reached_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="balanced_rcnn.data.samplers"):
        build_object_share_sampler(_cfg(0.5), _dicts(9, 1))
    assert ("ObjectShareTrainingSampler: 9 of 10 training images hold objects (90.0%), sampled "
            "at 90.0% (DATALOADER.OBJECT_IMAGE_SHARE 0.5); repeat factor 1.00 for them, 1.00 "
            "for the others") in caplog.text


@pytest.mark.core
def test_other_samplers_are_left_to_detectron2():
    assert build_object_share_sampler(_cfg(sampler="TrainingSampler"), _dicts(2, 8)) is None


def test_training_loader_uses_it(tmp_path, monkeypatch, caplog, tiny_cfg):
    from training_harness.data import build_train_loader

    monkeypatch.setenv("BALANCED_RCNN_DATASETS", str(tmp_path))
    cfg = tiny_cfg
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False
    cfg.DATALOADER.SAMPLER_TRAIN = OBJECT_SHARE_SAMPLER
    cfg.DATALOADER.OBJECT_IMAGE_SHARE = 0.9
    cfg.SOLVER.IMS_PER_BATCH = 4
    with caplog.at_level(logging.INFO, logger="balanced_rcnn.data.samplers"):
        loader = build_train_loader(cfg)
    # synthetic_shapes_tiny_train: 16 images, 4 of them empty.
    assert ("12 of 16 training images hold objects (75.0%), sampled at 90.0% "
            "(DATALOADER.OBJECT_IMAGE_SHARE 0.9); repeat factor 1.20 for them, 0.40 for the "
            "others") in caplog.text
    batches = list(itertools.islice(iter(loader), 50))
    images = [image for batch in batches for image in batch]
    share = sum(len(image["instances"]) > 0 for image in images) / len(images)
    assert 0.82 < share < 0.97  # the dataset's own: 0.75


# -- ClassAwareObjectShareTrainingSampler --


def _long_tail_dicts():
    # 10 images: class 0 in images 0 and 1 (f = 0.2), class 1 in image 1 only (f = 0.1), one
    # crowd-only image (class 1, counted by RFS's frequencies as detectron2 counts it), 7 empty.
    ann = lambda c, crowd=0: {"iscrowd": crowd, "category_id": c}  # noqa: E731
    return ([{"annotations": [ann(0)]}, {"annotations": [ann(0), ann(1)]},
             {"annotations": [ann(1, crowd=1)]}] + [{"annotations": []}] * 7)


@pytest.mark.core
def test_class_aware_factors_by_hand():
    dicts = _long_tail_dicts()
    # f(0) = 0.2, f(1) = 0.2 (the crowd image counts, as in detectron2's RFS); t = 1, no sqrt:
    # b = [5, 5] for the object images (image 1's rarest class also has f = 0.2); B = 10.
    # share 0.8: B / (B + 8) = 0.56 < 0.8, so r_obj = b * 0.8 * 10 / 10 = 4, r_empty = 0.2 * 10 / 8.
    factors = class_aware_object_share_repeat_factors(dicts, 0.8, 1.0, sqrt=False)
    torch.testing.assert_close(factors, torch.tensor([4.0, 4.0] + [0.25] * 8))
    assert factors.sum().item() == pytest.approx(10)
    # share 0.5: B / (B + 8) >= 0.5: RFS's factors as they are, every empty image 1.
    torch.testing.assert_close(class_aware_object_share_repeat_factors(dicts, 0.5, 1.0, False),
                               torch.tensor([5.0, 5.0] + [1.0] * 8))


@pytest.mark.core
def test_class_aware_factors_follow_the_rarest_class():
    # class 0 in 4 images (f = 0.4), class 1 in 1 (f = 0.1), 5 empty; t = 1 with sqrt:
    # b = sqrt(2.5) for images 0-2 and sqrt(10) for image 3 (its rarest class); B = 3 sqrt(2.5)
    # + sqrt(10). share 0.9: r_i = b_i * 9 / B, r_empty = 0.1 * 10 / 6.
    ann = lambda c: {"iscrowd": 0, "category_id": c}  # noqa: E731
    dicts = ([{"annotations": [ann(0)]}] * 3 + [{"annotations": [ann(0), ann(1)]}]
             + [{"annotations": []}] * 6)
    factors = class_aware_object_share_repeat_factors(dicts, 0.9, 1.0, sqrt=True)
    b = torch.tensor([2.5 ** 0.5] * 3 + [10 ** 0.5])
    expected = torch.cat([b * 9 / b.sum(), torch.full((6,), 1 / 6)])
    torch.testing.assert_close(factors, expected)
    # Image 3 is drawn twice as often as the others: sqrt(10 / 2.5).
    assert (factors[3] / factors[0]).item() == pytest.approx(2.0)
    # A threshold under every class frequency: every b_i = 1, the plain object share.
    torch.testing.assert_close(class_aware_object_share_repeat_factors(dicts, 0.9, 0.01),
                               object_share_repeat_factors(dicts, 0.9))


@pytest.mark.core
def test_class_aware_sampler_draws_the_share_and_the_classes():
    dicts = _long_tail_dicts() * 10  # 100 images, the same frequencies
    cfg = _cfg(0.8, sampler=CLASS_AWARE_OBJECT_SHARE_SAMPLER)
    cfg.DATALOADER.REPEAT_THRESHOLD, cfg.DATALOADER.REPEAT_SQRT = 1.0, False
    stream = list(itertools.islice(iter(build_object_share_sampler(cfg, dicts)), 20000))
    drawn = [dicts[i] for i in stream]
    share = sum(bool(d["annotations"]) and d["annotations"][0]["iscrowd"] == 0
                for d in drawn) / len(drawn)
    assert share == pytest.approx(0.8, abs=0.02)
    again = list(itertools.islice(iter(build_object_share_sampler(cfg, dicts)), 20000))
    assert again == stream


@pytest.mark.core
def test_class_aware_sampler_refuses_a_zero_threshold():
    cfg = _cfg(sampler=CLASS_AWARE_OBJECT_SHARE_SAMPLER)
    cfg.DATALOADER.REPEAT_THRESHOLD = 0.0  # detectron2's default
    with pytest.raises(ValueError, match=r"ClassAwareObjectShareTrainingSampler needs "
                                         r"DATALOADER.REPEAT_THRESHOLD > 0, got 0.0"):
        build_object_share_sampler(cfg, _long_tail_dicts())
