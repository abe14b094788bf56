"""Absolute 2D position encodings of a feature map, added to queries and keys in the transformer."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import UsageError


class PositionEmbeddingSine(nn.Module):
    """DETR's sinusoidal encoding of (row, column), computed on the unpadded part of each image.

    Positions are the cumulative count of valid (not padded) cells along each axis, so the
    encoding of an image does not depend on how much padding surrounds it. With ``normalize``
    they are rescaled to ``(0, scale]`` by the image's own extent.

    Args:
        num_pos_feats: channels per axis; the output has ``2 * num_pos_feats`` (= hidden_dim).
        temperature: base of the geometric frequency progression.
        normalize: divide positions by the image's valid extent before scaling.
        scale: multiplier of the normalised positions (2 pi by default).
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, normalize: bool = True,
                 scale: float = 2 * math.pi):
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError(f"num_pos_feats must be even (sin/cos pairs), got {num_pos_feats}")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale

    def forward(self, mask: Tensor) -> Tensor:
        """mask ``(B, h, w)`` bool, True = padding -> encoding ``(B, 2 * num_pos_feats, h, w)``.

        Channels are ``[y features, x features]``; within each, ``sin`` and ``cos`` of the same
        frequency alternate.
        """
        valid = ~mask
        y = valid.cumsum(1, dtype=torch.float32)
        x = valid.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y = y / (y[:, -1:, :] + eps) * self.scale
            x = x / (x[:, :, -1:] + eps) * self.scale
        pairs = torch.arange(self.num_pos_feats // 2, dtype=torch.float32, device=mask.device)
        wavelength = self.temperature ** (2 * pairs / self.num_pos_feats)  # (num_pos_feats / 2,)
        return torch.cat([self._encode(y, wavelength), self._encode(x, wavelength)], dim=3).permute(0, 3, 1, 2)

    @staticmethod
    def _encode(pos: Tensor, wavelength: Tensor) -> Tensor:
        """``(B, h, w)`` positions -> ``(B, h, w, 2 * len(wavelength))`` interleaved sin, cos."""
        angles = pos[..., None] / wavelength
        return torch.stack([angles.sin(), angles.cos()], dim=4).flatten(3)

    def extra_repr(self) -> str:
        return (f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, "
                f"normalize={self.normalize}, scale={self.scale:.4f}")


class PositionEmbeddingLearned(nn.Module):
    """A learned embedding per row and per column (DETR: 50 of each, so at most 50 x 50 cells).

    Args:
        num_pos_feats: channels per axis; the output has ``2 * num_pos_feats`` (= hidden_dim).
        max_size: number of rows / columns that have an embedding.
    """

    def __init__(self, num_pos_feats: int = 128, max_size: int = 50):
        super().__init__()
        self.row_embed = nn.Embedding(max_size, num_pos_feats)
        self.col_embed = nn.Embedding(max_size, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, mask: Tensor) -> Tensor:
        """mask ``(B, h, w)`` -> ``(B, 2 * num_pos_feats, h, w)``, channels ``[x features, y features]``."""
        b, h, w = mask.shape
        max_size = self.row_embed.num_embeddings
        if h > max_size or w > max_size:
            raise UsageError(f"the learned position embedding covers at most {max_size} x {max_size} feature "
                             f"cells, got {h} x {w}; use smaller images or position_embedding=sine")
        cols = self.col_embed(torch.arange(w, device=mask.device))  # (w, F)
        rows = self.row_embed(torch.arange(h, device=mask.device))  # (h, F)
        pos = torch.cat([cols[None, :, :].expand(h, w, -1), rows[:, None, :].expand(h, w, -1)], dim=-1)
        return pos.permute(2, 0, 1)[None].expand(b, -1, -1, -1)


def build_position_encoding(kind: str, hidden_dim: int) -> nn.Module:
    """``sine`` or ``learned`` encoding producing ``hidden_dim`` channels."""
    if hidden_dim % 2:
        raise ValueError(f"hidden_dim must be even to split between rows and columns, got {hidden_dim}")
    if kind == "sine":
        return PositionEmbeddingSine(hidden_dim // 2, normalize=True)
    if kind == "learned":
        return PositionEmbeddingLearned(hidden_dim // 2)
    raise ValueError(f"unknown position_embedding {kind!r}; choose 'sine' or 'learned'")
