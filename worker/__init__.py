"""difflabel's data plane: the scoring engine, model backends and the Celery worker.

Importing this package does not import torch; the engine modules that need it
(``worker.scoring``, ``worker.classifier``, ``worker.backends``) import it themselves,
so the orchestrator can use the pure pieces (``worker.pruning``, ``worker.config``,
``worker.errors``) and still answer at once.
"""
