"""Problem (b): SS-stage-like 3-D shapes, and its sparse (SLat-shaped) variant.

Shape family: 24 parametric classes (primitives, hollow primitives and unions of primitives: table, chair,
dumbbell, snowman, mushroom, rocket, ...), every numeric parameter jittered by a factor in [1 - jitter,
1 + jitter], then a random pose (yaw in [0, 2 pi), small tilt, scale, small translation) and voxelised at 32^3
(voxel centres inside the implicit shape). z is up.

Dense (SS-like) latent: the 32^3 occupancy packed space-to-depth into a [8, 16, 16, 16] tensor (channel
4 a + 2 b + c holds voxel (2 i + a, 2 j + b, 2 k + c)), mapped to {-1, +1}: the shape of TRELLIS's SS latent and
exactly decodable (`unpack`: depth-to-space, > 0). It plays the role of the SS VAE latent; no decoder network is
needed. Condition: the class (one-hot; zeros = CFG negative) through a learned token table (`nets.ClassTokenFlow`).
Metrics against held-out shapes and against the teacher's 25-step CFG samples, class-conditionally:
COV / MMD with the 1 - IoU distance, MMD with the Chamfer distance of surface points, a Frechet distance on a
fixed random 3-D conv net (mdt.eval.OccupancyFeatureNet) and the paired IoU with the teacher's 25-step sample
from the same noise.

Sparse (SLat-like) variant: coordinates = boundary voxels of the occupancy at the problem's resolution (the
flow's `resolution`, 32 by default; the benchmark presets use 16^3 and the first 8 classes to afford a trained
teacher), 8 feature channels per voxel: outward normal (3), part colour (3; a per-class palette of each primitive,
multiplied by a per-shape random sign, so the feature distribution is bimodal and needs global coherence), height z
and distance from the centre. The flow (`SLatFlowModel`) generates the features on given coordinates (stage 2
given stage 1). Metrics: `mse_teacher` (per-voxel MSE to the teacher's 25-step sample from the same noise on the
same coordinates), `mse_geo_data` (per-voxel MSE of the geometric channels to the evaluation shapes' own features:
normal, height, radius are functions of the coordinates, so its floor is 0 by construction), `fd_stats_data`
(Frechet distance of per-shape feature statistics to the evaluation shapes') and `colour_coherence` (1 = every
shape's colours carry one sign). The held-out floor (`data_as_sample`) is a second draw of shapes, which lies on
its own coordinates: it is scored on the coordinate-free metrics only (fd_stats_data: a finite-sample floor;
colour_coherence: 1 by construction).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mdt.eval import OccupancyFeatureNet, chamfer_matrix, frechet_distance, iou_matrix, surface_points
from mdt.eval.shapes import boundary, grouped_coverage_mmd
from mdt.sparse import SparseTensor

from .nets import slat_flow, ss_flow
from .protocol import wanted_metrics

RES = 32


# ---- implicit primitives: q [N, 3] canonical coordinates -> bool [N] ------------------------------------------
def _t(v) -> Tensor:
    return torch.as_tensor(v, dtype=torch.float32)


def sphere(q, c, r):
    return ((q - _t(c)).pow(2).sum(1)) <= r * r


def box(q, c, h):
    return ((q - _t(c)).abs() <= _t(h)).all(1)


def ellipsoid(q, c, radii):
    return (((q - _t(c)) / _t(radii)).pow(2).sum(1)) <= 1


def _axis(q, c, axis):
    d = q - _t(c)
    other = [i for i in range(3) if i != axis]
    return d[:, axis], d[:, other].pow(2).sum(1).sqrt()


def cylinder(q, c, r, hh, axis=2):
    z, rad = _axis(q, c, axis)
    return (rad <= r) & (z.abs() <= hh)


def cone(q, c, r, hh, axis=2, up=True):
    """Base radius r at c - hh (apex at c + hh) along `axis`; up=False flips it."""
    z, rad = _axis(q, c, axis)
    z = z if up else -z
    frac = (z + hh) / (2 * hh)
    return (frac >= 0) & (frac <= 1) & (rad <= r * (1 - frac))


def torus(q, c, big, small, axis=2):
    z, rad = _axis(q, c, axis)
    return (rad - big).pow(2) + z.pow(2) <= small * small


def capsule(q, a, b, r):
    a, b = _t(a), _t(b)
    ab = b - a
    s = ((q - a) @ ab / (ab @ ab)).clamp(0, 1)
    return (q - a - s[:, None] * ab).pow(2).sum(1) <= r * r


def octahedron(q, c, r):
    return (q - _t(c)).abs().sum(1) <= r


def _classes():
    """name -> function(q, j) returning a list of part masks; j(x) jitters a parameter."""
    def table(q, j):
        tz, lx, ly = 0.45 * j(1), 0.75 * j(1), 0.45 * j(1)
        parts = [box(q, (0, 0, tz), (0.9 * j(1), 0.6 * j(1), 0.08 * j(1)))]
        leg = 0.07 * j(1)
        for sx in (-1, 1):
            for sy in (-1, 1):
                parts.append(box(q, (sx * lx, sy * ly, (tz - 0.9) / 2), (leg, leg, (tz + 0.9) / 2)))
        return parts

    def chair(q, j):
        w, leg, back = 0.5 * j(1), 0.08 * j(1), 0.5 * j(1)
        parts = [box(q, (0, 0, 0), (w, w, 0.07)), box(q, (0, -w + 0.07, back), (w, 0.07, back))]
        for sx in (-1, 1):
            for sy in (-1, 1):
                parts.append(box(q, (sx * (w - leg), sy * (w - leg), -0.45), (leg, leg, 0.45)))
        return parts

    def dumbbell(q, j):
        d, r = 0.62 * j(1), 0.34 * j(1)
        return [sphere(q, (-d, 0, 0), r), sphere(q, (d, 0, 0), r), cylinder(q, (0, 0, 0), 0.12 * j(1), d, axis=0)]

    def snowman(q, j):
        r1, r2, r3 = 0.45 * j(1), 0.32 * j(1), 0.22 * j(1)
        z1 = -0.9 + r1
        z2 = z1 + r1 + r2 * 0.8
        z3 = z2 + r2 + r3 * 0.8
        return [sphere(q, (0, 0, z1), r1), sphere(q, (0, 0, z2), r2), sphere(q, (0, 0, z3), r3)]

    def mushroom(q, j):
        cap_r, stem_r = 0.75 * j(1), 0.18 * j(1)
        return [cylinder(q, (0, 0, -0.45), stem_r, 0.45), sphere(q, (0, 0, 0), cap_r) & (q[:, 2] >= 0)]

    def rocket(q, j):
        r, h = 0.3 * j(1), 0.55 * j(1)
        fin = 0.55 * j(1)
        return [cylinder(q, (0, 0, -0.2), r, h), cone(q, (0, 0, -0.2 + h + 0.25), r, 0.25),
                box(q, (0, 0, -0.2 - h + 0.2), (fin, 0.04, 0.2)), box(q, (0, 0, -0.2 - h + 0.2), (0.04, fin, 0.2))]

    def hourglass(q, j):
        r = 0.7 * j(1)
        return [cone(q, (0, 0, -0.45), r, 0.45, up=True), cone(q, (0, 0, 0.45), r, 0.45, up=False)]

    def jack(q, j):
        a, b = 0.9 * j(1), 0.15 * j(1)
        return [box(q, (0, 0, 0), (a, b, b)), box(q, (0, 0, 0), (b, a, b)), box(q, (0, 0, 0), (b, b, a))]

    def l_shape(q, j):
        w = 0.3 * j(1)
        return [box(q, (0, 0, -0.65), (0.85 * j(1), w, 0.22)), box(q, (-0.65, 0, 0.1), (0.22, w, 0.8 * j(1)))]

    def t_shape(q, j):
        return [box(q, (0, 0, -0.2), (0.15 * j(1), 0.15 * j(1), 0.7)), box(q, (0, 0, 0.62), (0.85 * j(1), 0.17, 0.17))]

    def arch(q, j):
        return [box(q, (0, 0, 0), (0.85 * j(1), 0.3 * j(1), 0.7)) & ~cylinder(q, (0, 0, -0.7), 0.5 * j(1), 1.0, axis=1)]

    def saturn(q, j):
        return [sphere(q, (0, 0, 0), 0.45 * j(1)), torus(q, (0, 0, 0), 0.8 * j(1), 0.09 * j(1))]

    def stairs(q, j):
        n, top = 3, 0.85 * j(1)
        step = 2 * top / n
        return [box(q, (-top + step * i + (2 * top - step * i) / 2 - 0.0, 0, -0.9 + step * (i + 1) / 2),
                    ((2 * top - step * i) / 2, 0.5 * j(1), step * (i + 1) / 2)) for i in range(n)]

    def lamp(q, j):
        return [cylinder(q, (0, 0, -0.85), 0.5 * j(1), 0.06), cylinder(q, (0, 0, -0.2), 0.1, 0.62),
                cone(q, (0, 0, 0.6), 0.55 * j(1), 0.3 * j(1))]

    def tube(q, j):
        r, t = 0.75 * j(1), 0.22 * j(1)
        h = 0.8 * j(1)
        return [cylinder(q, (0, 0, 0), r, h) & ~cylinder(q, (0, 0, 0), r - t, h + 0.1)]

    def bowl(q, j):
        r, t = 0.9 * j(1), 0.2 * j(1)
        c = (0, 0, 0.35)
        return [sphere(q, c, r) & ~sphere(q, c, r - t) & (q[:, 2] <= 0.35)]

    return {
        "sphere": lambda q, j: [sphere(q, (0, 0, 0), 0.85 * j(1))],
        "box": lambda q, j: [box(q, (0, 0, 0), (0.75 * j(1), 0.75 * j(1), 0.75 * j(1)))],
        "cylinder": lambda q, j: [cylinder(q, (0, 0, 0), 0.6 * j(1), 0.85 * j(1))],
        "cone": lambda q, j: [cone(q, (0, 0, 0), 0.8 * j(1), 0.85 * j(1))],
        "torus": lambda q, j: [torus(q, (0, 0, 0), 0.65 * j(1), 0.25 * j(1))],
        "capsule": lambda q, j: [capsule(q, (0, 0, -0.5 * j(1)), (0, 0, 0.5 * j(1)), 0.38 * j(1))],
        "disc": lambda q, j: [ellipsoid(q, (0, 0, 0), (0.95 * j(1), 0.7 * j(1), 0.3 * j(1)))],
        "octahedron": lambda q, j: [octahedron(q, (0, 0, 0), 1.0 * j(1))],
        "tube": tube, "bowl": bowl, "table": table, "chair": chair, "dumbbell": dumbbell, "snowman": snowman,
        "mushroom": mushroom, "rocket": rocket, "hourglass": hourglass, "jack": jack, "l_shape": l_shape,
        "t_shape": t_shape, "arch": arch, "saturn": saturn, "stairs": stairs, "lamp": lamp,
    }


CLASSES = _classes()
CLASS_NAMES = tuple(CLASSES)
MAX_PARTS = 6


def _rotation(yaw: float, tilt_x: float, tilt_y: float) -> Tensor:
    cz, sz = math.cos(yaw), math.sin(yaw)
    cx, sx = math.cos(tilt_x), math.sin(tilt_x)
    cy, sy = math.cos(tilt_y), math.sin(tilt_y)
    rz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1.0]])
    rx = torch.tensor([[1.0, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = torch.tensor([[cy, 0, sy], [0, 1.0, 0], [-sy, 0, cy]])
    return ry @ rx @ rz


_GRID: dict[int, Tensor] = {}


def grid_points(res: int = RES) -> Tensor:
    """Voxel centres [res^3, 3] in (-1, 1)^3, index order (x, y, z) as in occ[x, y, z]."""
    if res not in _GRID:
        a = (torch.arange(res, dtype=torch.float32) + 0.5) / res * 2 - 1
        _GRID[res] = torch.stack(torch.meshgrid(a, a, a, indexing="ij"), -1).reshape(-1, 3)
    return _GRID[res]


@dataclass
class ShapeSpec:
    num_classes: int = 24            # the first num_classes of CLASS_NAMES
    jitter: float = 0.2
    scale: tuple[float, float] = (0.62, 0.92)
    tilt: float = 0.15               # radians, max about x and y
    shift: float = 0.06


def make_shape(label: int, rng: np.random.Generator, spec: ShapeSpec, res: int = RES) -> tuple[Tensor, Tensor]:
    """Occupancy [res, res, res] bool and part index [res, res, res] int8 (-1 outside) of one random shape."""
    def j(x):
        return x * (1 + spec.jitter * (2 * rng.random() - 1))

    rot = _rotation(rng.uniform(0, 2 * math.pi), rng.uniform(-spec.tilt, spec.tilt),
                    rng.uniform(-spec.tilt, spec.tilt))
    scale = rng.uniform(*spec.scale)
    shift = torch.tensor(rng.uniform(-spec.shift, spec.shift, 3), dtype=torch.float32)
    q = ((grid_points(res) - shift) @ rot) / scale           # R^T (p - t) / s for row vectors
    parts = CLASSES[CLASS_NAMES[label]](q, j)
    part = torch.full((q.shape[0],), -1, dtype=torch.int8)
    for i in reversed(range(len(parts))):
        part[parts[i]] = i
    occ = part >= 0
    return occ.reshape(res, res, res), part.reshape(res, res, res)


def make_shapes(labels: Tensor, seed: int, spec: ShapeSpec, res: int = RES) -> tuple[Tensor, Tensor]:
    rng = np.random.default_rng(seed)
    occ, part = zip(*(make_shape(int(k), rng, spec, res) for k in labels))
    return torch.stack(occ), torch.stack(part)


def pack(occ: Tensor) -> Tensor:
    """Occupancy [B, 2R, 2R, 2R] -> latent [B, 8, R, R, R] in {-1, +1} (space-to-depth)."""
    b, n = occ.shape[0], occ.shape[1] // 2
    x = occ.float().reshape(b, n, 2, n, 2, n, 2).permute(0, 2, 4, 6, 1, 3, 5).reshape(b, 8, n, n, n)
    return x * 2 - 1


def unpack(latent: Tensor) -> Tensor:
    """Latent [B, 8, R, R, R] -> occupancy [B, 2R, 2R, 2R] bool (depth-to-space, > 0)."""
    b, n = latent.shape[0], latent.shape[2]
    x = latent.reshape(b, 2, 2, 2, n, n, n).permute(0, 4, 1, 5, 2, 6, 3).reshape(b, 2 * n, 2 * n, 2 * n)
    return x > 0


class _ShapeBase:
    def __init__(self, spec: ShapeSpec, model_kw: dict):
        self.spec = spec
        self.model_kw = dict(model_kw)
        self.num_classes = spec.num_classes

    def onehot(self, labels: Tensor) -> Tensor:
        return F.one_hot(labels, self.num_classes).float()

    def _labels(self, n: int, g: torch.Generator) -> tuple[Tensor, int]:
        labels = torch.randint(self.num_classes, (n,), generator=g)
        seed = int(torch.randint(2 ** 62, (1,), generator=g))
        return labels, seed

    def nonfinite_guard(self, x):
        if isinstance(x, SparseTensor):
            return x.replace(torch.nan_to_num(x.feats, nan=0.0, posinf=1e3, neginf=-1e3))
        return torch.nan_to_num(x, nan=0.0, posinf=1e3, neginf=-1e3)


class ShapesProblem(_ShapeBase):
    """Dense SS-like problem: [8, 16, 16, 16] packed occupancy latents, class-conditional SS flow."""

    name = "shapes"
    metrics_lower_is_better = {"cov_iou_data": False, "mmd_iou_data": True, "mmd_cd_data": True, "fd_data": True,
                               "cov_iou_teacher": False, "mmd_iou_teacher": True, "mmd_cd_teacher": True,
                               "fd_teacher": True, "pair_iou_teacher": False}

    def __init__(self, spec: ShapeSpec, model_kw: dict | None = None):
        super().__init__(spec, model_kw or {})
        self.features = OccupancyFeatureNet(seed=7)

    def build_model(self, seed: int = 0):
        return ss_flow(self.num_classes, seed=seed, **self.model_kw)

    def train_batch(self, n: int, g: torch.Generator) -> dict:
        labels, seed = self._labels(n, g)
        occ, _ = make_shapes(labels, seed, self.spec)
        return {"x0": pack(occ), "cond": self.onehot(labels)}

    def eval_set(self, n_per_class: int, seed: int) -> dict:
        labels = torch.arange(self.num_classes).repeat_interleave(n_per_class)
        occ, _ = make_shapes(labels, 10_000 + seed, self.spec)
        return {"labels": labels, "cond": self.onehot(labels), "data": occ,
                "data_points": surface_points(occ), "data_feats": self.features(occ)}

    def noise(self, es: dict, seed: int) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(es["labels"].shape[0], 8, 16, 16, 16, generator=g)

    def data_as_sample(self, es: dict) -> Tensor:
        return pack(es["data"])

    def class_mean_sample(self, es: dict) -> Tensor:
        """The reference collapsed sampler: every sample of a class is the mean latent of that class's shapes."""
        lat, labels = pack(es["data"]), es["labels"]
        means = torch.stack([lat[labels == c].mean(0) for c in range(self.num_classes)])
        return means[labels]

    def decode(self, x: Tensor) -> Tensor:
        return unpack(x)

    def reference(self, x: Tensor, parts=("points", "feats")) -> dict:
        """Decoded occupancy plus the requested derived structures: surface points (Chamfer) and features (FD)."""
        occ = unpack(x)
        out = {"occ": occ}
        if "points" in parts:
            out["points"] = surface_points(occ)
        if "feats" in parts:
            out["feats"] = self.features(occ)
        return out

    def evaluate(self, x: Tensor, es: dict, ref_teacher: dict, paired_teacher: dict | None,
                 metrics=None) -> dict:
        """All metrics, or only those named in `metrics` (each computed exactly as in the full evaluation)."""
        wanted = wanted_metrics(self.metrics_lower_is_better, metrics)
        gen = self.reference(x, parts=[p for p, prefix in (("points", "mmd_cd_"), ("feats", "fd_"))
                                       if any(k.startswith(prefix) for k in wanted)])
        labels = es["labels"]
        out = {}
        refs = {"data": {"occ": es["data"], "points": es["data_points"], "feats": es["data_feats"]},
                "teacher": ref_teacher}
        classes = [(labels == c).nonzero().squeeze(1).tolist() for c in range(self.num_classes)]
        for name, ref in refs.items():
            if wanted & {f"cov_iou_{name}", f"mmd_iou_{name}"}:
                iou_blocks = [1 - iou_matrix(ref["occ"][m], gen["occ"][m]) for m in classes]
                out[f"cov_iou_{name}"], out[f"mmd_iou_{name}"] = grouped_coverage_mmd(iou_blocks)
            if f"mmd_cd_{name}" in wanted:
                cd_blocks = [chamfer_matrix([ref["points"][i] for i in m], [gen["points"][i] for i in m])
                             for m in classes]
                out[f"mmd_cd_{name}"] = grouped_coverage_mmd(cd_blocks)[1]
            if f"fd_{name}" in wanted:
                out[f"fd_{name}"] = frechet_distance(gen["feats"], ref["feats"])
        if "pair_iou_teacher" in wanted and paired_teacher is not None:
            a = gen["occ"].reshape(len(labels), -1).float()
            b = paired_teacher["occ"].reshape(len(labels), -1).float()
            inter = (a * b).sum(1)
            union = a.sum(1) + b.sum(1) - inter
            out["pair_iou_teacher"] = float(torch.where(union > 0, inter / union.clamp(min=1), 1.0).mean())
        elif "pair_iou_teacher" in wanted:
            out["pair_iou_teacher"] = 1.0
        return {k: out[k] for k in self.metrics_lower_is_better if k in wanted}


