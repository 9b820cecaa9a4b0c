"""TRELLIS.2's flow transformers: the dense sparse-structure flow and the sparse structured-latent flows (shape,
and texture with the shape latent concatenated to its input).

Same checkpoint json `name`s as TRELLIS (`SparseStructureFlowModel`, `SLatFlowModel`, `ElasticSLatFlowModel`);
the args tell the families apart (`is_trellis2_args`). Compared with TRELLIS: no patching and no sparse
convolutions (linear in → transformer → layer norm → linear out), 3-D RoPE on voxel coordinates instead of an
absolute embedding, one shared adaLN MLP plus a learned per-block 6C `modulation` bias, and the torso stored in
`dtype` (the released checkpoints: bfloat16 linears inside `blocks`; embedders, input/output layers, norms,
qk-RMS gains and `modulation` float32).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mdt.sparse import SparseTensor
from mdt.sparse.nn import SparseLinear

from .base import TrellisModule
from .blocks import ModulatedTransformerCrossBlock, TimestepEmbedder, feats_of

TORSO_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16}
# Args only TRELLIS.2's flow constructors take; `pe_mode: rope` is TRELLIS.2's alone as well.
TRELLIS2_ONLY_ARGS = ("dtype", "initialization", "rope_freq")


def is_trellis2_args(args: dict) -> bool:
    """True for a TRELLIS.2 flow json's args: RoPE, or an argument TRELLIS's flows do not have."""
    return args.get("pe_mode") == "rope" or any(k in args for k in TRELLIS2_ONLY_ARGS)


def rope_phases(coords: Tensor, head_dim: int, freq: tuple[float, float] = (1.0, 10000.0)) -> Tensor:
    """Unit complex phases of 3-D RoPE for integer positions coords [N, 3] -> complex64 [N, head_dim // 2].

    f = head_dim // 6 frequencies per axis, ω_j = freq[0] / freq[1]^(j / f); the layout is [x·ω | y·ω | z·ω],
    padded with phase 0 (no rotation) up to head_dim / 2 pairs (128 → 3·21 = 63 rotated pairs + 1 untouched).
    """
    n_freq = head_dim // 2 // 3
    omega = freq[0] / freq[1] ** (torch.arange(n_freq, dtype=torch.float32, device=coords.device) / n_freq)
    angles = (coords.float()[:, :, None] * omega).reshape(coords.shape[0], 3 * n_freq)
    angles = F.pad(angles, (0, head_dim // 2 - angles.shape[1]))
    return torch.polar(torch.ones_like(angles), angles)


class Trellis2FlowBase(TrellisModule):
    """What the three TRELLIS.2 flows share: embedders, the transformer torso, its dtype and its initialisation."""

    TORSO = ("blocks",)
    CHECKPOINT_NAME = ""          # the json `name`, shared with the TRELLIS class of the same role
    GUIDANCE_FORM = "trellis2"    # w·v(cond) + (1 − w)·v(neg_cond): `mdt.flow.trellis2_guided_velocity`

    def __init__(self, resolution: int, in_channels: int, model_channels: int, cond_channels: int,
                 out_channels: int, num_blocks: int, num_heads: int | None = None, num_head_channels: int = 64,
                 mlp_ratio: float = 4, pe_mode: str = "rope", rope_freq: tuple[float, float] = (1.0, 10000.0),
                 dtype: str = "float32", use_checkpoint: bool = False, share_mod: bool = False,
                 initialization: str = "vanilla", qk_rms_norm: bool = False, qk_rms_norm_cross: bool = False):
        super().__init__()
        if pe_mode != "rope":
            raise ValueError(f"TRELLIS.2 flows use pe_mode 'rope', got {pe_mode!r}")
        if dtype not in TORSO_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(TORSO_DTYPES)}, got {dtype!r}")
        if initialization not in ("vanilla", "scaled"):
            raise ValueError(f"initialization must be 'vanilla' or 'scaled', got {initialization!r}")
        self.resolution, self.in_channels, self.out_channels = resolution, in_channels, out_channels
        self.model_channels, self.num_blocks = model_channels, num_blocks
        self.num_heads = num_heads or model_channels // num_head_channels
        self.head_dim = model_channels // self.num_heads
        self.rope_freq = tuple(float(f) for f in rope_freq)
        self.use_checkpoint, self.share_mod, self.initialization = use_checkpoint, share_mod, initialization
        self.published_torso_dtype = TORSO_DTYPES[dtype]
        self.use_fp16 = self.published_torso_dtype != torch.float32   # "published torso is half precision"
        self.t_embedder = TimestepEmbedder(model_channels)
        if share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels, 6 * model_channels))
        self.input_layer = self.linear(in_channels, model_channels)
        self.blocks = nn.ModuleList([
            ModulatedTransformerCrossBlock(model_channels, cond_channels, self.num_heads, mlp_ratio, share_mod,
                                           qk_rms_norm, qk_rms_norm_cross, mod_bias=True)
            for _ in range(num_blocks)])
        self.out_layer = self.linear(model_channels, out_channels)
        self.initialize_weights()
        self.convert_to_fp16()

    linear = nn.Linear

    def initialize_weights(self) -> None:
        """TRELLIS.2's from-scratch init. "scaled": N(0, 2/(5C)) linears, N(0, 1/(5·blocks·C)) for the attention
        and MLP output projections, N(0, 1/Cin) input layer; both: N(0, 0.02) time MLP, zero adaLN and output."""
        c = self.model_channels
        for m in self.modules():
            if isinstance(m, nn.Linear):
                if self.initialization == "scaled":
                    nn.init.normal_(m.weight, std=math.sqrt(2.0 / (5.0 * c)))
                else:
                    nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.initialization == "scaled":
            for block in self.blocks:
                for m in (block.self_attn.to_out, block.cross_attn.to_out, block.mlp.mlp[2]):
                    nn.init.normal_(m.weight, std=1.0 / math.sqrt(5 * self.num_blocks * c))
            nn.init.normal_(self.input_layer.weight, std=1.0 / math.sqrt(self.in_channels))
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        adaln = [self.adaLN_modulation[-1]] if self.share_mod else [b.adaLN_modulation[-1] for b in self.blocks]
        for layer in (*adaln, self.out_layer):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # ---- dtype layout: TRELLIS's fp16 machinery with the torso dtype from `dtype` ---------------------------------
    def convert_to(self, dtype: torch.dtype) -> None:
        """Store and run the torso in `dtype` from now on (TRELLIS.2's `convert_to`; bfloat16 for its release)."""
        self.published_torso_dtype = dtype
        self.use_fp16 = dtype != torch.float32
        self.trellis_args["dtype"] = str(dtype).removeprefix("torch.")    # what a saved json then says
        self.convert_to_fp16()

    def convert_to_fp16(self) -> None:
        """Torso linears to the published torso dtype (bfloat16 for the released checkpoints)."""
        for _, module in self.torso_primitives():
            module.to(self.published_torso_dtype)

    def published_dtypes(self) -> dict[str, torch.dtype]:
        dtypes = {k: v.dtype if v.is_complex() else torch.float32 for k, v in self.state_dict().items()}
        for name, module in self.torso_primitives():
            for p_name, _ in module.named_parameters(recurse=False):
                dtypes[f"{name}.{p_name}"] = self.published_torso_dtype
        return dtypes

    def computed_buffers(self) -> dict[str, Tensor]:
        """State-dict entries computed from the config (a checkpoint may carry them or not)."""
        return {}

    # ---- torso --------------------------------------------------------------------------------------------------
    def modulation_input(self, t: Tensor) -> Tensor:
        """t [B] (×1000) -> [B, 6C] shared modulation (share_mod) or [B, C] time embedding, float32."""
        t_emb = self.t_embedder(t)
        return self.adaLN_modulation(t_emb) if self.share_mod else t_emb

    def run_blocks(self, h, mod: Tensor, cond: Tensor, phases: Tensor):
        """h: [B, L, C] tokens or a SparseTensor, already in the torso dtype."""
        checkpointing = self.use_checkpoint and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if checkpointing and isinstance(h, SparseTensor):
                feats = torch.utils.checkpoint.checkpoint(
                    lambda f, blk=block, base=h: blk(base.replace(f), mod, cond, phases).feats, h.feats,
                    use_reentrant=False)
                h = h.replace(feats)
            elif checkpointing:
                h = torch.utils.checkpoint.checkpoint(block, h, mod, cond, phases, use_reentrant=False)
            else:
                h = block(h, mod, cond, phases)
        return h


class Trellis2SparseStructureFlowModel(Trellis2FlowBase):
    """TRELLIS.2 stage 1. x [B, Cin, R, R, R], t [B] (×1000), cond [B, T, Cc] -> velocity [B, Cout, R, R, R].

    Every voxel of the R³ grid is a token (no patching); `rope_phases` [R³, head_dim/2] is computed from the grid.
    """

    CHECKPOINT_NAME = "SparseStructureFlowModel"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("rope_phases", self.grid_phases())

    def grid_phases(self) -> Tensor:
        r = self.resolution
        axes = [torch.arange(r, device=self.t_embedder.mlp[0].weight.device)] * 3
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)   # x-major voxel order
        return rope_phases(grid, self.head_dim, self.rope_freq)

    def computed_buffers(self) -> dict[str, Tensor]:
        return {"rope_phases": self.grid_phases()}

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        b, r = x.shape[0], self.resolution
        if tuple(x.shape[1:]) != (self.in_channels, r, r, r):
            raise ValueError(f"expected x [B, {self.in_channels}, {r}, {r}, {r}], got {tuple(x.shape)}")
        h = self.input_layer(x.reshape(b, self.in_channels, -1).transpose(1, 2))    # [B, R³, C]
        mod = self.modulation_input(t)
        dtype = self.dtype
        phases = self.rope_phases
        if not phases.is_complex():  # a module-wide .to(<real dtype>) drops the imaginary part: recompute
            phases = self.grid_phases().to(h.device)
        h = self.run_blocks(h.to(dtype), mod.to(dtype), cond.to(dtype), phases)
        h = F.layer_norm(h.to(x.dtype), h.shape[-1:])
        h = self.out_layer(h)                                                         # [B, R³, Cout]
        return h.transpose(1, 2).reshape(b, self.out_channels, r, r, r)


class Trellis2SLatFlowModel(Trellis2FlowBase):
    """TRELLIS.2 stages 2 (shape) and 3 (texture). x SparseTensor feats [N, Cx] at coords [N, 4], t [B] (×1000),
    cond [B, T, Cc]; concat_cond (texture: the normalised shape latent on x's coords, [N, Cs]) is concatenated
    to x's channels, Cx + Cs = in_channels. Returns the velocity [N, Cout] on x's coords."""

    CHECKPOINT_NAME = "SLatFlowModel"
    linear = SparseLinear
    _bound_concat: Tensor | None = None

    @contextlib.contextmanager
    def bound_concat_cond(self, feats: Tensor | None):
        """Within the block, calls without concat_cond use `feats` [N, Cs] (rows of the batch being trained on):
        the objectives call every network as model(x, t, cond); a call on the doubled batch of batched CFG
        ([x; x], 2N rows) gets [feats; feats]."""
        old, self._bound_concat = self._bound_concat, feats
        try:
            yield self
        finally:
            self._bound_concat = old

    def _concat_for(self, x: SparseTensor) -> Tensor | None:
        feats = self._bound_concat
        if feats is None:
            return None
        n, rows = feats.shape[0], x.feats.shape[0]
        if n == 0 or rows % n:
            raise ValueError(f"bound concat_cond has {n} rows, the input {rows}")
        return feats.to(x.feats.device).repeat(rows // n, 1)

    def voxel_phases(self, x: SparseTensor) -> Tensor:
        key = ("rope", self.head_dim, self.rope_freq)          # shared by every tensor on these coordinates
        if key not in x._cache:
            x._cache[key] = rope_phases(x.coords[:, 1:], self.head_dim, self.rope_freq)
        return x._cache[key]

    def forward(self, x: SparseTensor, t: Tensor, cond: Tensor, concat_cond=None) -> SparseTensor:
        if concat_cond is None:
            concat_cond = self._concat_for(x)
        if concat_cond is not None:
            extra = feats_of(concat_cond)
            if isinstance(concat_cond, SparseTensor) and concat_cond.coords is not x.coords and not (
                    concat_cond.coords.shape == x.coords.shape and torch.equal(concat_cond.coords, x.coords)):
                raise ValueError("concat_cond must lie on x's coordinates")
            if extra.shape[0] != x.feats.shape[0]:
                raise ValueError(f"concat_cond has {extra.shape[0]} rows, x has {x.feats.shape[0]}")
            x = x.replace(torch.cat([x.feats, extra.to(x.feats.dtype)], dim=1))
        if x.feats.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels (x plus concat_cond), got {x.feats.shape[1]}")
        dtype = self.dtype
        h = self.input_layer(x)
        mod = self.modulation_input(t)
        h = self.run_blocks(h.type(dtype), mod.to(dtype), cond.to(dtype), self.voxel_phases(x))
        h = h.type(x.dtype)
        h = h.replace(F.layer_norm(h.feats, h.feats.shape[-1:]))
        return self.out_layer(h)


class Trellis2ElasticSLatFlowModel(Trellis2SLatFlowModel):
    """The same network and weights (the class the release trains and ships the SLat flows as)."""

    CHECKPOINT_NAME = "ElasticSLatFlowModel"


TRELLIS2_CLASSES: dict[str, type[Trellis2FlowBase]] = {
    cls.CHECKPOINT_NAME: cls for cls in (Trellis2SparseStructureFlowModel, Trellis2SLatFlowModel,
                                         Trellis2ElasticSLatFlowModel)}
