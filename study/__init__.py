"""The parts of the real-data study that ``study_real_data.py`` runs.

* :mod:`study.plan`        presets, arms, their config overrides and their equal step budget
* :mod:`study.results`     the committed files: per-fold rows, run costs, loss curves (CSV), JSON I/O
* :mod:`study.stats`       per-fold rows -> means ± sd and paired bootstrap differences
* :mod:`study.render`      tables, verdicts, figures, ``results.md`` and the README / RESULTS block
* :mod:`study.bn_control`  the random-init and BatchNorm-statistics arms' encoders
* :mod:`study.provenance`  package versions, the git state and the machine, for ``settings.json``

The stages themselves run through :mod:`utils.stage_runner`, as in ``run_pipeline.py``.
"""


class StudyError(RuntimeError):
    """The study cannot go on; the message (one line unless it quotes a log) names the file or stage."""
