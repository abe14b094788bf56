"""DETR's encoder-decoder transformer, with iRPE in the encoder self-attention.

Tensors inside the transformer are sequence-first, ``(L, B, C)``, as in DETR, so the attention
modules and checkpoint keys (``self_attn.in_proj_weight``, ``multihead_attn.*``, ``linear1``,
``norm1``...) are those of ``nn.MultiheadAttention`` based DETR.

Attention maps for visualisation: ``Transformer.forward(..., return_attention=True)`` also
returns the head-averaged encoder self-attention ``(B, HW, HW)`` and decoder cross-attention
``(B, Q, HW)`` of every layer. They are not computed otherwise.

Padding: iRPE buckets are computed on the padded ``h x w`` feature grid, as in the iRPE release.
Images are padded at the bottom / right and padded keys are masked, so the relative offsets
between an image's own cells, and hence its encoder output, do not depend on the padding.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..irpe import BucketCache, RPEMultiheadAttention
from .checkpointing import maybe_checkpointed


def _with_pos(x: Tensor, pos: Optional[Tensor]) -> Tensor:
    return x if pos is None else x + pos


class TransformerEncoderLayer(nn.Module):
    """Self-attention (with iRPE when ``rpe`` is given) and a feed-forward block.

    Args:
        d_model: channels.
        nhead: attention heads.
        dim_feedforward: hidden channels of the feed-forward block.
        dropout: dropout on attention weights and after each block.
        pre_norm: LayerNorm before each block (else after the residual sum, as DETR's default).
        rpe: iRPE of the self-attention (spec string, ``RPEConfig``) or None.
        bucket_cache: iRPE bucket ids to share with the other layers of the encoder.
        rpe_impl: how the iRPE attention is computed (see :class:`~detr_irpe.irpe.RPEMultiheadAttention`).
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 pre_norm: bool = False, rpe=None, bucket_cache: Optional[BucketCache] = None,
                 rpe_impl: str = "auto"):
        super().__init__()
        self.self_attn = RPEMultiheadAttention(d_model, nhead, dropout=dropout, rpe=rpe, bucket_cache=bucket_cache,
                                               rpe_impl=rpe_impl)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def _attend(self, x: Tensor, pos: Tensor, hw: Tuple[int, int], key_padding_mask: Optional[Tensor],
                need_weights: bool) -> Tuple[Tensor, Optional[Tensor]]:
        q = k = _with_pos(x, pos)
        return self.self_attn(q, k, x, key_padding_mask=key_padding_mask, hw=hw, need_weights=need_weights)

    def _feed_forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))

    def forward(self, src: Tensor, pos: Tensor, hw: Tuple[int, int], key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        """src, pos ``(HW, B, C)``; key_padding_mask ``(B, HW)`` True = padding; ``hw = (h, w)`` of
        the feature map that was flattened row-major into ``src``.

        Returns ``(HW, B, C)`` and, if ``need_weights``, the head-averaged attention ``(B, HW, HW)``.
        """
        if self.pre_norm:
            attn, weights = self._attend(self.norm1(src), pos, hw, key_padding_mask, need_weights)
            src = src + self.dropout1(attn)
            return src + self.dropout2(self._feed_forward(self.norm2(src))), weights
        attn, weights = self._attend(src, pos, hw, key_padding_mask, need_weights)
        src = self.norm1(src + self.dropout1(attn))
        return self.norm2(src + self.dropout2(self._feed_forward(src))), weights


class TransformerDecoderLayer(nn.Module):
    """Self-attention among object queries, cross-attention to the encoder memory, feed-forward.

    Arguments as :class:`TransformerEncoderLayer`, without iRPE.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 pre_norm: bool = False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def _self_attend(self, x: Tensor, query_pos: Tensor, query_mask: Optional[Tensor]) -> Tensor:
        q = k = _with_pos(x, query_pos)
        return self.self_attn(q, k, x, attn_mask=query_mask, need_weights=False)[0]

    def _cross_attend(self, x: Tensor, memory: Tensor, query_pos: Tensor, pos: Tensor,
                      memory_key_padding_mask: Optional[Tensor], need_weights: bool) -> Tuple[Tensor, Optional[Tensor]]:
        return self.multihead_attn(_with_pos(x, query_pos), _with_pos(memory, pos), memory,
                                   key_padding_mask=memory_key_padding_mask, need_weights=need_weights)

    def _feed_forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))

    def forward(self, tgt: Tensor, memory: Tensor, query_pos: Tensor, pos: Tensor,
                memory_key_padding_mask: Optional[Tensor] = None, need_weights: bool = False,
                query_mask: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """tgt, query_pos ``(Q, B, C)``; memory, pos ``(HW, B, C)``; memory_key_padding_mask ``(B, HW)``;
        query_mask ``(Q, Q)`` bool, True where a query may not attend to another (query groups).

        Returns ``(Q, B, C)`` and, if ``need_weights``, the head-averaged cross-attention ``(B, Q, HW)``.
        """
        if self.pre_norm:
            tgt = tgt + self.dropout1(self._self_attend(self.norm1(tgt), query_pos, query_mask))
            attn, weights = self._cross_attend(self.norm2(tgt), memory, query_pos, pos,
                                               memory_key_padding_mask, need_weights)
            tgt = tgt + self.dropout2(attn)
            return tgt + self.dropout3(self._feed_forward(self.norm3(tgt))), weights
        tgt = self.norm1(tgt + self.dropout1(self._self_attend(tgt, query_pos, query_mask)))
        attn, weights = self._cross_attend(tgt, memory, query_pos, pos, memory_key_padding_mask, need_weights)
        tgt = self.norm2(tgt + self.dropout2(attn))
        return self.norm3(tgt + self.dropout3(self._feed_forward(tgt))), weights


class TransformerEncoder(nn.Module):
    """A stack of encoder layers, with a final LayerNorm ``norm`` only in the pre-norm variant.
    ``checkpointing``: in training, each layer recomputes its activations in backward."""

    checkpointing: bool = False

    def __init__(self, layers: List[TransformerEncoderLayer], norm: Optional[nn.LayerNorm] = None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm

    def forward(self, src: Tensor, pos: Tensor, hw: Tuple[int, int], key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = False) -> Tuple[Tensor, List[Tensor]]:
        """``(HW, B, C)`` -> ``(HW, B, C)`` and the per-layer attention maps (empty unless asked)."""
        maps = []
        for layer in self.layers:
            src, weights = maybe_checkpointed(self.checkpointing, layer, src, pos, hw, key_padding_mask, need_weights)
            if need_weights:
                maps.append(weights)
        return (src if self.norm is None else self.norm(src)), maps


class TransformerDecoder(nn.Module):
    """A stack of decoder layers returning every layer's output after the shared final ``norm``.
    ``checkpointing``: in training, each layer recomputes its activations in backward."""

    checkpointing: bool = False

    def __init__(self, layers: List[TransformerDecoderLayer], norm: nn.LayerNorm):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm

    def forward(self, tgt: Tensor, memory: Tensor, query_pos: Tensor, pos: Tensor,
                memory_key_padding_mask: Optional[Tensor] = None, need_weights: bool = False,
                query_mask: Optional[Tensor] = None) -> Tuple[Tensor, List[Tensor]]:
        """Returns ``(num_layers, Q, B, C)`` and the per-layer cross-attention maps (empty unless asked)."""
        outputs, maps = [], []
        for layer in self.layers:
            tgt, weights = maybe_checkpointed(self.checkpointing, layer, tgt, memory, query_pos, pos,
                                              memory_key_padding_mask, need_weights, query_mask)
            outputs.append(self.norm(tgt))
            if need_weights:
                maps.append(weights)
        return torch.stack(outputs), maps


class Transformer(nn.Module):
    """DETR's transformer: encoder over the flattened feature map, decoder over object queries.

    Args:
        d_model: channels (hidden_dim).
        nhead: attention heads.
        num_encoder_layers, num_decoder_layers: depth of each stack.
        dim_feedforward: hidden channels of the feed-forward blocks.
        dropout: dropout rate everywhere.
        pre_norm: pre-norm layers (adds a final encoder LayerNorm); post-norm by default.
        rpe: iRPE of the encoder self-attention (spec string such as ``rpe-2.0-product-ctx-1-k``,
            an ``RPEConfig``) or None for plain DETR.
        rpe_impl: how the encoder's iRPE attention is computed (``auto``, ``native``, ``chunked``,
            ``sdpa``, ``triton``; see :class:`~detr_irpe.irpe.RPEMultiheadAttention`).
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1,
                 pre_norm: bool = False, rpe=None, rpe_impl: str = "auto"):
        super().__init__()
        buckets = BucketCache()  # every encoder layer sees the same feature-map size
        self.encoder = TransformerEncoder(
            [TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, pre_norm, rpe, buckets, rpe_impl)
             for _ in range(num_encoder_layers)],
            nn.LayerNorm(d_model) if pre_norm else None,
        )
        self.decoder = TransformerDecoder(
            [TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, pre_norm)
             for _ in range(num_decoder_layers)],
            nn.LayerNorm(d_model),
        )
        self.d_model = d_model
        self.nhead = nhead
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            # iRPE tables start at zero so that a fresh iRPE model equals its plain twin.
            if p.dim() > 1 and "lookup_table" not in name:
                nn.init.xavier_uniform_(p)

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos: Tensor, return_attention: bool = False,
                query_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Optional[Dict[str, List[Tensor]]]]:
        """Encode the feature map and decode the object queries.

        Args:
            src: projected features ``(B, C, h, w)``.
            mask: ``(B, h, w)`` bool, True = padding.
            query_embed: object queries ``(Q, C)``.
            pos: position encoding ``(B, C, h, w)``.
            return_attention: also return the attention maps.
            query_mask: ``(Q, Q)`` bool, True where a query may not attend to another in the
                decoder's self-attention (groups of queries that must not see each other).

        Returns:
            hs: decoder outputs of every layer ``(num_decoder_layers, B, Q, C)``.
            memory: encoder output ``(B, C, h, w)``.
            attention: None, or ``{"encoder": [(B, hw, hw)] per layer, "decoder": [(B, Q, hw)] per layer}``.
        """
        b, c, h, w = src.shape
        src = src.flatten(2).permute(2, 0, 1)  # (hw, B, C)
        pos = pos.flatten(2).permute(2, 0, 1)
        mask = mask.flatten(1)
        query_pos = query_embed.unsqueeze(1).expand(-1, b, -1)
        memory, enc_maps = self.encoder(src, pos, (h, w), mask, return_attention)
        tgt = torch.zeros_like(query_pos)
        hs, dec_maps = self.decoder(tgt, memory, query_pos, pos, mask, return_attention, query_mask)
        attention = {"encoder": enc_maps, "decoder": dec_maps} if return_attention else None
        return hs.transpose(1, 2), memory.permute(1, 2, 0).reshape(b, c, h, w), attention
