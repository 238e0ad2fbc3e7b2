"""
Evaluation beyond COCO AP: what a deployment sees on mostly-empty data (image_level.py) and AP by
class frequency (frequency_groups.py). Trainer.build_evaluator runs both with every evaluation.
"""
from .frequency_groups import FrequencyGroupCOCOEvaluator, frequency_groups
from .image_level import IMAGE_LEVEL_TASK, ImageLevelEvaluator

__all__ = ["FrequencyGroupCOCOEvaluator", "IMAGE_LEVEL_TASK", "ImageLevelEvaluator",
           "frequency_groups"]
