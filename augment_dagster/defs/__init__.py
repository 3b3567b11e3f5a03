"""Everything Dagster (the layout of Dagster's ``project_ml`` example): ``experiments.py`` turns experiment configs
into definitions; ``assets/`` holds one module per stage; ``checks.py`` the asset-check wiring; ``resources.py``
the store, models and LLM resources (``tracking.py``: MLflow); ``automation.py`` sensors and schedules;
``scaleout.py`` executors, Pipes clients and the instance yaml; ``pipes_worker.py`` the out-of-process worker.
The code location (``augment_dagster/definitions.py``) loads it. Algorithms stay outside (no Dagster there).
"""
