"""Procedural 3-D scenes with exact ground truth for every task, rendered by vectorised ray casting.

Each integer seed gives one scene: a pinhole camera at a random height with a small random pitch and yaw,
standing in a room (floor plane, back wall, two side walls) with a few analytic objects on the floor
(spheres, yawed boxes, vertical cylinders, cones) of random pose and size. Every pixel's ray is intersected
with every primitive at once (torch, no per-pixel Python), the nearest hit wins, and from it come

- ``image``            [3, H, W] float32 in [0, 1]: Lambertian shading under a random directional light plus
  ambient, a class-specific base colour with a class-specific procedural pattern (checker, stripes) and
  Gaussian noise;
- ``segment_semantic`` [H, W] int64: 0 floor, 1 wall, ``2 + k`` object class ``k``;
- ``depth_zbuffer``    [1, H, W] float32: z-buffer depth in metres (the hit's camera z, > 0 everywhere: the
  room is closed, so every ray hits something);
- ``normal``           [3, H, W] float32: unit surface normals in the camera frame (x right, y down, z
  forward, OpenCV convention), facing the camera;
- ``classification``   int64 scalar: the object class covering the most pixels (ties: the lower class).

Object classes: ``num_classes - 2`` of them (default 4: one per shape). With more, class ``k`` is shape
``k % 4`` in colour family ``k // 4`` (hues differ); with fewer, several shapes share a class. Appearance is
tied to the class (hue, pattern), geometry to the shape, so labels are learnable from both.

Determinism: a scene depends only on its seed and the :class:`SceneConfig` (parameters and noise come
from ``numpy.random.default_rng(seed)``), and the renderer uses only correctly rounded element-wise
operations (no matmul, no transcendental functions over pixels), so a scene renders bit-identically alone
or inside any batch, on any thread count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import AutomtlError
from ._common import checked_index

TASKS: tuple[str, ...] = ("segment_semantic", "depth_zbuffer", "normal", "classification")
SPLITS: tuple[str, ...] = ("train", "val", "policy")
DEFAULT_LENGTHS = {"train": 10_000, "val": 1_000, "policy": 2_000}
SHAPES: tuple[str, ...] = ("sphere", "box", "cylinder", "cone")
FLOOR, WALL = 0, 1
N_STRUCT = 4          # candidate primitives before the objects: floor, back wall, left wall, right wall
_SPLIT_BITS = 40      # scene seeds of one split lie in [code << 40, (code + 1) << 40)
_EPS = 1e-4
_CHUNK_PIXELS = 1 << 16


@dataclass(frozen=True)
class SceneConfig:
    """What every scene of a dataset shares. ``resolution`` is (height, width); ``fov_degrees`` is horizontal."""

    resolution: tuple[int, int] = (64, 64)
    num_classes: int = 6
    min_objects: int = 2
    max_objects: int = 5
    noise_std: float = 0.02
    fov_degrees: float = 60.0

    def __post_init__(self) -> None:
        h, w = self.resolution
        if h < 2 or w < 2:
            raise AutomtlError(f"synthetic scenes: resolution must be at least 2x2, got {self.resolution}")
        if self.num_classes < 3:
            raise AutomtlError(f"synthetic scenes: num_classes must be >= 3 (floor, wall and at least one "
                               f"object class), got {self.num_classes}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise AutomtlError(f"synthetic scenes: need 1 <= min_objects <= max_objects, got "
                               f"{self.min_objects}, {self.max_objects}")
        if not 10.0 <= self.fov_degrees <= 120.0:
            raise AutomtlError(f"synthetic scenes: fov_degrees must lie in [10, 120], got {self.fov_degrees}")
        if self.noise_std < 0:
            raise AutomtlError("synthetic scenes: noise_std must be >= 0")

    @property
    def object_classes(self) -> int:
        """Classes of objects, which is also the number of image-level classes."""
        return self.num_classes - 2

    @property
    def focal(self) -> float:
        """Focal length in pixels."""
        return (self.resolution[1] / 2) / math.tan(math.radians(self.fov_degrees) / 2)


@dataclass
class Scene:
    """One sampled scene (world frame: x right, y up, z forward from the camera's unrotated view; floor y=0).

    ``rotation`` maps camera coordinates (x right, y down, z forward) to world coordinates; the camera sits
    at ``position``. Object slot arrays have ``max_objects`` entries; ``active`` marks the used ones.
    ``dims`` holds (radius, -, -) for spheres, half-extents (x, y, z) for boxes, (radius, height, -) for
    cylinders and cones; ``centre`` is the (x, z) of the footprint's centre.
    """

    seed: int
    rotation: np.ndarray            # [3, 3]
    position: np.ndarray            # [3]
    room: np.ndarray                # [2]: back-wall z, side-wall half width
    light: np.ndarray               # [3] unit, towards the light
    ambient: float
    active: np.ndarray              # [K] bool
    shape: np.ndarray               # [K] int: index into SHAPES
    cls: np.ndarray                 # [K] int: object class
    centre: np.ndarray              # [K, 2] (x, z)
    dims: np.ndarray                # [K, 3]
    yaw: np.ndarray                 # [K] radians (boxes)
    colour: np.ndarray              # [N_STRUCT + K, 3] base RGB per candidate primitive
    period: np.ndarray              # [N_STRUCT + K] pattern period (metres)
    noise: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, np.float32))  # [3, H, W]


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """HSV (all in [0, 1]) to RGB."""
    h = (h % 1.0) * 6.0
    i = int(h) % 6
    f = h - int(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i], dtype=np.float64)


def _rot_x(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=np.float64)


def _rot_y(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=np.float64)


def sample_scene(seed: int, config: SceneConfig = SceneConfig()) -> Scene:
    """The scene of ``seed``: camera, room, light, objects and the noise image, all from one generator."""
    rng = np.random.default_rng(seed)
    k_max = config.max_objects
    nk = config.object_classes
    height = rng.uniform(1.0, 1.8)
    pitch = math.radians(rng.uniform(4.0, 20.0))
    yaw_cam = math.radians(rng.uniform(-8.0, 8.0))
    rotation = _rot_y(yaw_cam) @ _rot_x(pitch) @ np.diag([1.0, -1.0, 1.0])
    position = np.array([0.0, height, 0.0])
    back, half_width = rng.uniform(7.0, 11.0), rng.uniform(3.0, 5.0)
    light = np.array([rng.uniform(-0.6, 0.6), rng.uniform(0.6, 1.0), rng.uniform(-0.9, -0.2)])
    light /= np.linalg.norm(light)
    ambient = float(rng.uniform(0.3, 0.5))

    n_obj = int(rng.integers(config.min_objects, k_max + 1))
    active = np.arange(k_max) < n_obj
    cls = rng.integers(0, nk, size=k_max)
    shape = np.empty(k_max, dtype=np.int64)
    for i in range(k_max):
        options = [s for s in range(len(SHAPES)) if s % nk == cls[i]] if nk < len(SHAPES) else [cls[i] % 4]
        shape[i] = options[int(rng.integers(0, len(options)))]
    dims = np.zeros((k_max, 3))
    yaw = np.zeros(k_max)
    for i in range(k_max):
        if shape[i] == 0:
            dims[i] = (rng.uniform(0.3, 0.7), 0.0, 0.0)
        elif shape[i] == 1:
            dims[i] = rng.uniform((0.25, 0.25, 0.25), (0.6, 0.7, 0.6))
            yaw[i] = rng.uniform(0.0, math.pi / 2)
        elif shape[i] == 2:
            dims[i] = (rng.uniform(0.2, 0.5), rng.uniform(0.5, 1.6), 0.0)
        else:
            dims[i] = (rng.uniform(0.3, 0.6), rng.uniform(0.6, 1.6), 0.0)
    # Place objects in front of the camera: a distance along the viewing direction and a lateral offset
    # inside the horizontal field of view; the first one near the optical axis so that one is always seen.
    fwd = np.array([math.sin(yaw_cam), math.cos(yaw_cam)])
    right = np.array([math.cos(yaw_cam), -math.sin(yaw_cam)])
    tan_half = math.tan(math.radians(config.fov_degrees) / 2)
    centre = np.zeros((k_max, 2))
    for i in range(k_max):
        extent = dims[i, 0] if shape[i] != 1 else math.hypot(dims[i, 0], dims[i, 2])
        dist = rng.uniform(2.2, min(back - 1.0, 6.5))
        spread = 0.15 if i == 0 else 0.75
        lateral = rng.uniform(-spread, spread) * dist * tan_half
        x, z = fwd * dist + right * lateral
        centre[i] = (np.clip(x, -half_width + extent + 0.05, half_width - extent - 0.05),
                     np.clip(z, 1.5 + extent, back - extent - 0.05))

    colour = np.zeros((N_STRUCT + k_max, 3))
    colour[0] = _hsv(0.08 + rng.uniform(-0.02, 0.02), rng.uniform(0.2, 0.35), rng.uniform(0.45, 0.65))
    colour[1:N_STRUCT] = _hsv(0.12 + rng.uniform(-0.03, 0.03), rng.uniform(0.03, 0.12), rng.uniform(0.7, 0.9))
    period = np.zeros(N_STRUCT + k_max)
    period[0] = rng.uniform(0.4, 0.8)
    period[1:N_STRUCT] = rng.uniform(0.3, 0.6)
    for i in range(k_max):
        hue = cls[i] / nk + 0.05 + rng.uniform(-0.02, 0.02)
        colour[N_STRUCT + i] = _hsv(hue, rng.uniform(0.6, 0.9), rng.uniform(0.65, 0.95))
        size = dims[i, 0] if shape[i] != 1 else dims[i].min()
        period[N_STRUCT + i] = size * rng.uniform(0.45, 0.7)
    h, w = config.resolution
    noise = rng.standard_normal((3, h, w), dtype=np.float32)
    return Scene(seed=int(seed), rotation=rotation, position=position, room=np.array([back, half_width]),
                 light=light, ambient=ambient, active=active, shape=shape, cls=cls, centre=centre, dims=dims,
                 yaw=yaw, colour=colour, period=period, noise=noise)


def camera_rays(config: SceneConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel ray directions in the camera frame with unit z: ``(x, y)`` each ``[H, W]`` float32.

    Pixel (i, j) looks along ``((j + 0.5 - W/2) / f, (i + 0.5 - H/2) / f, 1)``, so the hit at ray parameter
    ``t`` lies at camera depth ``z = t``, and a depth map back-projects as ``depth * (x, y, 1)``.
    """
    h, w = config.resolution
    f = config.focal
    ys = (torch.arange(h, dtype=torch.float64) + 0.5 - h / 2) / f
    xs = (torch.arange(w, dtype=torch.float64) + 0.5 - w / 2) / f
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return gx.float(), gy.float()


def _t(x: np.ndarray, *shape: int) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).reshape(*shape)


