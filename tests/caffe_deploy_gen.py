"""Writers of two large, repetitive genuine Caffe deploy files, in their original text style.

* :func:`resnet_deploy` - Kaiming He's ResNet-50/101/152 deploy files (``deep-residual-networks/prototxt``):
  the old-style header (``input:`` + four ``input_dim``), tab indentation, a blank line after each layer,
  bottleneck blocks of 1x1/3x3/1x1 ``bias_term: false`` convolutions each followed by an in-place
  ``BatchNorm`` (``use_global_stats: true``) and ``Scale`` (``bias_term: true``), the stride on the first
  1x1 convolution of a stage, ``Eltwise`` sums, ``pool5`` AVE 7x7, ``fc1000`` and ``prob``. ResNet-50's conv1
  has a bias and its ReLU layers list ``bottom`` first; ResNet-101/152 have ``bias_term: false`` on conv1,
  ReLU layers with ``top`` first, and blocks named ``b1``, ``b2``, ... after ``a`` in stages 3 and 4.
* :func:`googlenet_deploy` - BVLC's ``bvlc_googlenet/deploy.prototxt``: an ``Input`` layer, 2-space
  indentation, nine inception modules (1x1, 3x3 reduce + 3x3, 5x5 reduce + 5x5, 3x3 max pool + 1x1 projection,
  concatenated), local response normalisation after the stem, ``pool5/7x7_s1`` AVE, ``pool5/drop_7x7_s1``
  (0.4), ``loss3/classifier`` and ``prob``; no auxiliary classifiers (those exist only in train_val). The
  xavier fillers' ``std`` (unused by a deploy net) is one value here, not the original's per-layer values.

``tests/fixtures/caffe/ResNet-50-deploy.prototxt`` is checked in as a literal file; the test suite checks
that :func:`resnet_deploy` reproduces it byte for byte, so the generated ResNet-101 is written the same way.
"""

from __future__ import annotations

#: Blocks per stage (conv2_x .. conv5_x) and bottleneck widths.
RESNET_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
RESNET_WIDTHS = (64, 128, 256, 512)

#: GoogLeNet inception modules: name -> (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool projection).
INCEPTION = {
    "3a": (64, 96, 128, 16, 32, 32), "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64), "4b": (160, 112, 224, 24, 64, 64), "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64), "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128), "5b": (384, 192, 384, 48, 128, 128),
}
#: Max pools between GoogLeNet stages: after this module, a 3x3/2 pool of that name.
GOOGLENET_POOLS = {"3b": "pool3/3x3_s2", "4e": "pool4/3x3_s2"}


# ---------------------------------------------------------------- ResNet (tabs, Kaiming He's field order)


def _tab_layer(fields: list[str], param: str | None = None, body: tuple[str, ...] | list[str] = ()) -> str:
    lines = ["layer {", *(f"\t{f}" for f in fields)]
    if param:
        lines += [f"\t{param} {{", *(f"\t\t{b}" for b in body), "\t}"]
    return "\n".join([*lines, "}", "", ""])


def _io(bottom: str, top: str, name: str, kind: str) -> list[str]:
    return [f'bottom: "{bottom}"', f'top: "{top}"', f'name: "{name}"', f'type: "{kind}"']


