"""State-dict keys of transformers' ``DetrForObjectDetection`` (and ``DetrForSegmentation``) <-> the
official DETR keys used here.

The mapping is exact both ways: each tensor on one side becomes exactly one tensor on the other,
except that an attention's ``q_proj`` / ``k_proj`` / ``v_proj`` weights (and biases) are
concatenated, in that order, into ``in_proj_weight`` (``in_proj_bias``), the way
``nn.MultiheadAttention`` stacks them, and split again on the way back. A key no rule covers is
an error, never dropped. The one exception is batch norm's ``num_batches_tracked`` counter in
the backbone: frozen batch norm uses no counter, and neither side's model has one.

Keys are first brought to the layout of the files on the hub, which transformers 5 still writes
(``model.backbone.conv_encoder.model.*``, ``out_proj``, ``fc1``). Also read: transformers 5's
module names (``model.backbone.model.*``, ``o_proj``, ``mlp.fc1``, a state dict saved by hand)
and the place transformers 4.x gave learned position embeddings
(``model.backbone.position_embedding.*``; transformers 5 reads and writes them as
``model.position_embedding.*``). Each version loads only its own place, so :func:`ours_to_hf`
takes the one to write (:func:`position_embedding_prefix` tells the installed version's).

``DetrForSegmentation`` holds a ``DetrForObjectDetection`` as ``detr`` (``detr.model.*``,
``detr.class_labels_classifier.*``, ...), mapped as above under our ``detr.``, beside its mask
head, whose keys in the hub's layout (transformers 4.x's module names, which transformers 5 writes
back) are official DETR's, so ours: ``bbox_attention.q_linear`` / ``k_linear``, ``mask_head.lay1``
.. ``lay5``, ``gn1`` .. ``gn5``, ``adapter1`` .. ``adapter3``, ``out_lay``. transformers 5's module
names (``bbox_attention.q_proj``, ``mask_head.conv1.conv``, ``mask_head.fpn_stages.0.refine.norm``,
...) are read too.
"""
from __future__ import annotations

import importlib.metadata
import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from packaging import version
from torch import Tensor

from ..config import ModelConfig
from ..errors import CheckpointError
from ..models import build_detr
from ..models.state_dict import compare_state_dict, describe, listing

HF_BACKBONE = "model.backbone.conv_encoder.model."
OUR_BACKBONE = "backbone.0.body."

Rules = Sequence[Tuple[str, str]]  # (source prefix, target prefix); "{n}" stands for a layer index


def _native_backbone_rules() -> List[Tuple[str, str]]:
    """transformers' ResNetModel -> torchvision ResNet: stage s is layer{s+1}, layer.i is conv/bn{i+1}."""
    rules = [("embedder.embedder.convolution.", "conv1."), ("embedder.embedder.normalization.", "bn1.")]
    for s in range(4):
        hf, ours = f"encoder.stages.{s}.layers.{{n}}.", f"layer{s + 1}.{{n}}."
        rules += [(hf + "shortcut.convolution.", ours + "downsample.0."),
                  (hf + "shortcut.normalization.", ours + "downsample.1.")]
        rules += [(hf + f"layer.{i}.{part}.", ours + f"{short}{i + 1}.")
                  for i in range(3) for part, short in (("convolution", "conv"), ("normalization", "bn"))]
    return [(HF_BACKBONE + hf, OUR_BACKBONE + ours) for hf, ours in rules]


# timm's ResNet has torchvision's module names
BACKBONE_RULES: Dict[str, Rules] = {"timm": [(HF_BACKBONE, OUR_BACKBONE)], "native": _native_backbone_rules()}

# attentions whose q/k/v projections are fused here; their out_proj maps one to one
ATTENTIONS: Rules = [
    ("model.encoder.layers.{n}.self_attn.", "transformer.encoder.layers.{n}.self_attn."),
    ("model.decoder.layers.{n}.self_attn.", "transformer.decoder.layers.{n}.self_attn."),
    ("model.decoder.layers.{n}.encoder_attn.", "transformer.decoder.layers.{n}.multihead_attn."),
]
_QKV = ("q_proj", "k_proj", "v_proj")

