"""torch.hub entries: official DETR's (same names and arguments) and the iRPE model zoo's.

    model = torch.hub.load("/path/to/detr_irpe", "detr_resnet50_irpe_9x9", source="local", pretrained=True)
    model, postprocessor = torch.hub.load("/path/to/detr_irpe", "detr_resnet50", source="local",
                                          pretrained=True, return_postprocessor=True)

Each entry returns this project's DETR (``detr_irpe.models.DETR``, in eval mode), and with
``return_postprocessor=True`` its post-processor too. ``pretrained=True`` loads the released weights
(downloaded once into ``torch.hub.get_dir()/checkpoints``). Other keyword arguments are
``detr_irpe.config.ModelConfig`` fields (e.g. ``rpe_impl="sdpa"``). The logic is in
``detr_irpe.apps.hub``; this file only names the entries. COCO val2017 AP figures below are the ones
the DETR and iRPE papers report, not measured by this project.
"""

dependencies = ["torch", "torchvision"]


def _load(name, **kwargs):
    from detr_irpe.apps.hub import hub_model  # imported when an entry runs: listing the entries stays light

    return hub_model(name, **kwargs)


def detr_resnet50(pretrained=False, num_classes=91, return_postprocessor=False, **options):
    """DETR with a ResNet-50 backbone, 6 encoder and 6 decoder layers (paper: 42.0 AP, 500 epochs)."""
    return _load("detr_resnet50", pretrained=pretrained, num_classes=num_classes,
                 return_postprocessor=return_postprocessor, **options)


def detr_resnet50_dc5(pretrained=False, num_classes=91, return_postprocessor=False, **options):
    """DETR-DC5 R50: the last ResNet-50 stage dilated, stride 16 (paper: 43.3 AP)."""
    return _load("detr_resnet50_dc5", pretrained=pretrained, num_classes=num_classes,
                 return_postprocessor=return_postprocessor, **options)


def detr_resnet101(pretrained=False, num_classes=91, return_postprocessor=False, **options):
    """DETR with a ResNet-101 backbone (paper: 43.5 AP)."""
    return _load("detr_resnet101", pretrained=pretrained, num_classes=num_classes,
                 return_postprocessor=return_postprocessor, **options)


def detr_resnet101_dc5(pretrained=False, num_classes=91, return_postprocessor=False, **options):
    """DETR-DC5 R101: the last ResNet-101 stage dilated (paper: 44.9 AP)."""
    return _load("detr_resnet101_dc5", pretrained=pretrained, num_classes=num_classes,
                 return_postprocessor=return_postprocessor, **options)


def detr_resnet50_panoptic(pretrained=False, num_classes=250, threshold=0.85, return_postprocessor=False,
                           **options):
    """Panoptic DETR R50 (the mask head on the detector; paper: 43.4 PQ). The post-processor keeps
    segments whose class probability exceeds ``threshold``."""
    return _load("detr_resnet50_panoptic", pretrained=pretrained, num_classes=num_classes, threshold=threshold,
                 return_postprocessor=return_postprocessor, **options)


def detr_resnet50_dc5_panoptic(pretrained=False, num_classes=250, threshold=0.85, return_postprocessor=False,
                               **options):
    """Panoptic DETR-DC5 R50 (paper: 44.6 PQ). ``num_classes`` defaults to the checkpoint's 250
    (official DETR's entry says 91, which its own weights do not fit)."""
    return _load("detr_resnet50_dc5_panoptic", pretrained=pretrained, num_classes=num_classes,
                 threshold=threshold, return_postprocessor=return_postprocessor, **options)


def detr_resnet101_panoptic(pretrained=False, num_classes=250, threshold=0.85, return_postprocessor=False,
                            **options):
    """Panoptic DETR R101 (paper: 45.1 PQ). ``num_classes`` defaults to the checkpoint's 250
    (official DETR's entry says 91, which its own weights do not fit)."""
    return _load("detr_resnet101_panoptic", pretrained=pretrained, num_classes=num_classes, threshold=threshold,
                 return_postprocessor=return_postprocessor, **options)


def detr_resnet50_irpe_7x7(pretrained=False, num_classes=91, return_postprocessor=False, **options):
    """DETR-R50 with iRPE on the encoder's keys, ``rpe-1.9-product-ctx-1-k`` (7x7 buckets), 150 epochs
    (iRPE paper: 40.9 AP)."""
    return _load("detr_resnet50_irpe_7x7", pretrained=pretrained, num_classes=num_classes,
                 return_postprocessor=return_postprocessor, **options)


def detr_resnet50_irpe_9x9(pretrained=False, num_classes=91, return_postprocessor=False, **options):
    """DETR-R50 with iRPE, ``rpe-2.0-product-ctx-1-k`` (9x9 buckets), 150 epochs (iRPE paper: 41.0 AP)."""
    return _load("detr_resnet50_irpe_9x9", pretrained=pretrained, num_classes=num_classes,
                 return_postprocessor=return_postprocessor, **options)


def detr_resnet50_irpe_9x9_300ep(pretrained=False, num_classes=91, return_postprocessor=False, **options):
    """DETR-R50 with iRPE, ``rpe-2.0-product-ctx-1-k`` (9x9 buckets), 300 epochs (iRPE paper: 42.2 AP)."""
    return _load("detr_resnet50_irpe_9x9_300ep", pretrained=pretrained, num_classes=num_classes,
                 return_postprocessor=return_postprocessor, **options)
