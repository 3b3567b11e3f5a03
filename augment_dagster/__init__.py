"""augment-dagster: diffusion-based few-shot image augmentation methods as one Dagster asset graph.

Importing the package loads neither torch nor Dagster; see ``augment_dagster.definitions`` for the code
location and ``augment_dagster.cli`` for the ``augment`` command.
"""

__version__ = "0.1.0"
