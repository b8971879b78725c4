"""MLflow tracking, one job per module: ``store`` (where runs are stored, reaching it,
ending orphaned runs), ``credentials`` (passwords never shown), ``config``
(``TrackingConfig``), ``run`` (the lifecycle of one run) and ``read`` (finding runs and
loading their models). Import names from the module that owns them."""
