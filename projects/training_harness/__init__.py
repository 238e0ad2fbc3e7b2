"""
The training harness around the balanced_rcnn core: set-up checks of the config, the data and the
output folder; the training-health monitor and its stops; atomic checkpoints that must fit the
model, a checkpoint on SIGTERM / Ctrl-C, the DDP peer watchdog and the launcher; the synthetic
and COCO dataset registration with its checks; the pre-flight report; export.

Importing it registers the built-in synthetic datasets (names and metadata; the images are
generated on first use). Nothing in balanced_rcnn imports it.
"""
from .config import add_training_harness_config, load_project_config
from .data import register_datasets_from_config
from .engine import GuardedTrainer
from .entry import check_setup, launch

__all__ = [
    "GuardedTrainer",
    "add_training_harness_config",
    "check_setup",
    "launch",
    "load_project_config",
    "register_datasets_from_config",
]
