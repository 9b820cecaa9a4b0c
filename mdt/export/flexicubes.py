"""FlexiCubes isosurface extraction (Shen et al., "Flexible Isosurface Extraction for Gradient-Based Mesh
Optimization", SIGGRAPH 2023) and TRELLIS's mesh-decoder hand-off, in plain torch (CPU and GPU alike).

The method, as the paper describes it: a Dual-Marching-Cubes mesh whose vertices are placed by learned weights.

* Grid vertices carry a scalar field s (negative = inside) and a (deformed) position x. Each cube carries
  12 edge weights β, 8 corner weights α and one split weight γ; all are positive (raw values pass through
  1 ± 0.99·tanh, γ through a sigmoid into (0.005, 0.995)).
* Every cube edge whose end values change sign carries a crossing point, interpolated with the α-scaled values:
  u = (α_j s_j x_i − α_i s_i x_j) / (α_j s_j − α_i s_i).
* Inside one cube, the crossing edges fall into one or more surface patches (connected pieces of the surface in
  that cube). Each patch gets one dual vertex at the β-weighted mean of its edges' crossing points.
* Every grid edge with a sign change is surrounded by 4 cubes; their dual vertices for that edge make a quad,
  oriented so that its normal points from the inside end of the edge to the outside end. Quads are split into
  two triangles along the diagonal whose endpoints have the larger product of γ.

Patches are found by walking the faces of the cube: on a face with two crossing edges the surface curve joins
them; on an ambiguous face (four crossings) each inside corner is cut off on its own. Both cubes sharing a face
see the same values and apply the same rule, so the result is topologically consistent.

Everything is sparse: only the cubes given are processed, and grid vertices are the unique corner positions of
those cubes; memory is linear in the number of cubes. The dense 257³ grid TRELLIS builds is not materialised.

Corner k of a cube sits at offset (k & 1, (k >> 1) & 1, (k >> 2) & 1) (x fastest); the 12 edges are the corner
pairs of `CUBE_EDGES`, the order of the 12 β weights. [The correspondence of this order with TRELLIS's released
mesh decoder channels is the FlexiCubes convention as we understand it; it only matters for real weights.]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

CORNER_OFFSETS = torch.tensor([[k & 1, (k >> 1) & 1, (k >> 2) & 1] for k in range(8)], dtype=torch.long)
CUBE_EDGES = ((0, 1), (1, 5), (4, 5), (0, 4), (2, 3), (3, 7), (6, 7), (2, 6), (2, 0), (3, 1), (7, 5), (6, 4))
# Corner cycles of the six faces (consecutive corners share a cube edge).
CUBE_FACES = ((0, 1, 3, 2), (4, 5, 7, 6), (0, 1, 5, 4), (2, 3, 7, 6), (0, 2, 6, 4), (1, 3, 7, 5))
WEIGHT_SCALE = 0.99


def _edge_index() -> dict[frozenset, int]:
    return {frozenset(e): i for i, e in enumerate(CUBE_EDGES)}


def _patch_table() -> Tensor:
    """[256, 12] long: for each inside-corner code (bit k = corner k inside) the patch id of every edge, −1 where
    the edge has no sign change."""
    edge_of = _edge_index()
    table = torch.full((256, 12), -1, dtype=torch.long)
    for code in range(256):
        inside = [(code >> k) & 1 for k in range(8)]
        crossing = [inside[a] != inside[b] for a, b in CUBE_EDGES]
        parent = list(range(12))

        def find(i):
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        def union(i, j):
            parent[find(i)] = find(j)

        for face in CUBE_FACES:
            ring = [edge_of[frozenset((face[i], face[(i + 1) % 4]))] for i in range(4)]
            cut = [e for e in ring if crossing[e]]
            if len(cut) == 2:
                union(cut[0], cut[1])
            elif len(cut) == 4:  # ambiguous face: separate the two inside corners
                for i, corner in enumerate(face):
                    if inside[corner]:
                        union(ring[i - 1], ring[i])  # the two face edges that meet at this corner
        ids: dict[int, int] = {}
        for e in range(12):
            if crossing[e]:
                table[code, e] = ids.setdefault(find(e), len(ids))
    return table


PATCH_TABLE = _patch_table()
# Per local edge: the axis it runs along and the offsets of its lower corner on the two other axes (a, b, c cyclic).
_EDGE_LOW = []
_EDGE_AXIS = []
_EDGE_SLOT = []
for _i, _j in CUBE_EDGES:
    _oi, _oj = CORNER_OFFSETS[_i], CORNER_OFFSETS[_j]
    _axis = int(torch.nonzero(_oi != _oj)[0])
    _low = _i if _oi[_axis] < _oj[_axis] else _j
    _ob, _oc = int(CORNER_OFFSETS[_low][(_axis + 1) % 3]), int(CORNER_OFFSETS[_low][(_axis + 2) % 3])
    _EDGE_LOW.append(_low)
    _EDGE_AXIS.append(_axis)
    # Position of the cube around the edge, counter-clockwise seen from +axis: the cube lies at −(ob, oc).
    _EDGE_SLOT.append({(0, 0): 0, (1, 0): 1, (1, 1): 2, (0, 1): 3}[(_ob, _oc)])
EDGE_LOW_CORNER = torch.tensor(_EDGE_LOW)
EDGE_AXIS = torch.tensor(_EDGE_AXIS)
EDGE_SLOT = torch.tensor(_EDGE_SLOT)
EDGE_CORNERS = torch.tensor(CUBE_EDGES)


@dataclass
class MeshData:
    """A triangle mesh with optional per-vertex attributes (for TRELLIS: RGB + normal, 6 channels)."""

    vertices: Tensor            # [V, 3] float
    faces: Tensor               # [F, 3] long
    attributes: Tensor | None = None   # [V, K]

    @property
    def num_faces(self) -> int:
        return int(self.faces.shape[0])


def flexicubes(vertices: Tensor, scalar: Tensor, cubes: Tensor, beta: Tensor | None = None,
               alpha: Tensor | None = None, gamma: Tensor | None = None,
               attributes: Tensor | None = None) -> MeshData:
    """Extract the s = 0 surface.

    vertices [V, 3] grid-vertex positions (possibly deformed); scalar [V] (negative inside); cubes [C, 8] vertex
    indices per cube in corner order (`CORNER_OFFSETS`); beta [C, 12], alpha [C, 8], gamma [C] raw weights (None:
    all zero, i.e. plain Dual Marching Cubes with linear crossings); attributes [V, K] interpolated like positions.
    """
    device = vertices.device
    n_cubes = cubes.shape[0]
    beta = torch.tanh(beta) * WEIGHT_SCALE + 1 if beta is not None else vertices.new_ones(n_cubes, 12)
    alpha = torch.tanh(alpha) * WEIGHT_SCALE + 1 if alpha is not None else vertices.new_ones(n_cubes, 8)
    gamma = (torch.sigmoid(gamma) * WEIGHT_SCALE + (1 - WEIGHT_SCALE) / 2 if gamma is not None
             else vertices.new_ones(n_cubes))
    k = 0 if attributes is None else attributes.shape[1]
    empty = MeshData(vertices.new_zeros(0, 3), torch.zeros(0, 3, dtype=torch.long, device=device),
                     None if attributes is None else vertices.new_zeros(0, k))

    inside = scalar < 0
    pow2 = 2 ** torch.arange(8, device=device)
    code = (inside[cubes].long() * pow2).sum(1)
    surface = (code > 0) & (code < 255)
    if not bool(surface.any()):
        return empty
    cubes, code = cubes[surface], code[surface]
    beta, alpha, gamma = beta[surface], alpha[surface], gamma[surface]
    patch = PATCH_TABLE.to(device)[code]                       # [S, 12]
    crossing = patch >= 0

    # Crossing points of all (cube, edge) pairs with a sign change.
    ec = EDGE_CORNERS.to(device)
    vi, vj = cubes[:, ec[:, 0]], cubes[:, ec[:, 1]]            # [S, 12] vertex ids
    si = scalar[vi] * alpha[:, ec[:, 0]]
    sj = scalar[vj] * alpha[:, ec[:, 1]]
    denom = sj - si
    denom = torch.where(denom.abs() < 1e-12, torch.full_like(denom, 1e-12), denom)
    wi, wj = (sj / denom), (-si / denom)                       # u = wi·x_i + wj·x_j, wi + wj = 1
    feats = vertices if attributes is None else torch.cat([vertices, attributes.to(vertices.dtype)], 1)
    u = wi.unsqueeze(-1) * feats[vi] + wj.unsqueeze(-1) * feats[vj]          # [S, 12, 3 + K]

    # Dual vertices: β-weighted mean per (cube, patch).
    n_surface = cubes.shape[0]
    slot = torch.arange(n_surface, device=device).unsqueeze(1) * 4 + patch.clamp(min=0)   # [S, 12]
    w = beta * crossing
    sums = feats.new_zeros(n_surface * 4, feats.shape[1]).index_add_(
        0, slot[crossing], (u * w.unsqueeze(-1))[crossing])
    wsum = feats.new_zeros(n_surface * 4).index_add_(0, slot[crossing], w[crossing])
    used = wsum > 0
    dual_id = torch.cumsum(used.long(), 0) - 1
    dual = sums[used] / wsum[used].unsqueeze(1)
    dual_gamma = gamma.repeat_interleave(4)[used]

    # Quads around every crossing grid edge: key = (lower vertex id, axis); ring slot from the local edge.
    low_vertex = cubes[:, EDGE_LOW_CORNER.to(device)]           # [S, 12]
    key = low_vertex * 3 + EDGE_AXIS.to(device)
    key, ring, dv = key[crossing], EDGE_SLOT.to(device).expand_as(patch)[crossing], dual_id[slot[crossing]]
    uniq, inverse = torch.unique(key, return_inverse=True)
    quads = torch.full((uniq.shape[0], 4), -1, dtype=torch.long, device=device)
    quads[inverse, ring] = dv
    complete = (quads >= 0).all(1)
    quads, edge_key = quads[complete], uniq[complete]
    if quads.shape[0] == 0:
        return empty
    # Orientation: counter-clockwise around +axis when the lower end is inside (normal towards +axis).
    flip = ~inside[edge_key // 3]
    quads = torch.where(flip.unsqueeze(1), quads.flip(1), quads)
    g = dual_gamma[quads]
    split02 = g[:, 0] * g[:, 2] >= g[:, 1] * g[:, 3]
    tri_a = torch.where(split02.unsqueeze(1), quads[:, [0, 1, 2]], quads[:, [0, 1, 3]])
    tri_b = torch.where(split02.unsqueeze(1), quads[:, [0, 2, 3]], quads[:, [1, 2, 3]])
    faces = torch.cat([tri_a, tri_b], 0)

    # Keep only dual vertices that are used by a face, renumbered.
    keep = torch.zeros(dual.shape[0], dtype=torch.bool, device=device)
    keep[faces.reshape(-1)] = True
    remap = torch.cumsum(keep.long(), 0) - 1
    dual = dual[keep]
    faces = remap[faces]
    return MeshData(dual[:, :3].contiguous(), faces,
                    None if attributes is None else dual[:, 3:].contiguous())


# ------------------------------------------------------------------------------------------------------------
# TRELLIS mesh-decoder output -> FlexiCubes inputs
# ------------------------------------------------------------------------------------------------------------

def sparse_cube_grid(coords: Tensor, resolution: int, dilate: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Cubes at integer coords [N, 3] (and, with `dilate`, every cube sharing a vertex with them) ->
    (all cube coords [C, 3], index of each given cube in them [N], unique vertex keys [V], cube vertex ids [C, 8]).

    Dilation reproduces a dense grid's behaviour where the given cubes end: the neighbouring cubes exist there
    with their non-shared corners outside (+1), so surfaces close at the border of the given region."""
    device = coords.device
    coords = coords.long()
    r1 = resolution + 1

    def cube_key(c):
        return (c[:, 0] * resolution + c[:, 1]) * resolution + c[:, 2]

    if dilate:
        nb = torch.stack(torch.meshgrid(*[torch.arange(-1, 2, device=device)] * 3, indexing="ij"), -1).reshape(-1, 3)
        cand = (coords.unsqueeze(1) + nb.unsqueeze(0)).reshape(-1, 3)
        cand = cand[((cand >= 0) & (cand < resolution)).all(1)]
        all_keys = torch.unique(torch.cat([cube_key(coords), cube_key(cand)]))
    else:
        all_keys = torch.unique(cube_key(coords))
    all_coords = torch.stack([all_keys // (resolution * resolution), (all_keys // resolution) % resolution,
                              all_keys % resolution], 1)
    given = torch.searchsorted(all_keys, cube_key(coords))
    corners = all_coords.unsqueeze(1) + CORNER_OFFSETS.to(device).unsqueeze(0)        # [C, 8, 3]
    vkey = (corners[..., 0] * r1 + corners[..., 1]) * r1 + corners[..., 2]
    vkeys, cube_vertices = torch.unique(vkey.reshape(-1), return_inverse=True)
    return all_coords, given, vkeys, cube_vertices.reshape(-1, 8)