def _safe(d: torch.Tensor) -> torch.Tensor:
    """``d`` with exact zeros replaced by a tiny value of either sign, so divisions give ±large, not NaN."""
    return torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)


def _parity(*coords: torch.Tensor) -> torch.Tensor:
    """Checkerboard parity of ``floor`` of the given coordinates (exact integer arithmetic)."""
    total = torch.zeros_like(coords[0], dtype=torch.int64)
    for c in coords:
        total = total + torch.floor(c).long()
    return (total & 1).float()


def render_scenes(scenes: Sequence[Scene], config: SceneConfig = SceneConfig(),
                  return_aux: bool = False) -> dict[str, torch.Tensor]:
    """Ray-cast a batch of scenes (all with ``config``). Returns batched tensors keyed like a dataset sample:
    ``image`` [B, 3, H, W], ``segment_semantic`` [B, H, W], ``depth_zbuffer`` [B, 1, H, W], ``normal``
    [B, 3, H, W], ``classification`` [B]; with ``return_aux`` also ``hit`` [B, H, W] (index of the primitive
    hit: 0 floor, 1 back wall, 2 left wall, 3 right wall, ``4 + i`` object slot ``i``).

    Large batches are rendered in chunks of about 64k pixels, which keeps the temporaries in cache.
    """
    if not scenes:
        raise AutomtlError("render_scenes: no scenes given")
    chunk = max(1, _CHUNK_PIXELS // (config.resolution[0] * config.resolution[1]))
    parts = [_render_chunk(scenes[i:i + chunk], config, return_aux) for i in range(0, len(scenes), chunk)]
    if len(parts) == 1:
        return parts[0]
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def _render_chunk(scenes: Sequence[Scene], config: SceneConfig, return_aux: bool) -> dict[str, torch.Tensor]:
    b = len(scenes)
    h, w = config.resolution
    k = config.max_objects
    p = h * w
    # --- rays in the world frame, [B, 1, P] per component ---
    rx, ry = camera_rays(config)
    rx, ry = rx.reshape(1, 1, p), ry.reshape(1, 1, p)
    rot = _t(np.stack([s.rotation for s in scenes]), b, 3, 3, 1)
    r = [[rot[:, i, j].reshape(b, 1, 1) for j in range(3)] for i in range(3)]
    dx = r[0][0] * rx + r[0][1] * ry + r[0][2]
    dy = r[1][0] * rx + r[1][1] * ry + r[1][2]
    dz = r[2][0] * rx + r[2][1] * ry + r[2][2]
    pos = _t(np.stack([s.position for s in scenes]), b, 3)
    ox, oy, oz = (pos[:, i].reshape(b, 1, 1) for i in range(3))
    room = _t(np.stack([s.room for s in scenes]), b, 2)
    back, half = room[:, 0].reshape(b, 1, 1), room[:, 1].reshape(b, 1, 1)
    inf = torch.tensor(float("inf"))
    zero = torch.zeros(())
    one = torch.ones(())

    # --- structure: floor y=0, back wall z=back, side walls x=-half, x=+half ---
    t_floor = torch.where(dy < -1e-9, (zero - oy) / _safe(dy), inf)
    t_back = torch.where(dz > 1e-9, (back - oz) / _safe(dz), inf)
    t_left = torch.where(dx < -1e-9, (zero - half - ox) / _safe(dx), inf)
    t_right = torch.where(dx > 1e-9, (half - ox) / _safe(dx), inf)
    struct_t = [t_floor, t_back, t_left, t_right]
    struct_n = [(zero, one, zero), (zero, zero, -one), (one, zero, zero), (-one, zero, zero)]

    # --- objects: every slot intersected as every shape, then the slot's own shape selected ---
    cen = _t(np.stack([s.centre for s in scenes]), b, k, 2)
    dims = _t(np.stack([s.dims for s in scenes]), b, k, 3)
    cos_y = _t(np.array([[math.cos(v) for v in s.yaw] for s in scenes]), b, k, 1)
    sin_y = _t(np.array([[math.sin(v) for v in s.yaw] for s in scenes]), b, k, 1)
    shape = torch.from_numpy(np.stack([s.shape for s in scenes])).reshape(b, k, 1)
    active = torch.from_numpy(np.stack([s.active for s in scenes])).reshape(b, k, 1)
    cx, cz = cen[..., 0:1], cen[..., 1:2]
    d0, d1, d2 = dims[..., 0:1], dims[..., 1:2], dims[..., 2:3]
    ex, ez = ox - cx, oz - cz                                  # ray origin relative to the footprint centre

    # sphere resting on the floor: centre (cx, r, cz)
    ey = oy - d0
    a = dx * dx + dy * dy + dz * dz
    bq = ex * dx + ey * dy + ez * dz
    cq = ex * ex + ey * ey + ez * ez - d0 * d0
    disc = bq * bq - a * cq
    t_sph = (zero - bq - torch.sqrt(disc.clamp(min=0))) / a
    t_sph = torch.where((disc >= 0) & (t_sph > _EPS), t_sph, inf)

    # box with half extents (d0, d1, d2), yawed about the vertical axis, resting on the floor
    lox, loz = cos_y * ex - sin_y * ez, sin_y * ex + cos_y * ez
    loy = oy - d1
    ldx, ldz = cos_y * dx - sin_y * dz, sin_y * dx + cos_y * dz
    slabs = []
    for o, d, half_ext in ((lox, ldx, d0), (loy, dy, d1), (loz, ldz, d2)):
        d = _safe(d)
        t1, t2 = (zero - half_ext - o) / d, (half_ext - o) / d
        slabs.append((torch.minimum(t1, t2), torch.maximum(t1, t2)))
    t_near = torch.maximum(torch.maximum(slabs[0][0], slabs[1][0]), slabs[2][0])
    t_far = torch.minimum(torch.minimum(slabs[0][1], slabs[1][1]), slabs[2][1])
    t_box = torch.where((t_near <= t_far) & (t_near > _EPS), t_near, inf)
    hit_x = (slabs[0][0] >= slabs[1][0]) & (slabs[0][0] >= slabs[2][0])
    hit_y = ~hit_x & (slabs[1][0] >= slabs[2][0])
    hit_z = ~hit_x & ~hit_y
    nlx = torch.where(hit_x, -torch.sign(ldx), zero)
    nly = torch.where(hit_y, -torch.sign(dy), zero)
    nlz = torch.where(hit_z, -torch.sign(ldz), zero)

    # vertical cylinder: radius d0, height d1, base on the floor; side and top cap
    a_c = _safe(dx * dx + dz * dz)
    b_c = ex * dx + ez * dz
    c_c = ex * ex + ez * ez - d0 * d0
    disc_c = b_c * b_c - a_c * c_c
    t_side = (zero - b_c - torch.sqrt(disc_c.clamp(min=0))) / a_c
    y_side = oy + t_side * dy
    t_side = torch.where((disc_c >= 0) & (t_side > _EPS) & (y_side >= 0) & (y_side <= d1), t_side, inf)
    t_cap = (d1 - oy) / _safe(dy)
    px_cap, pz_cap = ex + t_cap * dx, ez + t_cap * dz
    t_cap = torch.where((t_cap > _EPS) & (px_cap * px_cap + pz_cap * pz_cap <= d0 * d0), t_cap, inf)
    t_cyl = torch.minimum(t_side, t_cap)
    cyl_cap = t_cap < t_side

    # cone: base radius d0 on the floor, apex at height d1
    k2 = (d0 / d1.clamp(min=1e-6)) * (d0 / d1.clamp(min=1e-6))
    wq = d1 - oy
    a_k = _safe(dx * dx + dz * dz - k2 * dy * dy)
    b_k = ex * dx + ez * dz + k2 * wq * dy
    c_k = ex * ex + ez * ez - k2 * wq * wq
    disc_k = b_k * b_k - a_k * c_k
    sq = torch.sqrt(disc_k.clamp(min=0))
    t_cone = inf
    for root in ((zero - b_k - sq) / a_k, (zero - b_k + sq) / a_k):
        y_r = oy + root * dy
        ok = (disc_k >= 0) & (root > _EPS) & (y_r >= 0) & (y_r <= d1)
        t_cone = torch.minimum(t_cone, torch.where(ok, root, inf))

    t_obj = torch.where(shape == 0, t_sph, torch.where(shape == 1, t_box, torch.where(shape == 2, t_cyl, t_cone)))
    t_obj = torch.where(active, t_obj, inf)

    # --- nearest hit ---
    t_all = torch.cat([t.expand(b, 1, p) for t in struct_t] + [t_obj], dim=1)      # [B, 4 + K, P]
    t_hit, hit = t_all.min(dim=1)                                                    # [B, P]
    obj_slot = (hit - N_STRUCT).clamp(min=0).unsqueeze(1)                            # [B, 1, P]

    def pick(x: torch.Tensor) -> torch.Tensor:
        """The value of the hit object slot, [B, K, P] or [B, K, 1] -> [B, P]."""
        return torch.gather(x.expand(b, k, p), 1, obj_slot).squeeze(1)

    t_row = t_hit.unsqueeze(1)
    px, py, pz = ox + t_row * dx, oy + t_row * dy, oz + t_row * dz                   # hit point, [B, 1, P]
    px, py, pz = px.squeeze(1), py.squeeze(1), pz.squeeze(1)
    shp = pick(shape).long()
    o_cx, o_cz = pick(cx), pick(cz)
    o_d0, o_d1 = pick(d0), pick(d1)
    o_cos, o_sin = pick(cos_y), pick(sin_y)
    qx, qz = px - o_cx, pz - o_cz                                                    # relative to the footprint
    # object normals (world frame) per shape, at the hit point
    n_sph = (qx / o_d0, (py - o_d0) / o_d0, qz / o_d0)
    bx, by, bz = pick(nlx), pick(nly), pick(nlz)
    n_box = (o_cos * bx + o_sin * bz, by, zero - o_sin * bx + o_cos * bz)
    cap = pick(cyl_cap)
    cap_sign = torch.where(oy.reshape(b, 1) >= o_d1, one, -one)
    n_cyl = (torch.where(cap, zero, qx / o_d0), torch.where(cap, cap_sign, zero), torch.where(cap, zero, qz / o_d0))
    o_k2 = pick(k2)
    n_cone = (qx, o_k2 * (o_d1 - py), qz)
    is_obj = hit >= N_STRUCT
    nw = []
    for c in range(3):
        obj_c = torch.where(shp == 0, n_sph[c], torch.where(shp == 1, n_box[c],
                            torch.where(shp == 2, n_cyl[c], n_cone[c])))
        struct_c = torch.zeros(b, p)
        for j, sn in enumerate(struct_n):
            struct_c = torch.where(hit == j, sn[c], struct_c)
        nw.append(torch.where(is_obj, obj_c, struct_c))
    length = torch.sqrt(nw[0] * nw[0] + nw[1] * nw[1] + nw[2] * nw[2]).clamp(min=1e-12)
    nw = [c / length for c in nw]
    rr = [[rot[:, i, j].reshape(b, 1) for j in range(3)] for i in range(3)]
    normal = torch.stack([rr[0][c] * nw[0] + rr[1][c] * nw[1] + rr[2][c] * nw[2] for c in range(3)], dim=1)

    # --- labels ---
    cls = torch.from_numpy(np.stack([s.cls for s in scenes])).long()                 # [B, K]
    obj_label = 2 + torch.gather(cls, 1, obj_slot.squeeze(1))
    seg = torch.where(is_obj, obj_label, torch.where(hit == 0, FLOOR, WALL))
    counts = torch.zeros(b, config.num_classes, dtype=torch.int64).scatter_add_(1, seg, torch.ones_like(seg))
    obj_counts = counts[:, 2:]
    label = obj_counts.argmax(dim=1)
    label = torch.where(obj_counts.max(dim=1).values > 0, label, cls[:, 0])

    # --- appearance: class colour x pattern x Lambertian shading + noise ---
    colours = _t(np.stack([s.colour for s in scenes]), b, N_STRUCT + k, 3)
    periods = _t(np.stack([s.period for s in scenes]), b, N_STRUCT + k)
    per = torch.gather(periods, 1, hit)
    lx, lz = o_cos * qx - o_sin * qz, o_sin * qx + o_cos * qz                        # object-local (boxes)
    pattern_obj = torch.where(
        shp == 0, _parity(py / per),                                                 # sphere: latitude bands
        torch.where(shp == 1, _parity(lx / per, py / per, lz / per),                 # box: 3-D checker
                    torch.where(shp == 2, _parity((qx + qz) / per),                  # cylinder: vertical stripes
                                _parity((qx + py) / per))))                          # cone: slanted stripes
    pattern = torch.where(is_obj, pattern_obj, torch.where(hit == 0, _parity(px / per, pz / per), _parity(py / per)))
    contrast = torch.where(is_obj, 0.45, 0.25)
    light = _t(np.stack([s.light for s in scenes]), b, 3)
    ambient = _t(np.array([s.ambient for s in scenes]), b, 1)
    lam = (nw[0] * light[:, 0:1] + nw[1] * light[:, 1:2] + nw[2] * light[:, 2:3]).clamp(min=0)
    shade = (ambient + (1 - ambient) * lam) * (1 - contrast * pattern)
    noise = _t(np.stack([s.noise for s in scenes]), b, 3, p)
    std = float(config.noise_std)
    chans = []
    for c in range(3):
        base = torch.gather(colours[..., c], 1, hit)
        chans.append((base * shade + std * noise[:, c]).clamp(0, 1))
    out = {
        "image": torch.stack(chans, dim=1).reshape(b, 3, h, w),
        "segment_semantic": seg.reshape(b, h, w),
        "depth_zbuffer": t_hit.reshape(b, 1, h, w),
        "normal": normal.reshape(b, 3, h, w),
        "classification": label,
    }
    if return_aux:
        out["hit"] = hit.reshape(b, h, w)
    return out


def render(seeds: Sequence[int], config: SceneConfig = SceneConfig(), return_aux: bool = False
           ) -> dict[str, torch.Tensor]:
    """Sample and render the scenes of ``seeds`` in one batch (see :func:`render_scenes`)."""
    return render_scenes([sample_scene(int(s), config) for s in seeds], config, return_aux)


def scene_seed(split: str, index: int, base_seed: int = 0) -> int:
    """The seed of scene ``index`` of ``split``: ``((3 * base_seed + code) << 40) + index`` with codes
    train 0, val 1, policy 2, so splits (and base seeds) never share a scene as long as ``index < 2**40``."""
    if split not in SPLITS:
        raise AutomtlError(f"unknown synthetic split {split!r}; use one of {', '.join(SPLITS)}")
    if base_seed < 0:
        raise AutomtlError(f"seed must be >= 0, got {base_seed}")
    if not 0 <= index < (1 << _SPLIT_BITS):
        raise AutomtlError(f"scene index {index} out of range [0, 2**{_SPLIT_BITS})")
    return ((3 * base_seed + SPLITS.index(split)) << _SPLIT_BITS) + index


class SyntheticScenes(Dataset):
    """Procedurally rendered scenes as a map-style dataset: ``dataset[i] -> (image, targets)``.

    ``image`` is [3, H, W] float32 in [0, 1]; ``targets`` maps each task kind (``segment_semantic``,
    ``depth_zbuffer``, ``normal``, ``classification``; or those in ``tasks``) to its tensor (see the module
    docstring). Sample ``i`` of a split is the scene of ``scene_seed(split, i, seed)``: the three splits
    (``train``, ``val``, and ``policy``, AutoMTL's separate split for training the policy) never overlap.

    Args:
        split: ``"train"``, ``"val"`` or ``"policy"``.
        length: number of samples (default 10,000 train, 1,000 val, 2,000 policy). ``size`` is an alias
            (torchvision ``FakeData``'s name); give one of them.
        resolution: (height, width) in pixels.
        num_classes: segmentation classes, floor and wall included (>= 3); image-level classes are
            ``num_classes - 2``.
        seed: base seed; different base seeds give disjoint scene sets.
        tasks: the task kinds to return (default all four).
        cache: keep rendered samples in memory (about 115 kB each at 64x64).
        min_objects, max_objects, noise_std, fov_degrees: see :class:`SceneConfig`.

    The dataset also has ``__getitems__``, which ``torch.utils.data.DataLoader`` calls with a whole batch
    of indices, so loaders render each batch in one vectorised call (bit-identical to one-by-one).
    """

    def __init__(self, split: str = "train", size: int | None = None, length: int | None = None,
                 resolution: tuple[int, int] = (64, 64), num_classes: int = 6, seed: int = 0,
                 tasks: Sequence[str] | None = None, cache: bool = False, min_objects: int = 2,
                 max_objects: int = 5, noise_std: float = 0.02, fov_degrees: float = 60.0) -> None:
        if split not in SPLITS:
            raise AutomtlError(f"unknown synthetic split {split!r}; use one of {', '.join(SPLITS)}")
        if size is not None and length is not None and size != length:
            raise AutomtlError(f"SyntheticScenes: size={size} and length={length} disagree; give one")
        n = length if length is not None else size if size is not None else DEFAULT_LENGTHS[split]
        if n < 0 or n >= (1 << _SPLIT_BITS):
            raise AutomtlError(f"SyntheticScenes: length must lie in [0, 2**{_SPLIT_BITS}), got {n}")
        if seed < 0:
            raise AutomtlError(f"SyntheticScenes: seed must be >= 0, got {seed}")
        self.tasks = _check_tasks(tasks, TASKS, "synthetic")
        self.split, self.length, self.seed = split, int(n), int(seed)
        self.config = SceneConfig(resolution=(int(resolution[0]), int(resolution[1])), num_classes=num_classes,
                                  min_objects=min_objects, max_objects=max_objects, noise_std=noise_std,
                                  fov_degrees=fov_degrees)
        self.cache = cache
        self._cache: dict[int, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}

    @property
    def num_classes(self) -> dict[str, int]:
        """Output channels per task kind (classes for the two classification-like tasks)."""
        out = {"segment_semantic": self.config.num_classes, "depth_zbuffer": 1, "normal": 3,
               "classification": self.config.object_classes}
        return {t: out[t] for t in self.tasks}

    def __len__(self) -> int:
        return self.length

    def seed_of(self, index: int) -> int:
        """The scene seed of sample ``index``."""
        return scene_seed(self.split, self._check_index(index), self.seed)

    def _check_index(self, index: int) -> int:
        return checked_index(index, self.length)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        idx = [self._check_index(i) for i in indices]
        missing = sorted({i for i in idx if i not in self._cache})
        fresh: dict[int, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}
        if missing:
            batch = render([scene_seed(self.split, i, self.seed) for i in missing], self.config)
            for row, i in enumerate(missing):
                # clone() so that a sample does not keep the whole batch's storage alive
                fresh[i] = (batch["image"][row].clone(), {t: batch[t][row].clone() for t in self.tasks})
            if self.cache:
                self._cache.update(fresh)
        return [self._cache[i] if i in self._cache else fresh[i] for i in idx]

    def render_batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Samples ``indices`` already stacked: ``(images [B, 3, H, W], {task: [B, ...]})``."""
        batch = render([self.seed_of(i) for i in indices], self.config)
        return batch["image"], {t: batch[t] for t in self.tasks}


def _check_tasks(tasks: Sequence[str] | None, available: Sequence[str], dataset: str) -> tuple[str, ...]:
    """Validate a dataset's requested task kinds (aliases resolved); default: all ``available``."""
    if tasks is None:
        return tuple(available)
    from ..tasks import ALIASES

    out = []
    for t in tasks:
        name = ALIASES.get(t, t)
        if name not in available:
            raise AutomtlError(f"{dataset} has no targets for task {t!r}; it provides {', '.join(available)}")
        if name not in out:
            out.append(name)
    if not out:
        raise AutomtlError(f"{dataset}: tasks is empty; give at least one of {', '.join(available)}")
    return tuple(out)
