"""``lmt sweep``: a grid or a search over gin bindings on Optuna, each trial an ``lmt
run`` process nested under the sweep's parent run. ``space`` parses the dimensions,
``driver`` runs the study and its trials, ``table`` shows them as they finish."""
