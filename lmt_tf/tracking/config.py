"""``TrackingConfig``: where and how much a run logs to MLflow."""

from __future__ import annotations

from dataclasses import dataclass

from lmt_tf.checks import check, check_types
from lmt_tf.tracking.store import DEFAULT_ARTIFACTS


@dataclass
class TrackingConfig:
    """Where and how much a run logs to MLflow."""

    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///./mlruns.db
    artifact_root: str = DEFAULT_ARTIFACTS  # artifacts of new experiments in a local store
    experiment_name: str | None = None  # None: the experiment's name
    log_every_n_steps: int = 0  # also log training metrics every N steps; 0: per epoch only
    # TensorBoard logs of the train stage (scalars per epoch, the graph), logged as the
    # run's tensorboard/ artifacts; `lmt tensorboard RUN` serves them.
    tensorboard: bool = False
    # With tensorboard: profile these training steps (first, last; 1-based), e.g.
    # (10, 12); (0, 0): no profile.
    tensorboard_profile: tuple[int, ...] = (0, 0)

    def __post_init__(self) -> None:
        if isinstance(self.tensorboard_profile, list):  # gin writes [...] as a list
            self.tensorboard_profile = tuple(self.tensorboard_profile)
        check_types(self)
        check(self.log_every_n_steps >= 0, "TrackingConfig.log_every_n_steps",
              f"must be >= 0, got {self.log_every_n_steps}")
        first, last = (self.tensorboard_profile + (0, 0))[:2]
        check(len(self.tensorboard_profile) == 2 and 0 <= first <= last
              and (first > 0 or last == 0), "TrackingConfig.tensorboard_profile",
              f"must be (first, last) steps with 1 <= first <= last, or (0, 0), got "
              f"{self.tensorboard_profile}")
