"""Triplane occupancy autoencoder (``triplane-ae``): point cloud -> triplane latent -> occupancy.

The 3D recipes diffuse triplanes, so the autoencoder maps a shape's surface point cloud
to three R×R feature planes and back to an occupancy field (ConvONet/NFD/Direct3D style):

- **encoder**: a PointNet with local pooling: per-point features are averaged into the
  cells of the three axis-aligned planes (xy, xz, yz) they project to, gathered back to
  the points, refined, pooled again; a shared 2D conv net per plane gives the posterior
  mean (and log-variance when ``variational``) of C channels: the latent (C, 3, R, R).
- **decoder**: a shared 2D conv net lifts each latent plane to F features; a query
  point reads each plane bilinearly at its projection, the three reads are summed and a
  small residual MLP gives the occupancy logit.
- **loss**: binary cross-entropy on volume and near-surface query points, TV and L2
  regularisation of the latent planes (smooth, bounded latents diffuse better), and the
  KL term when variational.
- **normalisation**: after training, per-channel mean and std of the latents over the
  training set are stored with the weights; ``encode`` returns normalised latents
  (unit variance per channel), ``decode`` undoes it.

Data space is (N, 3) surface points for ``encode`` and an occupancy volume (1, G, G, G)
of probabilities for ``decode`` (G = ``decode_resolution``), the cube [-0.5, 0.5]³
sampled at cell centres, so writers and metrics run marching cubes on it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from ditx.modalities.shape3d.extract import DEFAULT_CHUNK
from torch import Tensor, nn

from ditx.autoencoder import Autoencoder

logger = logging.getLogger("ditx.shape3d")

PLANE_AXES = ((0, 1), (0, 2), (1, 2))  # xy, xz, yz: the coordinates each plane keeps
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def plane_coordinates(points: Tensor) -> Tensor:
    """(B, M, 3) points in [-0.5, 0.5]³ -> (B, 3, M, 2) coordinates in [-1, 1] on each plane,
    ordered (u, v) = (first kept axis, second) as ``grid_sample``'s (x, y)."""
    uv = torch.stack([points[..., list(axes)] for axes in PLANE_AXES], dim=1)  # (B, 3, M, 2)
    return uv * 2.0


def scatter_mean_to_planes(features: Tensor, points: Tensor, resolution: int) -> Tensor:
    """Average per-point features into plane cells: (B, M, D), (B, M, 3) -> (B, 3, D, R, R)."""
    b, m, d = features.shape
    uv = plane_coordinates(points)  # (B, 3, M, 2) in [-1, 1]
    cell = ((uv + 1) * 0.5 * resolution).floor().long().clamp_(0, resolution - 1)
    index = cell[..., 1] * resolution + cell[..., 0]  # row = v, column = u: matches grid_sample's (x, y)
    out = features.new_zeros(b, 3, resolution * resolution, d)
    count = features.new_zeros(b, 3, resolution * resolution, 1)
    src = features.unsqueeze(1).expand(b, 3, m, d)
    out.scatter_add_(2, index.unsqueeze(-1).expand(b, 3, m, d), src)
    count.scatter_add_(2, index.unsqueeze(-1), torch.ones_like(src[..., :1]))
    out = out / count.clamp_min(1.0)
    return out.permute(0, 1, 3, 2).reshape(b, 3, d, resolution, resolution)


def sample_planes(planes: Tensor, points: Tensor) -> Tensor:
    """Bilinear reads of (B, 3, D, R, R) planes at (B, M, 3) points, summed over planes: (B, M, D)."""
    b, _, d, r, _ = planes.shape
    uv = plane_coordinates(points)  # (B, 3, M, 2)
    feats = F.grid_sample(
        planes.reshape(b * 3, d, r, r), uv.reshape(b * 3, -1, 1, 2).to(planes.dtype),
        mode="bilinear", padding_mode="border", align_corners=False,
    )  # (B·3, D, M, 1)  # fmt: skip
    return feats.reshape(b, 3, d, -1).sum(1).transpose(1, 2)


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(F.silu(self.fc1(F.silu(x))))


