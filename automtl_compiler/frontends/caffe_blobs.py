"""Binary ``.caffemodel`` weights: a Caffe ``NetParameter`` whose layers carry their blobs.

Both layer formats are read: the current one (``layer``, field 100) and the V1 format (``layers``, field
2) in which the BVLC model-zoo files (``bvlc_alexnet``, ``bvlc_reference_caffenet``, ``bvlc_googlenet``)
were saved. Caffe upgrades V1 files when it loads them; the schema here has no V1 messages, so the V1
layers are found by walking the protobuf wire format, and only their names and blobs are used (that is
all weights need). Blob values are converted with numpy, not through Python lists: a 60-million-value
AlexNet file loads in about a second.

How blobs become IR tensors (``layout`` maps a layer name to its kind and IR node)
    ``plain``: weight, then optional bias (Convolution, Deconvolution, InnerProduct, PReLU).
    ``transposed``: an InnerProduct with ``transpose: true`` stores its weight as [in, out].
    ``bn``: Caffe BatchNorm's mean, variance and moving-average normaliser (mean and variance are stored
    multiplied by it), then weight and bias for an affine AutoMTL batch norm.
    ``scale``: a Scale layer folded into a batch norm: gamma (the weight), then beta (the bias).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from google.protobuf.message import DecodeError

from ..errors import FileFormatError
from ..proto import caffe_pb2

#: Field numbers of the wire format walked for V1 files.
_NET_V1_LAYERS, _V1_NAME, _V1_BLOBS = 2, 4, 6


def blob_tensor(blob: Any) -> torch.Tensor:
    """A BlobProto as a float32 tensor of its shape (``shape``, else the legacy num/channels/height/width)."""
    data = blob.data if len(blob.data) else blob.double_data
    values = np.asarray(data, dtype=np.float32)
    if blob.HasField("shape"):
        shape = tuple(int(d) for d in blob.shape.dim)
    else:
        shape = (blob.num, blob.channels, blob.height, blob.width)
    if int(np.prod(shape, dtype=np.int64)) != values.size:
        raise FileFormatError(f"blob of shape {list(shape)} holds {values.size} values")
    return torch.from_numpy(values.reshape(shape))


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise FileFormatError("truncated or corrupt protobuf varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(buf: memoryview) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of each field of one serialised message; LEN values as memoryviews."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise FileFormatError(f"unsupported protobuf wire type {wire} (field {number})")
        if pos > len(buf):
            raise FileFormatError(f"field {number} runs past the end of its message")
        yield number, wire, value


def _v1_layers(data: bytes) -> list[tuple[str, list[Any]]]:
    """(name, BlobProtos) of the V1 ``layers`` entries of a serialised NetParameter."""
    out = []
    for number, wire, value in _fields(memoryview(data)):
        if number != _NET_V1_LAYERS or wire != 2:
            continue
        name, blobs = "", []
        for sub, sub_wire, sub_value in _fields(value):
            if sub == _V1_NAME and sub_wire == 2:
                name = bytes(sub_value).decode("utf-8", errors="replace")
            elif sub == _V1_BLOBS and sub_wire == 2:
                blobs.append(caffe_pb2.BlobProto.FromString(bytes(sub_value)))
        out.append((name, blobs))
    return out


def _layers(path: Path) -> list[tuple[str, list[Any]]]:
    """(name, blobs) of every layer of the binary NetParameter at ``path``, in either layer format."""
    data = path.read_bytes()
    net = caffe_pb2.NetParameter()
    try:
        net.ParseFromString(data)
    except (DecodeError, RuntimeError) as e:
        raise FileFormatError(f"{path}: not a binary Caffe NetParameter ({e})") from None
    if net.layer:
        return [(layer.name, list(layer.blobs)) for layer in net.layer]
    try:
        layers = _v1_layers(data)
    except (FileFormatError, DecodeError) as e:
        raise FileFormatError(f"{path}: corrupt V1 Caffe NetParameter ({e})") from None
    if not layers:
        raise FileFormatError(f"{path}: a Caffe NetParameter without layers (no weights to load)")
    return layers


def _tensors(kind: str, node: str, blobs: list[torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """The IR tensors (``node/name``) that one layer's blobs hold."""
    if kind == "bn":
        if len(blobs) not in (3, 5):
            raise FileFormatError(f"{where}: BatchNorm has {len(blobs)} blobs; expected 3 (mean, variance, "
                                  "normaliser) or 5 (plus weight, bias)")
        factor = float(blobs[2].reshape(-1)[0]) if blobs[2].numel() else 1.0
        norm = 0.0 if factor == 0 else 1.0 / factor
        out = {f"{node}/running_mean": blobs[0] * norm, f"{node}/running_var": blobs[1] * norm}
        if len(blobs) == 5:
            out[f"{node}/weight"], out[f"{node}/bias"] = blobs[3], blobs[4]
        return out
    if len(blobs) > 2:
        raise FileFormatError(f"{where}: {len(blobs)} blobs; expected a weight and optionally a bias")
    if kind == "transposed":
        weight = blobs[0]
        blobs = [weight.reshape(-1, weight.shape[-1]).T.contiguous(), *blobs[1:]]
    names = ("weight", "bias")
    return {f"{node}/{key}": t for key, t in zip(names, blobs)}


def read_caffemodel(path: Path, layout: dict[str, tuple[str, str]], strict: bool) -> dict[str, torch.Tensor]:
    """The IR tensors held by the binary ``.caffemodel`` at ``path``, keyed ``node/tensor``.

    ``layout`` maps each layer name with weights to (kind, IR node) as the module docstring says. Blobs of
    layers the network does not have are an error when ``strict`` (e.g. a training net's auxiliary
    classifiers), else ignored.
    """
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    for name, protos in _layers(path):
        if not protos:
            continue
        if name not in layout:
            unexpected.append(name)
            continue
        kind, node = layout[name]
        where = f"{path}: layer '{name}'"
        try:
            blobs = [blob_tensor(b) for b in protos]
        except FileFormatError as e:
            raise FileFormatError(f"{where}: {e}") from None
        out.update(_tensors(kind, node, blobs, where))
    if unexpected and strict:
        raise FileFormatError(f"{path}: blobs for layer(s) {unexpected} that the network has no weights for "
                              "(strict=False ignores them)")
    return out


__all__ = ["blob_tensor", "read_caffemodel"]