# ---- sparse (SLat-like) variant ------------------------------------------------------------------------------
def voxel_features(occ: Tensor, part: Tensor, labels: Tensor, signs: Tensor, palette: Tensor) -> SparseTensor:
    """SparseTensor of the boundary voxels of each shape with 8 feature channels (see module docstring)."""
    b, res = occ.shape[0], occ.shape[-1]
    surf = boundary(occ)
    smooth = F.avg_pool3d(F.pad(occ.float().unsqueeze(1), (1,) * 6, mode="replicate"), 3, 1).squeeze(1)
    grad = torch.stack(torch.gradient(smooth, dim=(1, 2, 3)), -1)            # [B, R, R, R, 3]
    coords, feats = [], []
    for i in range(b):
        idx = surf[i].nonzero()
        n = -grad[i][idx[:, 0], idx[:, 1], idx[:, 2]]
        n = n / n.norm(dim=1, keepdim=True).clamp(min=1e-6)
        pid = part[i][idx[:, 0], idx[:, 1], idx[:, 2]].long().clamp(min=0)
        colour = palette[labels[i], pid] * signs[i]
        pos = (idx.float() + 0.5) / res * 2 - 1
        centre = pos.mean(0, keepdim=True)
        z = pos[:, 2:3] * 1.5
        radial = (pos - centre).norm(dim=1, keepdim=True) * 2 - 1
        feats.append(torch.cat([n, colour, z, radial], 1))
        coords.append(torch.cat([torch.full((idx.shape[0], 1), i), idx], 1))
    return SparseTensor(torch.cat(feats).float(), torch.cat(coords).int(), batch_size=b)