def plane_convnet(c_in: int, width: int, c_out: int, groups: int = 8) -> nn.Sequential:
    """A small 3×3 conv net applied to each plane (planes folded into the batch)."""
    return nn.Sequential(
        nn.Conv2d(c_in, width, 3, padding=1), nn.GroupNorm(min(groups, width), width), nn.SiLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(min(groups, width), width), nn.SiLU(),
        nn.Conv2d(width, c_out, 3, padding=1),
    )  # fmt: skip


class TriplaneAutoencoder(Autoencoder):
    """Point cloud (N, 3) -> normalised triplane latent (C, 3, R, R) -> occupancy (see module doc).

    Args:
        resolution: plane size R of the latent.
        latent_channels: C.
        width: feature width of the point encoder and plane nets.
        decoder_width: F, features read from the planes by the occupancy MLP.
        variational: a KL-regularised posterior (sampled when training) instead of a plain code.
        decode_resolution: G, the occupancy grid ``decode`` returns.
        chunk_size: query points per decoder call when decoding a grid (bounds memory at 256³;
            the default, 16,384, is also the fastest on CPU: see ``ditx.modalities.shape3d.extract``).
        pretrained: a folder written by ``save_pretrained`` (weights, config, latent statistics).
    """

    supports_training = True

    def __init__(
        self,
        resolution: int = 32,
        latent_channels: int = 8,
        width: int = 64,
        decoder_width: int = 64,
        variational: bool = False,
        decode_resolution: int = 64,
        chunk_size: int = DEFAULT_CHUNK,
        tv_weight: float = 1e-3,
        l2_weight: float = 1e-4,
        pretrained: str | os.PathLike | None = None,
    ):
        super().__init__()
        arch = {"resolution": resolution, "latent_channels": latent_channels, "width": width,
                "decoder_width": decoder_width, "variational": variational}  # fmt: skip
        if pretrained is not None:
            saved = json.loads((Path(pretrained) / CONFIG_NAME).read_text())
            arch = {k: saved[k] for k in arch}
        self.config = dict(arch, tv_weight=tv_weight, l2_weight=l2_weight)
        self.resolution, self.latent_channels = arch["resolution"], arch["latent_channels"]
        self.variational = arch["variational"]
        self.decode_resolution, self.chunk_size = decode_resolution, chunk_size
        self.tv_weight, self.l2_weight = tv_weight, l2_weight
        w, c, fw = arch["width"], arch["latent_channels"], arch["decoder_width"]

        self.point_in = nn.Linear(3, w)
        self.point_blocks = nn.ModuleList([ResBlock(w) for _ in range(3)])
        self.pool_proj = nn.ModuleList([nn.Linear(2 * w, w) for _ in range(2)])  # after local pooling
        self.encoder_planes = plane_convnet(w, w, 2 * c if self.variational else c)
        self.decoder_planes = plane_convnet(c, fw, fw)
        self.query_in = nn.Linear(fw, fw)
        self.query_blocks = nn.ModuleList([ResBlock(fw) for _ in range(3)])
        self.query_out = nn.Linear(fw, 1)
        self.register_buffer("latent_mean", torch.zeros(c))
        self.register_buffer("latent_std", torch.ones(c))
        self.scaling_factor = 1.0  # the protocol's field; normalisation is per channel (latent_mean/std)
        if pretrained is not None:
            from safetensors.torch import load_file

            self.load_state_dict(load_file(str(Path(pretrained) / WEIGHTS_NAME)))
            self.freeze()

    # ---- shapes -----------------------------------------------------------------------

    def latent_shape(self, data_shape: Sequence[int]) -> tuple[int, ...]:
        if len(data_shape) != 2 or data_shape[-1] != 3:
            raise ValueError(f"triplane-ae encodes point clouds of shape (N, 3), got data shape {tuple(data_shape)}")
        return (self.latent_channels, 3, self.resolution, self.resolution)

    # ---- encoder ----------------------------------------------------------------------

    def _posterior(self, points: Tensor) -> tuple[Tensor, Tensor | None]:
        """(B, N, 3) -> mean (B, C, 3, R, R) and log-variance (or None)."""
        if points.ndim != 3 or points.shape[-1] != 3:
            raise ValueError(f"triplane-ae expects points (B, N, 3), got shape {tuple(points.shape)}")
        points = points.float()
        r = self.resolution
        h = self.point_blocks[0](self.point_in(points))  # (B, N, w)
        for block, proj in zip(self.point_blocks[1:], self.pool_proj):
            planes = scatter_mean_to_planes(h, points, r)  # (B, 3, w, R, R)
            pooled = sample_planes(planes, points) / 3.0  # local context of each point
            h = block(proj(torch.cat([h, pooled], dim=-1)))
        planes = scatter_mean_to_planes(h, points, r)
        b, _, w, _, _ = planes.shape
        out = self.encoder_planes(planes.reshape(b * 3, w, r, r)).reshape(b, 3, -1, r, r).transpose(1, 2)
        if self.variational:
            mean, logvar = out.chunk(2, dim=1)
            return mean, logvar.clamp(-30.0, 20.0)
        return out, None

    def encode_unnormalized(
        self, points: Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        mean, logvar = self._posterior(points)
        if sample and logvar is not None:
            device = generator.device if generator is not None else mean.device
            noise = torch.randn(mean.shape, generator=generator, device=device).to(mean.device)
            return mean + (0.5 * logvar).exp() * noise
        return mean

    def _stats(self) -> tuple[Tensor, Tensor]:
        return self.latent_mean.view(1, -1, 1, 1, 1), self.latent_std.view(1, -1, 1, 1, 1)

    def encode(self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """(B, N, 3) surface points -> (B, C, 3, R, R) latents normalised per channel."""
        mean, std = self._stats()
        return (self.encode_unnormalized(x, sample, generator) - mean) / std

    # ---- decoder ----------------------------------------------------------------------

    def decoder_features(self, z: Tensor) -> Tensor:
        """Unnormalised latents (B, C, 3, R, R) -> decoder planes (B, 3, F, R, R)."""
        b, c, _, r, _ = z.shape
        planes = z.transpose(1, 2).reshape(b * 3, c, r, r)
        return self.decoder_planes(planes).reshape(b, 3, -1, r, r)

    def query(self, planes: Tensor, points: Tensor) -> Tensor:
        """Occupancy logits (B, M) of points (B, M, 3) given decoder planes (B, 3, F, R, R)."""
        h = self.query_in(sample_planes(planes, points.to(planes.dtype)))
        for block in self.query_blocks:
            h = block(h)
        return self.query_out(F.silu(h)).squeeze(-1)

    def occupancy_logits(self, z_unnormalized: Tensor, points: Tensor) -> Tensor:
        return self.query(self.decoder_features(z_unnormalized), points)

    @torch.no_grad()
    def decode(self, z: Tensor, resolution: int | None = None) -> Tensor:
        """Normalised latents (B, C, 3, R, R) -> occupancy probabilities (B, 1, G, G, G) on
        the cell centres of [-0.5, 0.5]³, queried ``chunk_size`` points at a time."""
        mean, std = self._stats()
        planes = self.decoder_features(z.float() * std + mean)
        g = resolution or self.decode_resolution
        axis = (torch.arange(g, device=z.device, dtype=torch.float32) + 0.5) / g - 0.5
        grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)  # (G³, 3) x,y,z
        out = torch.empty(z.shape[0], g**3, device=z.device)
        for start in range(0, g**3, self.chunk_size):
            pts = grid[start : start + self.chunk_size].unsqueeze(0).expand(z.shape[0], -1, -1)
            out[:, start : start + self.chunk_size] = torch.sigmoid(self.query(planes, pts).float())
        return out.reshape(-1, 1, g, g, g)

    # ---- training ---------------------------------------------------------------------

    def trainable(self) -> TriplaneAutoencoder:
        self.float().train()
        self.requires_grad_(True)
        self.latent_mean.zero_()
        self.latent_std.fill_(1.0)
        return self

    def training_loss(
        self, x: Tensor, kl_weight: float = 1e-6, generator: torch.Generator | None = None,
        points: Tensor | None = None, occupancy: Tensor | None = None,
    ) -> dict[str, Tensor]:  # fmt: skip
        """BCE of occupancy at query ``points`` (B, M, 3) with labels ``occupancy`` (B, M),
        plus TV/L2 on the latent planes and KL (when variational), for surface points ``x``."""
        if points is None or occupancy is None:
            raise ValueError("triplane-ae training needs query points and occupancy labels in the batch")
        mean, logvar = self._posterior(x)
        z = mean
        if logvar is not None:
            device = generator.device if generator is not None else mean.device
            z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator, device=device).to(mean)
        logits = self.occupancy_logits(z, points)
        bce = F.binary_cross_entropy_with_logits(logits.float(), occupancy.float())
        tv = (z[..., 1:, :] - z[..., :-1, :]).abs().mean() + (z[..., 1:] - z[..., :-1]).abs().mean()
        l2 = z.pow(2).mean()
        loss = bce + self.tv_weight * tv + self.l2_weight * l2
        terms = {"bce": bce, "tv": tv, "l2": l2}
        if logvar is not None:
            kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1).mean()
            loss = loss + kl_weight * kl
            terms["kl"] = kl
        with torch.no_grad():
            pred = logits > 0
            truth = occupancy > 0.5
            terms["iou"] = (pred & truth).sum().float() / (pred | truth).sum().clamp_min(1).float()
        return {"loss": loss, **terms}

    @torch.no_grad()
    def reconstruction_metrics(self, batch: dict[str, Tensor]) -> dict[str, float]:
        """Volumetric IoU (and BCE) of the reconstructed occupancy on a batch's query points:
        the uniform ``volume_points``/``volume_occupancy`` when the batch has them (the
        standard IoU), else ``points``/``occupancy``."""
        points = batch.get("volume_points", batch.get("points"))
        labels = batch.get("volume_occupancy", batch.get("occupancy"))
        if points is None or labels is None:
            raise ValueError("triplane-ae reconstruction metrics need query points and occupancy labels")
        logits = self.occupancy_logits(self.encode_unnormalized(batch["x"]), points).float()
        pred, truth = logits > 0, labels > 0.5
        union = (pred | truth).sum().item()
        return {
            "iou": float((pred & truth).sum().item() / union) if union else 1.0,
            "bce": float(F.binary_cross_entropy_with_logits(logits, labels.float())),
        }

    def loss_inputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The query points and their occupancy labels."""
        return {k: batch[k] for k in ("points", "occupancy") if k in batch}

    @torch.no_grad()
    def calibrate_latents(self, x: Tensor, training_batches) -> None:
        """Per-channel statistics of the unnormalised latents of (up to 512) training shapes."""
        self.fit_latent_statistics(torch.cat([self.encode_unnormalized(b["x"]) for b in training_batches]))

    @torch.no_grad()
    def fit_latent_statistics(self, latents: Tensor) -> None:
        """Store per-channel mean/std of unnormalised latents (N, C, 3, R, R) for ``encode``."""
        flat = latents.float().transpose(0, 1).reshape(self.latent_channels, -1)
        self.latent_mean.copy_(flat.mean(1))
        self.latent_std.copy_(flat.std(1).clamp_min(1e-6))

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps({"class": "triplane-ae", **self.config}, indent=2) + "\n")
        state = {k: v.detach().float().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME))

    def extra_repr(self) -> str:
        return (
            f"resolution={self.resolution}, latent_channels={self.latent_channels}, variational={self.variational}, "
            f"decode_resolution={self.decode_resolution}"
        )
