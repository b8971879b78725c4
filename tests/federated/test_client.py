"""Local training on one compiled model: FedAvg with one client and one full batch is a
step of central gradient descent, FedSGD's mean is a step on the mean gradient, FedProx
with mu = 0 is FedAvg, and the local loop is traced once for every client and round."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from lmt_tf.data.preprocessing import Preprocessing
from lmt_tf.data.sources import load_digits
from lmt_tf.data.splits import Split
from lmt_tf.federated.client import ClientModel
from lmt_tf.federated.config import FederatedConfig
from lmt_tf.federated.partition import PartitionConfig, partition
from lmt_tf.federated.rounds import Federation
from lmt_tf.federated.simulation import simulate
from lmt_tf.models.mlp import build_mlp
from lmt_tf.runtime.env import set_seed

DIGITS = load_digits()
LR = 0.1


def _mlp(**kwargs) -> keras.Model:
    return build_mlp(hidden_units=(16,), **kwargs)


_model = Preprocessing().fit(DIGITS).wrap(_mlp)  # pixels 0-16 rescaled in the model


def _client(config: FederatedConfig) -> ClientModel:
    set_seed(0)
    return ClientModel(_model, DIGITS.input_shape, DIGITS.num_classes, config,
                       feature_dtype=DIGITS.train.x.dtype)


def _gradient_step(weights, split: Split) -> list[np.ndarray]:
    """One step of central full-batch gradient descent, by hand."""
    model = _model(input_shape=DIGITS.input_shape, num_classes=DIGITS.num_classes)
    model.set_weights(weights)
    x = tf.convert_to_tensor(split.x, tf.float32)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
            split.y.astype(np.int64), model(x, training=True)))
    gradients = tape.gradient(loss, model.trainable_variables)
    return [(v - LR * g).numpy() for v, g in zip(model.trainable_variables, gradients,
                                                 strict=True)]


def test_one_client_one_full_batch_is_a_step_of_central_gradient_descent() -> None:
    client = _client(FederatedConfig(local_epochs=1, local_batch_size=None,
                                     client_learning_rate=LR))
    start = client.get_weights()
    split = Split(DIGITS.train.x[:200], DIGITS.train.y[:200])
    result = client.fit(start, split, seed=0, round_=1, client=0)
    for got, want in zip(result.weights, _gradient_step(start, split), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert result.examples == 200 and result.loss > 0


def _local_run_by_hand(weights, split: Split, config: FederatedConfig, round_: int,
                       client: int) -> tuple[list[np.ndarray], float]:
    """A client's round by hand: SGD over ``local_batches``; the mean of its steps' losses
    (each the batch's mean loss before that step's update)."""
    from lmt_tf.federated.sampling import local_batches

    model = _model(input_shape=DIGITS.input_shape, num_classes=DIGITS.num_classes)
    model.set_weights(weights)
    order, bounds = local_batches(config, len(split), 0, round_, client)
    losses = []
    for start, end in bounds:
        ids = order[start:end]
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                split.y[ids].astype(np.int64),
                model(tf.convert_to_tensor(split.x[ids], tf.float32), training=True)))
        gradients = tape.gradient(loss, model.trainable_variables)
        for v, g in zip(model.trainable_variables, gradients, strict=True):
            v.assign_sub(config.client_learning_rate * g)
        losses.append(float(loss))
    return model.get_weights(), float(np.mean(losses))


def test_a_clients_loss_is_the_mean_of_its_own_steps_losses() -> None:
    """Two clients in turn on one model: each reports the mean of its own steps' losses
    in the round (a running mean over clients would give the second one another)."""
    config = FederatedConfig(local_epochs=2, local_batch_size=32, client_learning_rate=LR)
    client = _client(config)
    start = client.get_weights()
    for k, ids in enumerate([range(0, 150), range(150, 250)]):  # 150: a partial batch
        split = Split(DIGITS.train.x[list(ids)], DIGITS.train.y[list(ids)])
        result = client.fit(start, split, seed=0, round_=3, client=k)
        weights, loss = _local_run_by_hand(start, split, config, 3, k)
        assert result.loss == pytest.approx(loss, rel=1e-5)
        for got, want in zip(result.weights, weights, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _rounds(config: FederatedConfig, rounds: int = 2, clients: int = 8):
    client = _client(config)
    parts = partition(DIGITS.train.y, PartitionConfig(clients=clients), seed=0)
    federation = Federation(config, parts, DIGITS.train, seed=0)
    records = []
    state = simulate(federation, client, federation.initial_state(client.get_weights()),
                     DIGITS.test, lambda record, _: records.append(record))
    return state.weights, records, client


def test_fedsgd_takes_one_step_on_the_example_weighted_mean_gradient() -> None:
    config = FederatedConfig(rounds=1, client_fraction=0.5, local_batch_size=None,
                             client_learning_rate=LR)
    weights, (record,), client = _rounds(config)
    start = _client(config).get_weights()  # the same seed: the same initial weights
    parts = partition(DIGITS.train.y, PartitionConfig(clients=8), seed=0)
    steps = [_gradient_step(start, Split(DIGITS.train.x[parts.clients[k]],
                                         DIGITS.train.y[parts.clients[k]]))
             for k in record.clients]
    sizes = [len(parts.clients[k]) for k in record.clients]
    for i, w in enumerate(weights):
        by_hand = sum(n * s[i] for n, s in zip(sizes, steps, strict=True)) / sum(sizes)
        np.testing.assert_allclose(w, by_hand, rtol=1e-5, atol=1e-6)


def test_fedprox_with_mu_zero_is_fedavg_and_with_mu_it_is_not() -> None:
    base = dict(rounds=2, client_fraction=0.5, local_epochs=2, local_batch_size=20,
                client_learning_rate=LR)
    fedavg, _, _ = _rounds(FederatedConfig(**base))
    prox0, _, _ = _rounds(FederatedConfig(prox_mu=0.0, **base))
    prox, _, _ = _rounds(FederatedConfig(prox_mu=1.0, **base))
    for a, b in zip(fedavg, prox0, strict=True):
        np.testing.assert_array_equal(a, b)
    assert max(float(np.abs(a - b).max()) for a, b in zip(fedavg, prox, strict=True)) > 1e-4


def test_the_proximal_term_pulls_clients_toward_the_global_model() -> None:
    base = dict(local_epochs=5, local_batch_size=10, client_learning_rate=LR)
    split = Split(DIGITS.train.x[:100], DIGITS.train.y[:100])

    def drift(mu: float) -> float:
        client = _client(FederatedConfig(prox_mu=mu, **base))
        start = client.get_weights()
        new = client.fit(start, split, 0, 1, 0).weights
        return float(np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(new, start,
                                                                     strict=True))))

    assert drift(5.0) < 0.8 * drift(0.0)


def test_the_local_loop_is_traced_once_for_every_client_and_round() -> None:
    config = FederatedConfig(rounds=4, client_fraction=0.5, local_epochs=1, local_batch_size=7)
    _, records, client = _rounds(config, rounds=4, clients=6)
    assert len(records) == 4 and sum(len(r.clients) for r in records) == 12
    assert client.traces == 1  # client sizes and batch counts differ: no retrace


@pytest.mark.parametrize("private", [False, True])
def test_accuracy_rises_over_rounds(private: bool) -> None:
    dp = dict(dp_clip_norm=5.0, dp_noise_multiplier=0.01) if private else {}
    config = FederatedConfig(rounds=6, client_fraction=0.5, local_epochs=2,
                             local_batch_size=10, client_learning_rate=LR, **dp)
    _, records, _ = _rounds(config, clients=8)
    accuracy = [r.test["accuracy"] for r in records]
    assert accuracy[-1] > accuracy[0] + 0.2 and accuracy[-1] > 0.7
    assert all(r.bytes_up == r.bytes_down == len(r.clients) * 4 * (64 * 16 + 16 + 16 * 10 + 10)
               for r in records)
    if private:
        epsilons = [r.epsilon for r in records]
        assert all(a < b for a, b in zip(epsilons, epsilons[1:], strict=False))
