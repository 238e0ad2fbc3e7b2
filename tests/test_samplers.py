"""ObjectShareTrainingSampler (data/samplers.py): the repeat factors by hand, the share it really
samples, determinism per seed, DDP sharding, its refusals, and the training loader using it."""

import itertools
import logging

import pytest
import torch
from detectron2.data.samplers import distributed_sampler

from balanced_rcnn.data.samplers import (
    OBJECT_SHARE_SAMPLER,
    build_object_share_sampler,
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


def test_sampled_share_and_determinism():
    dicts = _dicts(20, 80)
    stream = list(itertools.islice(iter(build_object_share_sampler(_cfg(), dicts)), 20000))
    share = sum(i < 20 for i in stream) / len(stream)
    assert share == pytest.approx(0.5, abs=0.02)  # the dataset's own share is 0.2
    again = list(itertools.islice(iter(build_object_share_sampler(_cfg(), dicts)), 20000))
    assert again == stream
    other = list(itertools.islice(iter(build_object_share_sampler(_cfg(seed=4), dicts)), 20000))
    assert other != stream


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


@pytest.mark.parametrize("share", [0.0, -0.5, 1.5])
def test_share_outside_zero_one_is_refused(share):
    with pytest.raises(ValueError, match=rf"DATALOADER.OBJECT_IMAGE_SHARE must be in \(0, 1\], "
                                         rf"got {share}"):
        build_object_share_sampler(_cfg(share), _dicts(2, 8))


def test_no_image_with_objects_is_refused():
    with pytest.raises(ValueError, match="none of the 4 training images has a non-crowd "
                                         "annotation"):
        build_object_share_sampler(_cfg(), _dicts(0, 3, num_crowd_only=1))


def test_a_share_already_reached_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="balanced_rcnn.data.samplers"):
        build_object_share_sampler(_cfg(0.5), _dicts(9, 1))
    assert ("9 of 10 training images hold objects (90.0%), at least "
            "DATALOADER.OBJECT_IMAGE_SHARE 0.5: sampled as they are") in caplog.text


def test_other_samplers_are_left_to_detectron2():
    assert build_object_share_sampler(_cfg(sampler="TrainingSampler"), _dicts(2, 8)) is None


def test_training_loader_uses_it(tmp_path, monkeypatch, caplog, tiny_cfg):
    from balanced_rcnn.data import build_train_loader

    monkeypatch.setenv("BALANCED_RCNN_DATASETS", str(tmp_path))
    cfg = tiny_cfg
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False
    cfg.DATALOADER.SAMPLER_TRAIN = OBJECT_SHARE_SAMPLER
    cfg.DATALOADER.OBJECT_IMAGE_SHARE = 0.9
    cfg.SOLVER.IMS_PER_BATCH = 4
    with caplog.at_level(logging.INFO, logger="balanced_rcnn.data.samplers"):
        loader = build_train_loader(cfg)
    # synthetic_shapes_tiny_train: 16 images, 4 of them empty.
    assert "12 of 16 training images hold objects (75.0%); sampled at 90%" in caplog.text
    batches = list(itertools.islice(iter(loader), 50))
    images = [image for batch in batches for image in batch]
    share = sum(len(image["instances"]) > 0 for image in images) / len(images)
    assert 0.82 < share < 0.97  # the dataset's own: 0.75