class SparseShapesProblem(_ShapeBase):
    """SLat-like problem: per-voxel features on the boundary voxels of the shapes, class-conditional SLat flow."""

    name = "shapes_sparse"
    metrics_lower_is_better = {"mse_geo_data": True, "fd_stats_data": True, "colour_coherence": False,
                               "mse_teacher": True}

    def __init__(self, spec: ShapeSpec, model_kw: dict | None = None, world_seed: int = 99):
        super().__init__(spec, model_kw or {})
        # the voxel grid of the shapes is the flow's resolution (model "resolution", default RES)
        self.res = int(self.model_kw.pop("resolution", RES))
        g = torch.Generator().manual_seed(world_seed)
        self.palette = torch.rand(spec.num_classes, MAX_PARTS, 3, generator=g) * 1.6 - 0.8

    def build_model(self, seed: int = 0):
        return slat_flow(self.num_classes, resolution=self.res, seed=seed, **self.model_kw)

    def _batch(self, labels: Tensor, seed: int) -> SparseTensor:
        occ, part = make_shapes(labels, seed, self.spec, self.res)
        g = torch.Generator().manual_seed(seed % (2 ** 31))
        signs = torch.randint(0, 2, (len(labels),), generator=g).float() * 2 - 1
        return voxel_features(occ, part, labels, signs, self.palette)

    def train_batch(self, n: int, g: torch.Generator) -> dict:
        labels, seed = self._labels(n, g)
        return {"x0": self._batch(labels, seed), "cond": self.onehot(labels)}

    def eval_set(self, n_per_class: int, seed: int) -> dict:
        labels = torch.arange(self.num_classes).repeat_interleave(n_per_class)
        data = self._batch(labels, 10_000 + seed)
        return {"labels": labels, "cond": self.onehot(labels), "data": data}

    def noise(self, es: dict, seed: int) -> SparseTensor:
        g = torch.Generator().manual_seed(seed)
        d = es["data"]
        return d.replace(torch.randn(d.feats.shape, generator=g))

    def class_mean_sample(self, es: dict) -> SparseTensor:
        """The reference collapsed sampler: every voxel of a class's shapes gets the class's mean feature vector."""
        data, labels = es["data"], es["labels"]
        vox_label = labels[data.coords[:, 0].long()]
        means = torch.stack([data.feats[vox_label == c].mean(0) for c in range(self.num_classes)])
        return data.replace(means[vox_label])

    def data_as_sample(self, es: dict) -> SparseTensor:
        """Held-out data scored like a sample (the finite-sample floor). It lives on its own coordinates, so only
        the coordinate-free metrics (fd_stats_data, colour_coherence) are defined for it (see `evaluate`)."""
        return es["data"]

    def reference(self, x: SparseTensor) -> dict:
        return {"x": x, "stats": self._stats(x)}

    @staticmethod
    def _stats(x: SparseTensor) -> Tensor:
        rows = []
        for sl in x.layout:
            f = x.feats[sl].double()
            colour = f[:, 3:6]
            rows.append(torch.cat([f.mean(0), f.std(0), colour.abs().mean(0)]))
        return torch.stack(rows)

    def colour_coherence(self, x: SparseTensor, labels: Tensor) -> float:
        """Mean over shapes of |mean over its voxels of s|, s = the sign of the nearest of the class's signed palette
        colours {+-palette[label, k]}: 1 = one consistent sign per shape (as in the data), ~0 = voxels of both signs
        (e.g. a sample that averages the two modes). Coordinate-free: needs neither the part map nor the data."""
        coh = []
        for i, sl in enumerate(x.layout):
            pal = self.palette[labels[i]]                                            # [P, 3]
            cands = torch.cat([pal, -pal])                                           # [2P, 3]
            near = torch.cdist(x.feats[sl, 3:6].float(), cands).argmin(1)
            s = torch.where(near < pal.shape[0], 1.0, -1.0)
            coh.append(float(s.mean().abs()))
        return float(np.mean(coh))

    def evaluate(self, x: SparseTensor, es: dict, ref_teacher: dict, paired_teacher: dict | None,
                 metrics=None) -> dict:
        """All metrics, or only those named in `metrics` (all are cheap here: computed, then selected)."""
        wanted = wanted_metrics(self.metrics_lower_is_better, metrics)
        data = es["data"]
        out = {"fd_stats_data": frechet_distance(self._stats(x), self._stats(data)),
               "colour_coherence": self.colour_coherence(x, es["labels"])}
        if not torch.equal(x.coords, data.coords):
            # held-out data on other coordinates (the floor): no per-voxel comparison is defined
            return {k: v for k, v in out.items() if k in wanted}
        geo = [0, 1, 2, 6, 7]
        out["mse_geo_data"] = float((x.feats[:, geo] - data.feats[:, geo]).pow(2).mean())
        if paired_teacher is not None:
            out["mse_teacher"] = float((x.feats - paired_teacher["x"].feats).pow(2).mean())
        else:
            out["mse_teacher"] = 0.0
        return {k: v for k, v in out.items() if k in wanted}
