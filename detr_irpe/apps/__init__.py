"""What the commands do, on top of the engine: the demo, prediction to files, pictures of a
checkpoint, the :class:`Detector` API and the ``detr-irpe`` console script (:mod:`.cli`)."""
