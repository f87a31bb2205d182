"""Cityscapes (2, 7 or 19 classes and inverse depth) in the preprocessed layout the MTAN project distributes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import AutomtlError
from ._mtan import MTANLayoutDataset

LABEL_SETS = (2, 7, 19)


class Cityscapes(MTANLayoutDataset):
    """Cityscapes as MTAN preprocessed it (2975 train / 500 val images, 128x256 or 256x512)::

        <root>/{train,val}/image/<i>.npy      [H, W, 3] float RGB
        <root>/{train,val}/label_7/<i>.npy    [H, W]    float, 7 classes 0..6, -1 = no label
                           (label_2, label_19 hold the 2- and 19-class label sets)
        <root>/{train,val}/depth/<i>.npy      [H, W, 1] float inverse depth (disparity), 0 = invalid

    No normals. ``num_classes`` (7 by default, MTAN's usual choice; 2 or 19) picks the label folder. The
    layout is the one MTAN's ``create_dataset.py`` and its README describe (``label_7`` read there; the
    README lists the 2-, 7- and 19-class sets); the archive itself is not redistributed here.

    Output and augmentation as :class:`~automtl_compiler.data.nyuv2.NYUv2`, except that the depth target is
    inverse depth, so a zoom by ``s`` multiplies it by ``s`` (MTAN's code divides, as for NYUv2's metric
    depth; multiplying keeps disparity consistent with the zoomed image).
    """

    name = "cityscapes"
    depth_power = 1.0

    def __init__(self, root: str | Path, split: str = "train", tasks: Sequence[str] | None = None,
                 num_classes: int = 7, augment: bool | None = None, scales: Sequence[float] = (1.0, 1.2, 1.5),
                 flip: bool = True, ignore_index: int = 255, seed: int = 0) -> None:
        if num_classes not in LABEL_SETS:
            raise AutomtlError(f"cityscapes: num_classes must be one of {', '.join(map(str, LABEL_SETS))} "
                               f"(MTAN's label_2, label_7, label_19), got {num_classes}")
        self.folders = {"segment_semantic": f"label_{num_classes}", "depth_zbuffer": "depth"}
        self.channels = {"segment_semantic": num_classes, "depth_zbuffer": 1}
        super().__init__(root, split, tasks, augment, scales, flip, ignore_index, seed)

    def label_hint(self) -> str:
        """What to do about a label outside the class count (said in the error)."""
        n = self.channels["segment_semantic"]
        return f"label_{n} should hold the {n}-class set: check the folder or choose num_classes (2, 7 or 19)"
