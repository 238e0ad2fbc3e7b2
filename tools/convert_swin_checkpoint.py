#!/usr/bin/env python
"""
Convert an official Swin Transformer ImageNet checkpoint into a file MODEL.WEIGHTS loads.

    python tools/convert_swin_checkpoint.py swin_tiny_patch4_window7_224.pth \
        weights/swin_tiny_patch4_window7_224_d2.pth

Input: a .pth of the Swin release (a dict whose "model" entry is the state_dict: keys
``patch_embed.proj.weight``, ``layers.0.blocks.0.attn.qkv.weight``,
``layers.0.downsample.reduction.weight``, ``norm.weight``, ``head.weight``, ...).
Output: ``{"model": state_dict}`` whose keys are the model's own names
(``backbone.bottom_up.<Swin key>``), so detectron2's checkpointer loads them exactly, with no
name-matching heuristics. detectron2's SwinTransformer keeps the official parameter names.

What is left out, and reported:
- ``head.*``: the ImageNet classifier;
- ``*.attn_mask``: shifted-window masks for 224-px inputs, recomputed for every input size;
- ``norm.*``: the classifier's final LayerNorm. The detector has one LayerNorm per output stage
  instead (``norm0``..``norm3``), which stay at their initialization (weight 1, bias 0), as in
  the published Swin detection models;
- any tensor whose shape differs from the backbone the checkpoint describes.
The architecture (embed dim, depths, heads, window) is read from the checkpoint and printed:
set MODEL.SWIN to it.
"""

import argparse
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from balanced_rcnn.modeling.backbone import D2SwinTransformer
from training_harness.errors import CheckpointError, UnsafeFileError
from training_harness.reliability.weights_files import read_weights_file

# Where the backbone's Swin sits inside GeneralizedRCNN (FPN.bottom_up).
MODEL_PREFIX = "backbone.bottom_up."
_CLASSIFIER_PREFIX = "head."
_ATTN_MASK_SUFFIX = ".attn_mask"


