"""The DETR detector with iRPE in its encoder: model, matcher, losses and post-processing."""
from .backbone import Joiner, ResNetBackbone, TinyBackbone, build_backbone
from .box_checks import DegenerateBoxError
from .build import build_detr, resolve_model_config
from .criterion import SetCriterion, detr_weight_dict
from .detr import DETR, MLP
from .matcher import HungarianMatcher
from .position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine, build_position_encoding
from .postprocess import PostProcess, PostProcessPanoptic, PostProcessSegm
from .segmentation import DETRsegm, MaskHeadSmallConv, MHAttentionMap
from .transformer import Transformer, TransformerDecoderLayer, TransformerEncoderLayer

__all__ = [
    "DETR", "MLP", "Joiner", "ResNetBackbone", "TinyBackbone", "build_backbone", "DegenerateBoxError",
    "build_detr", "resolve_model_config", "SetCriterion", "detr_weight_dict", "HungarianMatcher",
    "PositionEmbeddingLearned", "PositionEmbeddingSine", "build_position_encoding", "PostProcess",
    "PostProcessPanoptic", "PostProcessSegm", "DETRsegm", "MaskHeadSmallConv", "MHAttentionMap",
    "Transformer", "TransformerDecoderLayer", "TransformerEncoderLayer",
]