RULES: Rules = [
    ("model.input_projection.", "input_proj."),
    ("model.query_position_embeddings.", "query_embed."),
    ("model.position_embedding.row_embeddings.", "backbone.1.row_embed."),
    ("model.position_embedding.column_embeddings.", "backbone.1.col_embed."),
    ("model.encoder.layers.{n}.self_attn_layer_norm.", "transformer.encoder.layers.{n}.norm1."),
    ("model.encoder.layers.{n}.fc1.", "transformer.encoder.layers.{n}.linear1."),
    ("model.encoder.layers.{n}.fc2.", "transformer.encoder.layers.{n}.linear2."),
    ("model.encoder.layers.{n}.final_layer_norm.", "transformer.encoder.layers.{n}.norm2."),
    ("model.decoder.layers.{n}.self_attn_layer_norm.", "transformer.decoder.layers.{n}.norm1."),
    ("model.decoder.layers.{n}.encoder_attn_layer_norm.", "transformer.decoder.layers.{n}.norm2."),
    ("model.decoder.layers.{n}.fc1.", "transformer.decoder.layers.{n}.linear1."),
    ("model.decoder.layers.{n}.fc2.", "transformer.decoder.layers.{n}.linear2."),
    ("model.decoder.layers.{n}.final_layer_norm.", "transformer.decoder.layers.{n}.norm3."),
    ("model.decoder.layernorm.", "transformer.decoder.norm."),
    ("class_labels_classifier.", "class_embed."),
    ("bbox_predictor.layers.", "bbox_embed.layers."),
] + [(hf + "out_proj.", ours + "out_proj.") for hf, ours in ATTENTIONS]

HF_DETECTOR = "detr."  # DetrForSegmentation's detector; ours is under the same name
HEAD_PREFIXES = ("bbox_attention.", "mask_head.")  # the mask head, the same keys on both sides (hub layout)
# transformers 5's module names of the mask head -> the hub's (transformers 4.x's, official DETR's)
_HEAD_5 = [("bbox_attention.q_proj.", "bbox_attention.q_linear."), ("bbox_attention.k_proj.", "bbox_attention.k_linear."),
           ("mask_head.conv1.conv.", "mask_head.lay1."), ("mask_head.conv1.norm.", "mask_head.gn1."),
           ("mask_head.conv2.conv.", "mask_head.lay2."), ("mask_head.conv2.norm.", "mask_head.gn2."),
           ("mask_head.output_conv.", "mask_head.out_lay.")]
for _stage in range(3):
    _HEAD_5 += [(f"mask_head.fpn_stages.{_stage}.fpn_adapter.", f"mask_head.adapter{_stage + 1}."),
                (f"mask_head.fpn_stages.{_stage}.refine.conv.", f"mask_head.lay{_stage + 3}."),
                (f"mask_head.fpn_stages.{_stage}.refine.norm.", f"mask_head.gn{_stage + 3}.")]

POSITION_4, POSITION_5 = "model.backbone.position_embedding.", "model.position_embedding."
# other layouts -> the hub's: (prefix, prefix) for whole keys, (infix, infix) inside the transformer
_PREFIXES = [("model.backbone.model.", HF_BACKBONE), (POSITION_4, POSITION_5)]
_INFIXES = [(".o_proj.", ".out_proj."), (".mlp.fc1.", ".fc1."), (".mlp.fc2.", ".fc2.")]


def _regex(prefix: str) -> str:
    """A regex for ``prefix`` whose "{n}" (at most one) is captured as a group of digits."""
    return r"(\d+)".join(re.escape(part) for part in prefix.split("{n}"))


def _rename(key: str, rules: Rules, rest: str = "(.*)") -> Optional[str]:
    """``key`` with the first matching source prefix replaced by its target; None if no rule matches.

    ``rest`` is the regex the remainder of the key must match; it is kept as it is.
    """
    for src, dst in rules:
        match = re.fullmatch(_regex(src) + rest, key, flags=re.S)
        if match:
            *index, tail = match.groups()
            return dst.replace("{n}", index[0] if index else "") + tail
    return None


def _swap(rules: Rules) -> Rules:
    return [(dst, src) for src, dst in rules]


def is_segmentation_state(state: Mapping[str, Tensor]) -> bool:
    """Whether ``state`` is a ``DetrForSegmentation``'s (its detector under ``detr.``)."""
    return any(key.startswith(HF_DETECTOR) for key in state)


