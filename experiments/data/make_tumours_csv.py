"""Writes tumours.csv, the CSV example's data: scikit-learn's breast-cancer tumours with
the first ten features, a categorical column 'clinic' (1-4, drawn per tumour) and 8% of
the feature cells left empty, as exported from a spreadsheet. Seeded: the same file
every time.

    python experiments/data/make_tumours_csv.py
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer

FEATURES = 10
MISSING = 0.08  # fraction of feature cells left empty


def main() -> None:
    bunch = load_breast_cancer()
    rng = np.random.default_rng(2026)
    names = [n.replace(" ", "_") for n in bunch.feature_names[:FEATURES]]
    out = Path(__file__).with_name("tumours.csv")
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["clinic", *names, "benign"])
        for x, y in zip(bunch.data[:, :FEATURES], bunch.target, strict=True):
            cells = ["" if rng.random() < MISSING else f"{v:g}" for v in x]
            writer.writerow([int(rng.integers(1, 5)), *cells, int(y)])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
