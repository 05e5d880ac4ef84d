"""The shared core: everything both attnprobe and deltadistill build on, nothing above it.

* :mod:`~attnprobe.core.family` + :mod:`~attnprobe.core.families` — one adapter per model family;
* :mod:`~attnprobe.core.sites` — self-attention sites and their token grids;
* :mod:`~attnprobe.core.registry` — model names → pipelines (offline), architecture configs;
* :mod:`~attnprobe.core.pipeline` — calling any pipeline the same way;
* :mod:`~attnprobe.core.backends` — the one kernel backend registry;
* :mod:`~attnprobe.core.outputs` — atomic files and folders, prompt files;
* :mod:`~attnprobe.core.tiny` — parts of the tiny random-weight test pipelines;
* :mod:`~attnprobe.core.cli`, :mod:`~attnprobe.core.errors` — the one CLI error path.

Modules here import only each other (and third-party libraries).
"""