def hub_layout(state: Mapping[str, Tensor], source: str = "checkpoint") -> Dict[str, Tensor]:
    """``state`` with its keys in the hub's layout, backbone ``num_batches_tracked`` counters dropped."""
    out: Dict[str, Tensor] = {}
    clashes = []
    for key, value in state.items():
        detector = HF_DETECTOR if key.startswith(HF_DETECTOR) else ""
        new = key[len(detector):]
        for old, hub in _PREFIXES + (_HEAD_5 if not detector else []):
            if new.startswith(old):
                new = hub + new[len(old):]
        if new.startswith(("model.encoder.", "model.decoder.")):
            for old, hub in _INFIXES:
                new = new.replace(old, hub)
        if new.startswith(HF_BACKBONE) and new.endswith(".num_batches_tracked"):
            continue
        new = detector + new
        if new in out:
            clashes.append(new)
        out[new] = value
    if clashes:
        raise CheckpointError(f"{source}: the weights hold some tensors twice, under the names of two "
                              f"transformers versions:" + listing("keys given twice", sorted(clashes)))
    return out


def hf_to_ours(state: Mapping[str, Tensor], backbone_layout: str,
               source: str = "checkpoint") -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """transformers DETR weights -> official-DETR keys.

    Args:
        state: a ``DetrForObjectDetection`` or ``DetrForSegmentation`` state dict in any layout the
            module docstring lists.
        backbone_layout: ``"timm"`` or ``"native"`` (see :class:`~detr_irpe.interop.hf_config.HFBackbone`).

    Returns:
        ``(our state dict, {our key: the transformers key(s) it came from})``; the second is for
        messages. A segmentation model's has its detector under ``detr.`` beside the mask head.

    Raises:
        CheckpointError: listing the keys no rule covers and attentions missing a projection.
    """
    state = hub_layout(state, source)
    if not is_segmentation_state(state):
        return _detector_to_ours(state, backbone_layout, source)
    detector = {k[len(HF_DETECTOR):]: v for k, v in state.items() if k.startswith(HF_DETECTOR)}
    head = {k: v for k, v in state.items() if k.startswith(HEAD_PREFIXES)}
    other = sorted(k for k in state if k not in head and not k.startswith(HF_DETECTOR))
    if other:
        raise CheckpointError(f"{source}: these weights are not those of a transformers DetrForSegmentation"
                              + listing("keys that correspond to nothing in this project's DETRsegm", other))
    out, origin = _detector_to_ours(detector, backbone_layout, source, prefix=HF_DETECTOR)
    out = {HF_DETECTOR + k: v for k, v in out.items()}
    origin = {HF_DETECTOR + k: v for k, v in origin.items()}
    return {**out, **head}, {**origin, **{k: k for k in head}}


def _detector_to_ours(state: Mapping[str, Tensor], backbone_layout: str, source: str,
                      prefix: str = "") -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """:func:`hf_to_ours` of a ``DetrForObjectDetection`` state dict in the hub's layout (``prefix``:
    where these keys sit in the file, for messages)."""
    rules = list(BACKBONE_RULES[backbone_layout]) + list(RULES)
    out, origin, parts, unmapped = {}, {}, {}, []
    for key, value in state.items():
        fused = _rename(key, [(hf + f"{p}.", ours + f"{i}.") for hf, ours in ATTENTIONS for i, p in enumerate(_QKV)],
                        rest="(weight|bias)")
        if fused is not None:  # "<our attention prefix><0|1|2>.<weight|bias>"
            prefix_, index, kind = fused.rsplit(".", 2)
            parts.setdefault(f"{prefix_}.in_proj_{kind}", {})[int(index)] = (prefix + key, value)
            continue
        ours = _rename(key, rules)
        if ours is None:
            unmapped.append(prefix + key)
            continue
        out[ours], origin[ours] = value, prefix + key
    incomplete = []
    for ours, got in sorted(parts.items()):
        if sorted(got) != [0, 1, 2]:
            incomplete.append(f"{prefix}{ours}: has only {', '.join(got[i][0] for i in sorted(got))}")
            continue
        shapes = [tuple(got[i][1].shape) for i in range(3)]
        if len(set(shapes)) > 1:
            incomplete.append(f"{prefix}{ours}: q, k, v projections of shapes {shapes}")
            continue
        out[ours] = torch.cat([got[i][1] for i in range(3)])
        origin[ours] = " + ".join(got[i][0] for i in range(3))
    if unmapped or incomplete:
        kind = "DetrForSegmentation" if prefix else "DetrForObjectDetection"
        msg = f"{source}: these weights are not those of a transformers {kind} with a " \
              f"{backbone_layout} ResNet backbone"
        if unmapped:
            msg += listing("keys that correspond to nothing in this project's DETR", sorted(unmapped))
        if incomplete:
            msg += listing("attentions without all of q_proj, k_proj, v_proj of one shape", incomplete)
        raise CheckpointError(msg)
    return out, origin


