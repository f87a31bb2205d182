"""IR tensors -> a binary ``.caffemodel``: a Caffe ``NetParameter`` whose layers carry their blobs.

:func:`automtl_compiler.backends.prototxt.export_prototxt` builds the network's layers and tells, for
each layer with weights, which IR node's tensors it holds and how (``layout``: layer name -> kind, node).
Blobs are written in Caffe's order and shapes, so that upstream Caffe's ``CopyTrainedLayersFrom``
(which checks each layer's blob count and every blob's shape) and
:func:`automtl_compiler.frontends.caffe_blobs.read_caffemodel` both accept the file:

``plain``      weight, then the bias when there is one: Convolution [out, in / group, kh, kw],
               Deconvolution [in, out / group, kh, kw], InnerProduct [out, in], PReLU [channels] or [1].
``caffe_bn``   a genuine Caffe BatchNorm: running mean [C], running variance [C] and the moving-average
               normaliser [1], written as 1.0 (Caffe divides mean and variance by it).
``automtl_bn`` the AutoMTL one-layer batch norm: the three blobs above, then weight and bias when affine
               (automtl's reader takes 3 or 5 blobs; upstream Caffe cannot read this layer anyway).
``scale``      the Scale layer after a genuine BatchNorm: gamma (the batch norm's weight), beta (its bias).
``fixed``      a layer whose one blob is a constant of the export rather than a node's tensor (e.g. the
               all-ones Deconvolution weight that writes nearest upsampling): the layout holds the tensor.

The file is the layers as in the prototxt plus their blobs, as Caffe's own snapshots are. It is
serialised here from the wire format rather than through one protobuf message: the float data is copied
once, the exact size is known before anything is written, and a model too large for protobuf (whose
readers, Caffe's included, stop at 2 GiB - 1 bytes) is refused before a byte is written.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from ..errors import AutomtlError, GraphError
from ..ir.graph import Node
from ..proto import caffe_pb2

#: The largest message protobuf parses (and Caffe's ReadProtoFromBinaryFile accepts): INT_MAX bytes.
CAFFEMODEL_MAX_BYTES = 2**31 - 1

#: Field numbers of the wire format written here.
_NET_LAYER, _LAYER_BLOBS, _BLOB_DATA = 100, 7, 5
_LEN = 2  # wire type of length-delimited fields (messages, packed repeated scalars)

#: Layer name -> (kind, the IR node whose tensors it holds; for ``fixed``, the blob itself).
Layout = dict[str, tuple[str, Node | torch.Tensor]]


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _head(number: int, size: int) -> bytes:
    """Key and length of a length-delimited field of ``size`` bytes."""
    return _varint(number << 3 | _LEN) + _varint(size)


def _field_size(number: int, size: int) -> int:
    return len(_head(number, size)) + size


def _tensor(node: Node, key: str) -> torch.Tensor:
    tensor = node.params.get(key, node.buffers.get(key))
    if tensor is None:
        raise GraphError(f"export_prototxt: {node.where} has no tensor '{key}' for the .caffemodel; materialise "
                         "the graph (graph.materialise()) or load its weights first")
    return tensor


def layer_blobs(kind: str, node: Node | torch.Tensor) -> list[torch.Tensor]:
    """The tensors of one layer's blobs, in Caffe's order and shapes (see the module docstring)."""
    if isinstance(node, torch.Tensor):
        if kind != "fixed":
            raise AssertionError(f"a {kind!r} layer needs its node, not a tensor")
        return [node]
    if kind == "plain":
        return [_tensor(node, "weight"), *([_tensor(node, "bias")] if "bias" in node.params else [])]
    if kind == "scale":
        return [_tensor(node, "weight"), _tensor(node, "bias")]
    a = node.attrs
    if kind == "automtl_bn" and not a["track_running_stats"]:
        if a["affine"]:
            raise AutomtlError(f"export_prototxt: {node.where}: a batch norm without running statistics but with "
                               "a weight and bias has no .caffemodel form (Caffe's BatchNorm blobs start with the "
                               "statistics); write the weights as safetensors (weights='safetensors')")
        return []
    stats = [_tensor(node, "running_mean"), _tensor(node, "running_var"), torch.ones(1)]
    if kind == "automtl_bn" and a["affine"]:
        stats += [_tensor(node, "weight"), _tensor(node, "bias")]
    return stats


def _blob_head(shape: tuple[int, ...]) -> bytes:
    """A BlobProto's ``shape`` field followed by the key and length of its packed ``data``."""
    count = int(np.prod(shape, dtype=np.int64))
    return caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=list(shape))).SerializeToString() + \
        _head(_BLOB_DATA, 4 * count)


def _blob_size(shape: tuple[int, ...]) -> int:
    """Bytes of the ``blobs`` field (key, length, message) holding a float blob of ``shape``."""
    inner = len(_blob_head(shape)) + 4 * int(np.prod(shape, dtype=np.int64))
    return _field_size(_LAYER_BLOBS, inner)


class _Plan:
    """Each layer's serialised structure and blob tensors, with the exact size of the file they make."""

    def __init__(self, net: Any, layout: Layout) -> None:
        self.header = caffe_pb2.NetParameter(name=net.name).SerializeToString()
        self.layers: list[tuple[bytes, list[torch.Tensor], int]] = []
        self.size = len(self.header)
        for layer in net.layer:
            structure = layer.SerializeToString()
            blobs = layer_blobs(*layout[layer.name]) if layer.name in layout else []
            inner = len(structure) + sum(_blob_size(tuple(t.shape)) for t in blobs)
            self.layers.append((structure, blobs, inner))
            self.size += _field_size(_NET_LAYER, inner)

    def chunks(self) -> Iterator[bytes]:
        """The file's bytes, a layer's structure or one blob's data at a time."""
        yield self.header
        for structure, blobs, inner in self.layers:
            yield _head(_NET_LAYER, inner) + structure
            for tensor in blobs:
                shape = tuple(tensor.shape)
                head = _blob_head(shape)
                yield _head(_LAYER_BLOBS, len(head) + 4 * tensor.numel()) + head
                yield tensor.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes()


def caffemodel_size(net: Any, layout: Layout) -> int:
    """The exact size in bytes of the ``.caffemodel`` that :func:`write_caffemodel` writes (no data is read)."""
    return _Plan(net, layout).size


def check_caffemodel_size(net: Any, layout: Layout, path: Path) -> None:
    """Refuse, before anything is written, a ``.caffemodel`` larger than protobuf can read."""
    size = caffemodel_size(net, layout)
    if size > CAFFEMODEL_MAX_BYTES:
        raise AutomtlError(f"export_prototxt: {path}: the weights would make a {size:,}-byte .caffemodel, over "
                           f"the {CAFFEMODEL_MAX_BYTES:,} bytes (2 GiB - 1) that protobuf, and so Caffe, can read; "
                           "write them as safetensors instead (weights='safetensors')")


def write_caffemodel(net: Any, layout: Layout, out: BinaryIO) -> int:
    """Write the layers of ``net`` with their blobs (``layout``: layer -> (kind, node)) to ``out``; returns bytes."""
    plan = _Plan(net, layout)
    written = 0
    for chunk in plan.chunks():
        out.write(chunk)
        written += len(chunk)
    if written != plan.size:
        raise AssertionError(f"wrote {written} bytes, planned {plan.size}")
    return written


__all__ = ["CAFFEMODEL_MAX_BYTES", "caffemodel_size", "check_caffemodel_size", "layer_blobs", "write_caffemodel"]
