"""The monitor's detection count (health/detection_check.py): a DatasetEvaluator run by
detectron2's inference_on_dataset, counting hand-made scores exactly."""

from types import SimpleNamespace

import pytest
import torch
from detectron2.structures import Instances
from torch import nn
from training_harness.health.detection_check import (
    DetectionCounter,
    count_detections,
    detections_by_image_kind,
)

SCORES = [[0.9, 0.3, 0.04], [], [0.6]]  # three images


def _outputs(scores):
    return [{"instances": Instances((8, 8), scores=torch.tensor(s))} for s in scores]


def test_counter_counts_per_threshold_and_images_with_a_detection():
    counter = DetectionCounter(score_thresholds=(0.5,), main_threshold=0.05)
    assert counter.thresholds == [0.05, 0.5]
    counter.process([{}] * 3, _outputs(SCORES))
    # at 0.05: 2 + 0 + 1; at 0.5: 1 + 0 + 1; images with one at 0.05: the first and the last
    assert counter.evaluate() == {"images": 3.0, "detections": [3.0, 2.0],
                                  "images_with_detections": 2.0, "empty_images": 0.0,
                                  "detections_on_empty_images": 0.0}
    counter.reset()
    assert counter.evaluate() == {"images": 0.0, "detections": [0.0, 0.0],
                                  "images_with_detections": 0.0, "empty_images": 0.0,
                                  "detections_on_empty_images": 0.0}


def test_counter_counts_the_images_without_objects_apart():
    # Images 10 and 12 hold no object: 2 detections at 0.05 on image 10, 1 on image 12.
    counter = DetectionCounter(score_thresholds=(0.5,), main_threshold=0.05,
                               empty_image_ids={10, 12})
    counter.process([{"image_id": 10}, {"image_id": 11}, {"image_id": 12}], _outputs(SCORES))
    counts = counter.evaluate()
    assert (counts["empty_images"], counts["detections_on_empty_images"]) == (2.0, 3.0)
    # 3 detections at 0.05 in all, all on the 2 empty images; none on the object image.
    assert detections_by_image_kind(counts, counter.main_index) == {
        "health/dets_per_object_image": 0.0, "health/dets_per_empty_image": 1.5}
    counter = DetectionCounter((0.5,), 0.05, empty_image_ids={11})
    counter.process([{"image_id": 10}, {"image_id": 11}, {"image_id": 12}], _outputs(SCORES))
    assert detections_by_image_kind(counter.evaluate(), counter.main_index) == {
        "health/dets_per_object_image": 1.5, "health/dets_per_empty_image": 0.0}
    # Only object images (HEALTH.OBJECT_IMAGES_ONLY): no value for the empty ones.
    assert detections_by_image_kind({"images": 2.0, "detections": [4.0], "empty_images": 0.0,
                                     "detections_on_empty_images": 0.0}, 0) == {
        "health/dets_per_object_image": 2.0}


def test_scores_outside_zero_one_are_refused():
    with pytest.raises(ValueError, match=r"must be scores in \[0, 1\], got \[1.5\] and 0.05"):
        DetectionCounter(score_thresholds=(1.5,), main_threshold=0.05)


class _Detector(nn.Module):
    """Returns SCORES image by image; records its mode and the mask branch's switch per call."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.roi_heads = SimpleNamespace(mask_on=True)
        self.calls = []

    def forward(self, batch):
        self.calls.append((len(batch), self.training, self.roi_heads.mask_on,
                           torch.is_grad_enabled()))
        return _outputs([SCORES[x["index"]] for x in batch])


def test_count_runs_in_eval_mode_without_gradients_and_the_mask_branch():
    model = _Detector().train()
    counts = count_detections(model, [{"index": i} for i in range(3)], batch_size=2,
                              counter=DetectionCounter((0.5,), 0.05))
    assert counts == {"images": 3.0, "detections": [3.0, 2.0], "images_with_detections": 2.0,
                      "empty_images": 0.0, "detections_on_empty_images": 0.0}
    assert model.calls == [(2, False, False, False), (1, False, False, False)]
    assert model.training and model.roi_heads.mask_on  # both restored


def test_a_detectron2_model_is_counted_before_the_rescaling_to_the_original_size(tiny_cfg):
    """GeneralizedRCNN's own postprocessing rescales boxes and drops those that became empty:
    the count uses the detections at the network's input size (as before training)."""
    from detectron2.modeling import build_model
    from training_harness.health.detection_check import UnscaledDetections

    torch.manual_seed(0)
    model = build_model(tiny_cfg).eval()
    batch = [{"image": torch.rand(3, 64, 96) * 255, "height": 128, "width": 192}]
    with torch.no_grad():
        (output,) = UnscaledDetections(model)(batch)
        (unscaled,) = model.inference(batch, do_postprocess=False)
        (rescaled,) = model(batch)
    assert output["instances"].image_size == (64, 96)
    assert rescaled["instances"].image_size == (128, 192)
    assert torch.equal(output["instances"].scores, unscaled.scores)