def position_embedding_prefix() -> str:
    """Where the installed transformers keeps learned position embeddings (5's place if it is not installed)."""
    try:
        installed = version.parse(importlib.metadata.version("transformers"))
    except importlib.metadata.PackageNotFoundError:
        return POSITION_5
    return POSITION_4 if installed.major < 5 else POSITION_5


def ours_to_hf(state: Mapping[str, Tensor], backbone_layout: str, source: str = "checkpoint",
               position_prefix: str = POSITION_5) -> Dict[str, Tensor]:
    """Official-DETR keys -> transformers DETR keys in the hub's layout (the inverse of :func:`hf_to_ours`).

    ``in_proj_weight`` ``(3 C, C)`` / ``in_proj_bias`` ``(3 C,)`` are split into three ``(C, C)`` /
    ``(C,)`` projections. Learned position embeddings go under ``position_prefix``
    (``POSITION_5`` or ``POSITION_4``, see the module docstring). A segmentation model's detector
    (``detr.*``) becomes ``DetrForSegmentation``'s ``detr.*``; its mask head keeps its keys.

    Raises:
        CheckpointError: listing the keys no rule covers (e.g. iRPE tables).
    """
    if not is_segmentation_state(state):
        return _detector_to_hf(state, backbone_layout, source, position_prefix)
    detector = {k[len(HF_DETECTOR):]: v for k, v in state.items() if k.startswith(HF_DETECTOR)}
    head = {k: v for k, v in state.items() if k.startswith(HEAD_PREFIXES)}
    other = sorted(k for k in state if k not in head and not k.startswith(HF_DETECTOR))
    out = _detector_to_hf(detector, backbone_layout, source, position_prefix, prefix=HF_DETECTOR, unmapped=other)
    return {**{HF_DETECTOR + k: v for k, v in out.items()}, **head}


def _detector_to_hf(state: Mapping[str, Tensor], backbone_layout: str, source: str, position_prefix: str,
                    prefix: str = "", unmapped: Sequence[str] = ()) -> Dict[str, Tensor]:
    """:func:`ours_to_hf` of a DETR state dict (``prefix``: where its keys sit in ours, for messages;
    ``unmapped``: keys already known to have no place)."""
    rules = _swap(list(BACKBONE_RULES[backbone_layout]) + list(RULES))
    attentions = _swap(ATTENTIONS)
    out, unmapped = {}, list(unmapped)
    for key, value in state.items():
        fused = _rename(key, [(ours + "in_proj_", hf) for ours, hf in attentions], rest="(weight|bias)")
        if fused is not None:  # "<transformers attention prefix><weight|bias>"
            head, kind = fused.rsplit(".", 1)
            for name, chunk in zip(_QKV, value.chunk(3, dim=0)):
                out[f"{head}.{name}.{kind}"] = chunk.clone()
            continue
        hf = _rename(key, rules)
        if hf is None:
            unmapped.append(prefix + key)
        else:
            out[position_prefix + hf[len(POSITION_5):] if hf.startswith(POSITION_5) else hf] = value
    if unmapped:
        raise CheckpointError(f"{source}: these tensors have no place in a transformers DETR with a {backbone_layout} "
                              f"ResNet backbone:" + listing("keys", sorted(unmapped)))
    return out


def our_shapes(cfg: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Key -> shape of the state dict of the model ``cfg`` describes (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        model, _, _ = build_detr(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_fits(state: Mapping[str, Tensor], expected: Mapping[str, Tuple[int, ...]], source: str,
               origin: Optional[Mapping[str, str]] = None) -> None:
    """Raise a :class:`CheckpointError` unless ``state`` has exactly the keys and shapes ``expected``
    (:func:`~detr_irpe.models.state_dict.compare_state_dict`; a batch-norm counter is no difference).

    ``origin`` maps our keys to the keys of the file they were read from, quoted in the message.
    """
    diff = compare_state_dict(expected, state)
    if diff:
        raise CheckpointError(f"{source}: the weights do not fit the model its config describes"
                              + describe(diff, origin))
