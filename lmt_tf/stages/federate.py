"""The ``federate`` stage: federated training of the current model, simulated in this
process (every client on one compiled model), each round logged to the run and
checkpointed, so a killed run resumes at its last round."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from lmt_tf.checks import check, check_arguments
from lmt_tf.data.splits import Split, Splits
from lmt_tf.errors import ConfigError
from lmt_tf.federated.client import ClientModel
from lmt_tf.federated.config import FederatedConfig
from lmt_tf.federated.partition import PartitionConfig, partition, write_artifacts
from lmt_tf.federated.privacy import dp_delta
from lmt_tf.federated.rounds import Federation, RoundRecord, RoundState
from lmt_tf.federated.simulation import simulate
from lmt_tf.invocation import FlowerRole, RunOptions
from lmt_tf.stages.context import RunContext, Setup, Stage, prefixed
from lmt_tf.training.train_config import TrainConfig


class Federate(Stage):
    """Federated training (FedSGD, FedAvg, FedProx, FedAvgM, FedAdam, DP-FedAvg) from the
    current model's weights, on the experiment's model builder, loss and data.

    Args:
      config: the algorithm (``@FederatedConfig()``; its fields are gin bindings).
      partition: how the training split is divided among clients (``@PartitionConfig()``).
    """

    name = "federate"
    trains = True
    federates = True

    def __init__(self, config: FederatedConfig | None = None,
                 partition: PartitionConfig | None = None):
        check_arguments(self.name, type(self), locals())
        self.config = config or FederatedConfig()
        self.partition = partition or PartitionConfig()

    def describe(self) -> str:
        return (f"federate ({self.config.describe(self.partition.clients)}; "
                f"{self.partition.scheme} partition)")

    def check(self, context: RunContext) -> None:
        info = context.setup.info
        if info.replicas != 1 or not context.setup.role.is_chief:
            raise ConfigError(f"the federate stage simulates clients in one process; run it "
                              f"under the default strategy, not {info.name} with "
                              f"{info.replicas} replica(s)")
        if not isinstance(context.splits.train, Split):
            raise ConfigError("the federate stage partitions examples in memory; its data "
                              "source must load arrays (not TFRecord files)")
        check(self.partition.clients <= len(context.splits.train), "PartitionConfig.clients",
              f"{self.partition.clients} clients need at least as many training examples, "
              f"got {len(context.splits.train)}")

    def restore(self, context: RunContext) -> None:
        saved = self._saved(context)
        if saved is None:  # its checkpoint is gone: federate again
            self.work(context)
            return
        context.model.set_weights(saved.weights)
        context.echo(f"lmt: federate: done in an earlier attempt; restored round "
                     f"{saved.round}")

    def _saved(self, context: RunContext) -> RoundState | None:
        source = context.resumed(self.name)
        return RoundState.latest(source.checkpoints) if source is not None else None

    def work(self, context: RunContext) -> None:
        config, run, seed, splits = self.config, context.run, context.setup.seed, context.splits
        own = context.stage_dir(self.name)
        saved = self._saved(context)
        parts = partition(splits.train.y, self.partition, seed)
        federation = Federation(config, parts, splits.train, seed)
        client = self._client_model(context.setup.model_fn, splits, context.setup.configs.train)
        if saved is None:
            summary = parts.summary(splits.train.y, splits.num_classes, self.partition, seed)
            for path in write_artifacts(summary, splits.num_classes, own.path):
                run.log_artifact(path, self.name)
            run.log_params({f"{self.name}.delta": dp_delta(config, len(parts))}
                           if config.private else {})
            state = federation.initial_state(context.model.get_weights())
        else:
            state = saved
            context.echo(f"lmt: federate: resuming at round {state.round + 1}")
        context.echo(f"lmt: {self.describe()}; client sizes "
                     f"{int(parts.sizes().min())}..{int(parts.sizes().max())}")
        log_file = own.path / "rounds.jsonl"
        tested: dict[int, dict[str, float]] = {}  # the last evaluated round's test metrics

        def on_round(record: RoundRecord, new: RoundState) -> None:
            if record.test:
                tested.clear()
                tested[record.round] = record.test
            # The checkpoint first: a run killed in between logs no round twice.
            new.save(own.checkpoints)
            context.session.own.update_state(federate_round=record.round)
            context.session.own.mark_latest()  # a run with a checkpoint is one --resume continues
            run.log_metrics(prefixed(record.metrics(new), self.name), record.round)
            with log_file.open("a") as out:
                out.write(json.dumps({"round": record.round, "clients": record.clients,
                                      **record.metrics(new)}) + "\n")
            context.echo(_progress(record, config.rounds))

        flower = context.options.flower
        if flower is not None:
            from lmt_tf.federated.flower import serve

            state = serve(federation, client, state, splits.test, on_round, flower.address,
                          context.echo, flower.tls)
        else:
            state = simulate(federation, client, state, splits.test, on_round)
        context.model.set_weights(state.weights)
        # The last round is always evaluated; a resumed run that had no round left is not.
        test = tested.get(state.round) or client.evaluate(state.weights, splits.test)
        if state.reached_target is not None:
            run.log_metrics({f"{self.name}/rounds_to_target": state.reached_target},
                            state.round)
        run.log_artifact(log_file, self.name)
        run.set_tags({"lmt.federate.traces": client.traces})
        context.test_metrics = test
        context.add_row(self.name, context.model, test)
        reached = (f"; target {config.target_accuracy} reached in round {state.reached_target}"
                   if state.reached_target is not None else "")
        context.echo(f"lmt: federate: {state.round} rounds, test "
                     + ", ".join(f"{k} {v:.4f}" for k, v in test.items()) + reached)

    def _client_model(self, model_fn: Any, splits: Splits, train: TrainConfig) -> ClientModel:
        return ClientModel(model_fn, splits.input_shape, splits.num_classes, self.config,
                           train.loss, train.metrics, feature_dtype=splits.train.x.dtype)

    def serve_client(self, splits: Splits, model_fn: Any, seed: int, train: TrainConfig,
                     flower: FlowerRole, echo: Callable[[str], None]) -> None:
        """This process as client ``flower.client`` of a Flower deployment: it keeps only
        its own part of the training split and trains it when the server asks."""
        from lmt_tf.federated.flower import run_client

        clients = self.partition.clients
        check(0 <= flower.client < clients, "--client",
              f"must be in [0, {clients}) for PartitionConfig.clients = {clients}, got "
              f"{flower.client}")
        parts = partition(splits.train.y, self.partition, seed)
        mine = Federation(self.config, parts, splits.train, seed).client_split(flower.client)
        run_client(self._client_model(model_fn, splits, train), mine, flower.client, seed,
                   flower.address, echo, flower.tls)


def _progress(record: RoundRecord, rounds: int) -> str:
    text = (f"lmt: round {record.round}/{rounds}: {len(record.clients)} clients, "
            f"train loss {record.train_loss:.4f}")
    if record.test:
        text += ", test " + ", ".join(f"{k} {v:.4f}" for k, v in record.test.items())
    if record.epsilon is not None:
        text += f", epsilon {record.epsilon:.3g}"
    return text + f" ({record.seconds:.1f} s)"


def serve_flower_client(setup: Setup, options: RunOptions) -> None:
    """This process as a client of a Flower deployment (``lmt flower-client``): the
    experiment's federate stage serves client ``options.flower.client``; nothing is
    logged to MLflow (the server logs the run).

    Raises:
      ConfigError: if the experiment has no federate stage.
    """
    federate = [stage for stage in setup.stages if isinstance(stage, Federate)]
    if not federate:
        raise ConfigError("a Flower client needs an experiment with a federate stage "
                          "(include 'gin/federated/fedavg.gin')")
    federate[0].serve_client(setup.splits, setup.model_fn, setup.seed, setup.configs.train,
                             options.flower, options.echo)