class _ResNetWriter:
    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.parts: list[str] = []

    def conv(self, bottom: str, name: str, out: int, kernel: int, pad: int, stride: int, bias: bool = False) -> None:
        body = [f"num_output: {out}", f"kernel_size: {kernel}", f"pad: {pad}", f"stride: {stride}"]
        self.parts.append(_tab_layer(_io(bottom, name, name, "Convolution"), "convolution_param",
                                     body + ([] if bias else ["bias_term: false"])))

    def bn_scale(self, blob: str, suffix: str) -> None:
        self.parts.append(_tab_layer(_io(blob, blob, f"bn{suffix}", "BatchNorm"), "batch_norm_param",
                                     ["use_global_stats: true"]))
        self.parts.append(_tab_layer(_io(blob, blob, f"scale{suffix}", "Scale"), "scale_param", ["bias_term: true"]))

    def relu(self, blob: str) -> None:
        fields = _io(blob, blob, f"{blob}_relu", "ReLU")
        if self.depth != 50:   # ResNet-101/152 list the top first
            fields[0], fields[1] = fields[1], fields[0]
        self.parts.append(_tab_layer(fields))

    def block(self, bottom: str, name: str, width: int, stride: int, project: bool) -> str:
        """One bottleneck block ``res<name>`` reading ``bottom``; returns its output blob."""
        if project:
            self.conv(bottom, f"res{name}_branch1", 4 * width, 1, 0, stride)
            self.bn_scale(f"res{name}_branch1", f"{name}_branch1")
        src = bottom
        for branch, (out, kernel, pad, s) in zip("abc", [(width, 1, 0, stride), (width, 3, 1, 1),
                                                         (4 * width, 1, 0, 1)]):
            blob = f"res{name}_branch2{branch}"
            self.conv(src, blob, out, kernel, pad, s)
            self.bn_scale(blob, f"{name}_branch2{branch}")
            if branch != "c":
                self.relu(blob)
            src = blob
        shortcut = f"res{name}_branch1" if project else bottom
        self.parts.append(_tab_layer([f'bottom: "{shortcut}"', f'bottom: "{src}"', f'top: "res{name}"',
                                      f'name: "res{name}"', 'type: "Eltwise"']))
        self.relu(f"res{name}")
        return f"res{name}"

    def block_names(self, stage: int, count: int) -> list[str]:
        if self.depth == 50 or stage in (2, 5):
            return [f"{stage}{chr(ord('a') + i)}" for i in range(count)]
        return [f"{stage}a", *(f"{stage}b{i}" for i in range(1, count))]

    def write(self) -> str:
        dims = "".join(f"input_dim: {d}\n" for d in (1, 3, 224, 224))
        header = f'name: "ResNet-{self.depth}"\ninput: "data"\n{dims}'
        self.conv("data", "conv1", 64, 7, 3, 2, bias=self.depth == 50)
        self.bn_scale("conv1", "_conv1")
        self.relu("conv1")
        self.parts.append(_tab_layer(_io("conv1", "pool1", "pool1", "Pooling"), "pooling_param",
                                     ["kernel_size: 3", "stride: 2", "pool: MAX"]))
        blob = "pool1"
        for stage, (count, width) in enumerate(zip(RESNET_BLOCKS[self.depth], RESNET_WIDTHS), start=2):
            for i, name in enumerate(self.block_names(stage, count)):
                blob = self.block(blob, name, width, 2 if i == 0 and stage > 2 else 1, project=i == 0)
        self.parts.append(_tab_layer(_io(blob, "pool5", "pool5", "Pooling"), "pooling_param",
                                     ["kernel_size: 7", "stride: 1", "pool: AVE"]))
        self.parts.append(_tab_layer(_io("pool5", "fc1000", "fc1000", "InnerProduct"), "inner_product_param",
                                     ["num_output: 1000"]))
        self.parts.append(_tab_layer(_io("fc1000", "prob", "prob", "Softmax")))
        return header + "\n" + "".join(self.parts)


def resnet_deploy(depth: int) -> str:
    """The text of Kaiming He's ``ResNet-<depth>-deploy.prototxt`` (depth 50, 101 or 152)."""
    return _ResNetWriter(depth).write()


# ---------------------------------------------------------------- GoogLeNet (2 spaces, BVLC's field order)


def _block(name: str, body: list[str], indent: str = "  ") -> list[str]:
    return [f"{indent}{name} {{", *(f"{indent}  {b}" for b in body), f"{indent}}}"]


def _layer(name: str, kind: str, bottoms: list[str], top: str, *blocks: list[str]) -> str:
    lines = ["layer {", f'  name: "{name}"', f'  type: "{kind}"', *(f'  bottom: "{b}"' for b in bottoms),
             f'  top: "{top}"']
    for block in blocks:
        lines += block
    return "\n".join([*lines, "}"])


_PARAMS = _block("param", ["lr_mult: 1", "decay_mult: 1"]) + _block("param", ["lr_mult: 2", "decay_mult: 0"])


def _fillers(std: str | None, bias: str) -> list[str]:
    weight = ['type: "xavier"', *([f"std: {std}"] if std else [])]
    bias_filler = ['type: "constant"', f"value: {bias}"]
    return [*_block("weight_filler", weight, "    "), *_block("bias_filler", bias_filler, "    ")]


