"""NYUv2 (13 classes, depth, normals) in the preprocessed layout the MTAN project distributes."""

from __future__ import annotations

from typing import ClassVar

from ._mtan import MTANLayoutDataset


class NYUv2(MTANLayoutDataset):
    """NYUv2 as MTAN preprocessed it (795 train / 654 val images of 288x384)::

        <root>/{train,val}/image/<i>.npy   [H, W, 3] float RGB (in [0, 1] in MTAN's archive)
        <root>/{train,val}/label/<i>.npy   [H, W]    float, 13 classes 0..12, -1 = no label
        <root>/{train,val}/depth/<i>.npy   [H, W, 1] float metres, 0 = no measurement
        <root>/{train,val}/normal/<i>.npy  [H, W, 3] float unit normals, 0 = no measurement

    The layout and array shapes are those read by MTAN's ``im2im_pred/create_dataset.py``; we checked
    them there (the archive itself is not redistributed here).

    Returns ``(image [3, H, W] float32, targets)`` with ``segment_semantic`` [H, W] int64 (``-1`` mapped to
    ``ignore_index``, default 255), ``depth_zbuffer`` [1, H, W] float32 and ``normal`` [3, H, W] float32;
    the image is returned as stored (no mean subtraction). With ``augment`` (default: on for ``train``),
    MTAN's augmentation: a random scale from ``scales`` (crop of ``1/s`` of the image resized back; depth
    divided by ``s``, as MTAN does), then a horizontal flip with probability 1/2 when ``flip`` (normals'
    x component negated). Augmentation draws come from ``(seed, epoch, index)``; call
    :meth:`set_epoch` each epoch for fresh ones.

    A missing directory or file, or an array of the wrong shape or dtype, raises
    :class:`~automtl_compiler.errors.FileFormatError` naming it and the expected layout.
    """

    name = "nyuv2"
    folders: ClassVar[dict[str, str]] = {"segment_semantic": "label", "depth_zbuffer": "depth", "normal": "normal"}
    depth_power = -1.0
    channels: ClassVar[dict[str, int]] = {"segment_semantic": 13, "depth_zbuffer": 1, "normal": 3}
