"""The parts of the real-data study that ``study_real_data.py`` runs.

* :mod:`study.plan`        which runs exist, their config overrides and their equal step budget
* :mod:`study.report`      rows, tables, mask statistics, figures and ``results.md`` / ``results.json``
* :mod:`study.provenance`  package versions and the git state recorded in ``settings.json``
* :mod:`study.stats`       per-fold rows -> means ± sd and paired bootstrap differences

The stages themselves run through :mod:`utils.stage_runner`, as in ``run_pipeline.py``.
"""


class StudyError(RuntimeError):
    """The study cannot go on; the message (one line unless it quotes a log) names the file or stage."""