def _conv(name: str, bottom: str, out: int, kernel: int, pad: int = 0, stride: int = 1) -> list[str]:
    body = [f"num_output: {out}", *([f"pad: {pad}"] if pad else []), f"kernel_size: {kernel}",
            *([f"stride: {stride}"] if stride != 1 else [])]
    conv = ["  convolution_param {", *(f"    {b}" for b in body), *_fillers("0.03", "0.2"), "  }"]
    relu = name.replace("/", "/relu_", 1).removesuffix("_s2")   # conv1/7x7_s2 -> conv1/relu_7x7
    return [_layer(name, "Convolution", [bottom], name, _PARAMS, conv), _layer(relu, "ReLU", [name], name)]


def _pool(name: str, bottom: str, kind: str, kernel: int, stride: int, pad: int = 0) -> str:
    body = [f"pool: {kind}", f"kernel_size: {kernel}", f"stride: {stride}", *([f"pad: {pad}"] if pad else [])]
    return _layer(name, "Pooling", [bottom], name, _block("pooling_param", body))


def _lrn(name: str, bottom: str) -> str:
    return _layer(name, "LRN", [bottom], name, _block("lrn_param", ["local_size: 5", "alpha: 0.0001", "beta: 0.75"]))


def _inception(module: str, bottom: str) -> list[str]:
    a, b_reduce, b, c_reduce, c, proj = INCEPTION[module]
    p = f"inception_{module}"
    layers = [*_conv(f"{p}/1x1", bottom, a, 1), *_conv(f"{p}/3x3_reduce", bottom, b_reduce, 1),
              *_conv(f"{p}/3x3", f"{p}/3x3_reduce", b, 3, pad=1), *_conv(f"{p}/5x5_reduce", bottom, c_reduce, 1),
              *_conv(f"{p}/5x5", f"{p}/5x5_reduce", c, 5, pad=2), _pool(f"{p}/pool", bottom, "MAX", 3, 1, pad=1),
              *_conv(f"{p}/pool_proj", f"{p}/pool", proj, 1)]
    branches = [f"{p}/1x1", f"{p}/3x3", f"{p}/5x5", f"{p}/pool_proj"]
    return [*layers, _layer(f"{p}/output", "Concat", branches, f"{p}/output")]


def googlenet_deploy() -> str:
    """The text of BVLC's ``bvlc_googlenet/deploy.prototxt``."""
    data = ('layer {\n  name: "data"\n  type: "Input"\n  top: "data"\n'
            '  input_param { shape: { dim: 10 dim: 3 dim: 224 dim: 224 } }\n}')
    layers = [data,
              *_conv("conv1/7x7_s2", "data", 64, 7, pad=3, stride=2),
              _pool("pool1/3x3_s2", "conv1/7x7_s2", "MAX", 3, 2),
              _lrn("pool1/norm1", "pool1/3x3_s2"), *_conv("conv2/3x3_reduce", "pool1/norm1", 64, 1),
              *_conv("conv2/3x3", "conv2/3x3_reduce", 192, 3, pad=1), _lrn("conv2/norm2", "conv2/3x3"),
              _pool("pool2/3x3_s2", "conv2/norm2", "MAX", 3, 2)]
    blob = "pool2/3x3_s2"
    for module in INCEPTION:
        layers += _inception(module, blob)
        blob = f"inception_{module}/output"
        if module in GOOGLENET_POOLS:
            layers.append(_pool(GOOGLENET_POOLS[module], blob, "MAX", 3, 2))
            blob = GOOGLENET_POOLS[module]
    classifier = ["  inner_product_param {", "    num_output: 1000", *_fillers(None, "0"), "  }"]
    layers += [_pool("pool5/7x7_s1", blob, "AVE", 7, 1),
               _layer("pool5/drop_7x7_s1", "Dropout", ["pool5/7x7_s1"], "pool5/7x7_s1",
                      _block("dropout_param", ["dropout_ratio: 0.4"])),
               _layer("loss3/classifier", "InnerProduct", ["pool5/7x7_s1"], "loss3/classifier", _PARAMS, classifier),
               _layer("prob", "Softmax", ["loss3/classifier"], "prob")]
    return 'name: "GoogleNet"\n' + "\n".join(layers) + "\n"


__all__ = ["googlenet_deploy", "resnet_deploy"]
