"""``python -m detr_irpe`` is the ``detr-irpe`` console script."""
import sys

from .apps.cli import main

sys.exit(main())
