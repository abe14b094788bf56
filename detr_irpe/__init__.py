"""detr_irpe: DETR with image relative position encoding (iRPE) in the encoder.

``from detr_irpe import Detector`` gives the Python API of a trained detector
(:class:`detr_irpe.apps.detector.Detector`); it is imported on first use, so that
``import detr_irpe.irpe`` alone stays light.
"""

__version__ = "0.1.0"
__all__ = ["Detector"]


def __getattr__(name):
    if name == "Detector":
        from .apps.detector import Detector

        return Detector
    raise AttributeError(f"module 'detr_irpe' has no attribute {name!r}")
