"""The ``prototypes`` stage: the few-shot baseline that trains nothing. Each test example
takes the class of the nearest class mean of the training examples' embeddings (the
model's input to its head). Put before ``train`` it measures the transferred source as
it is."""

from __future__ import annotations

import numpy as np

from lmt_tf.errors import ConfigError
from lmt_tf.stages.context import RunContext, Stage, model_ready
from lmt_tf.transfer import embedding_model, prototype_predictions


class Prototypes(Stage):
    """Nearest class-mean classification with the current model's embeddings; logs
    ``prototypes/test_accuracy``."""

    name = "prototypes"
    chief_only = True

    def check(self, context: RunContext) -> None:
        if context.splits.num_classes < 2:
            raise ConfigError("prototypes classify; the data is a regression")

    def work(self, context: RunContext) -> None:
        train_x, train_y = model_ready(context.splits.train)
        test_x, test_y = context.test_arrays()
        predicted = prototype_predictions(embedding_model(context.model), train_x, train_y,
                                          test_x, context.splits.num_classes)
        accuracy = float(np.mean(predicted == test_y))
        context.run.log_metrics({"prototypes/test_accuracy": accuracy}, step=0)
        context.echo(f"lmt: prototypes (nearest class mean of {len(train_x)} training "
                     f"embeddings): test accuracy {accuracy:.4f}")