def mesh_from_decoder_output(coords: Tensor, feats: Tensor, resolution: int) -> MeshData:
    """One sample of the SLat mesh decoder -> mesh in [−0.5, 0.5]³ (TRELLIS §2.8).

    coords [N, 3] voxel coords at `resolution` (4 × the SLat grid); feats [N, 101] (or 53 without colour):
    8 corner SDF values, 8×3 deformations, 21 weights (12 β, 8 α, 1 γ), 8×6 colour+normal. The SDF gets a
    −1/resolution bias; corner values shared by several voxels are averaged; grid vertices no voxel touches are
    outside (+1) and undeformed; vertices sit at v/R − 0.5 + (1 − 1e-8)/(2R)·tanh(deform)."""
    feats = feats.float()
    n = feats.shape[0]
    sdf = feats[:, 0:8] - 1.0 / resolution
    deform = feats[:, 8:32].reshape(n, 8, 3)
    weights = feats[:, 32:53]
    color = feats[:, 53:101].reshape(n, 8, 6) if feats.shape[1] >= 101 else None

    all_coords, given, vkeys, cube_vertices = sparse_cube_grid(coords, resolution)
    v = vkeys.shape[0]
    vid = cube_vertices[given].reshape(-1)                                    # [N·8]
    count = feats.new_zeros(v).index_add_(0, vid, feats.new_ones(vid.shape[0]))
    present = count > 0
    denom = count.clamp(min=1)
    scalar = feats.new_zeros(v).index_add_(0, vid, sdf.reshape(-1)) / denom
    scalar = torch.where(present, scalar, torch.ones_like(scalar))
    dvert = feats.new_zeros(v, 3).index_add_(0, vid, deform.reshape(-1, 3)) / denom.unsqueeze(1)
    r1 = resolution + 1
    grid = torch.stack([vkeys // (r1 * r1), (vkeys // r1) % r1, vkeys % r1], 1).to(feats.dtype)
    positions = grid / resolution - 0.5 + (1 - 1e-8) / (2 * resolution) * torch.tanh(dvert)
    attrs = None
    if color is not None:
        attrs = feats.new_zeros(v, 6).index_add_(0, vid, color.reshape(-1, 6)) / denom.unsqueeze(1)
    c = all_coords.shape[0]
    cube_weights = feats.new_zeros(c, 21)
    cube_weights[given] = weights
    return flexicubes(positions, scalar, cube_vertices, beta=cube_weights[:, :12], alpha=cube_weights[:, 12:20],
                      gamma=cube_weights[:, 20], attributes=attrs)


def dense_grid_flexicubes(scalar: Tensor, resolution: int, attributes: Tensor | None = None) -> MeshData:
    """Plain (unweighted, undeformed) extraction on a dense grid: scalar [(R+1)³] at vertices v/R − 0.5, x-major
    index (x·(R+1) + y)·(R+1) + z. Used for analytic checks and for coarse meshes of a scalar field."""
    device = scalar.device
    r1 = resolution + 1
    idx = torch.arange(r1, device=device)
    grid = torch.stack(torch.meshgrid(idx, idx, idx, indexing="ij"), -1).reshape(-1, 3)
    positions = grid.to(torch.float32) / resolution - 0.5
    cidx = torch.arange(resolution, device=device)
    cube = torch.stack(torch.meshgrid(cidx, cidx, cidx, indexing="ij"), -1).reshape(-1, 3)
    corners = cube.unsqueeze(1) + CORNER_OFFSETS.to(device).unsqueeze(0)
    cube_vertices = (corners[..., 0] * r1 + corners[..., 1]) * r1 + corners[..., 2]
    return flexicubes(positions, scalar.float(), cube_vertices, attributes=attributes)