@dataclass
class ConversionReport:
    """What happened to every key, in the checkpoint's and in the backbone's names."""

    architecture: Dict[str, object]
    converted: List[str] = field(default_factory=list)
    dropped_classifier: List[str] = field(default_factory=list)
    dropped_attn_masks: List[str] = field(default_factory=list)
    unmatched_in_checkpoint: List[str] = field(default_factory=list)
    shape_mismatches: List[str] = field(default_factory=list)
    missing_in_checkpoint: List[str] = field(default_factory=list)

    def format(self) -> str:
        arch = self.architecture
        lines = [
            "Architecture read from the checkpoint (set MODEL.SWIN to it): "
            f"EMBED_DIM {arch['embed_dim']}, DEPTHS {list(arch['depths'])}, "
            f"NUM_HEADS {list(arch['num_heads'])}, WINDOW_SIZE {arch['window_size']}, "
            f"PATCH_SIZE {arch['patch_size']}, MLP_RATIO {arch['mlp_ratio']}, "
            f"APE {arch['ape']}, PATCH_NORM {arch['patch_norm']}, QKV_BIAS {arch['qkv_bias']}",
            f"Converted {len(self.converted)} tensors (names prefixed with '{MODEL_PREFIX}').",
        ]
        sections = [
            ("Dropped, the ImageNet classifier", self.dropped_classifier),
            (
                "Dropped, shifted-window masks (recomputed for each input size)",
                self.dropped_attn_masks,
            ),
            (
                "In the checkpoint, no counterpart in the backbone (not converted)",
                self.unmatched_in_checkpoint,
            ),
            (
                "Shape differs from the backbone the checkpoint describes (not converted)",
                self.shape_mismatches,
            ),
            (
                "In the backbone, not in the checkpoint (keep their initialization)",
                self.missing_in_checkpoint,
            ),
        ]
        for title, keys in sections:
            lines.append(f"{title}: {len(keys)}" + (":" if keys else ""))
            lines.extend(f"    {k}" for k in keys)
        return "\n".join(lines)


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The state_dict of an official checkpoint ({"model": state_dict}) or of a bare one, read
    as every checkpoint of this project is: tensors only, no code runs."""
    state = read_weights_file(path, named_by="the converter's input")["model"]
    if "patch_embed.proj.weight" not in state:
        raise ValueError(
            f"{path} is not a Swin Transformer checkpoint: no 'patch_embed.proj.weight' among its "
            f"{len(state)} keys (first: {list(state)[:5]})"
        )
    return state


def infer_architecture(state: Dict[str, torch.Tensor]) -> Dict[str, object]:
    """D2SwinTransformer's arguments, read from the tensor shapes of a Swin state_dict."""
    proj = state["patch_embed.proj.weight"]  # (C, 3, patch, patch)
    blocks = [re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", k) for k in state]
    num_stages = 1 + max(int(m.group(1)) for m in blocks if m)
    depths = [
        1 + max(int(m.group(2)) for m in blocks if m and int(m.group(1)) == i)
        for i in range(num_stages)
    ]
    # relative_position_bias_table: ((2M - 1)^2, heads) for window size M.
    tables = [
        state[f"layers.{i}.blocks.0.attn.relative_position_bias_table"] for i in range(num_stages)
    ]
    window_size = (math.isqrt(tables[0].shape[0]) + 1) // 2
    embed_dim = proj.shape[0]
    return dict(
        embed_dim=embed_dim,
        depths=tuple(depths),
        num_heads=tuple(t.shape[1] for t in tables),
        window_size=window_size,
        patch_size=proj.shape[-1],
        mlp_ratio=state["layers.0.blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        qkv_bias="layers.0.blocks.0.attn.qkv.bias" in state,
        ape="absolute_pos_embed" in state,
        patch_norm="patch_embed.norm.weight" in state,
    )


def reference_state_dict(arch: Dict[str, object]) -> Dict[str, torch.Tensor]:
    """The state_dict of the backbone our builder makes for ``arch`` (all 4 output stages)."""
    swin = D2SwinTransformer(
        out_features=["res2", "res3", "res4", "res5"], drop_path_rate=0.0, **arch
    )
    return swin.state_dict()


def convert(
    state: Dict[str, torch.Tensor], reference: Optional[Dict[str, torch.Tensor]] = None
) -> Tuple[Dict[str, torch.Tensor], ConversionReport]:
    """Map an official Swin state_dict to model keys; returns (model state_dict, report)."""
    arch = infer_architecture(state)
    reference = reference if reference is not None else reference_state_dict(arch)
    report = ConversionReport(architecture=arch)
    converted: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(_CLASSIFIER_PREFIX):
            report.dropped_classifier.append(key)
        elif key.endswith(_ATTN_MASK_SUFFIX):
            report.dropped_attn_masks.append(key)
        elif key not in reference:
            report.unmatched_in_checkpoint.append(key)
        elif reference[key].shape != value.shape:
            report.shape_mismatches.append(
                f"{key}: checkpoint {tuple(value.shape)}, backbone {tuple(reference[key].shape)}"
            )
        else:
            converted[MODEL_PREFIX + key] = value
            report.converted.append(key)
    report.missing_in_checkpoint = [k for k in reference if k not in state]
    return converted, report


def main(argv: Optional[List[str]] = None) -> ConversionReport:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="official Swin ImageNet checkpoint (.pth)")
    parser.add_argument("output", help="converted file for MODEL.WEIGHTS (.pth)")
    args = parser.parse_args(argv)
    if not args.output.endswith(".pth"):
        # detectron2 reads .pkl files with pickle (its model-zoo format), not torch.load.
        parser.error(f"the output must end with .pth, got {args.output}")
    if Path(args.output).resolve() == Path(args.input).resolve():
        parser.error(f"the output {args.output} is the input: it would overwrite the download")

    try:
        converted, report = convert(read_state_dict(args.input))
    except (CheckpointError, UnsafeFileError, ValueError) as e:
        parser.error(str(e))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": converted, "source": Path(args.input).name}, args.output)
    print(report.format())
    print(f"Wrote {args.output}: use it as MODEL.WEIGHTS.")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
