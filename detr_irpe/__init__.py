"""detr_irpe: DETR with image relative position encoding (iRPE) in the encoder."""

__version__ = "0.1.0"
