"""Model builders."""

from __future__ import annotations

import pytest

from lmt_tf.errors import ConfigError
from lmt_tf.models.cnn import build_cnn
from lmt_tf.models.mlp import build_mlp


def test_cnn_is_the_fedavg_architecture() -> None:
    model = build_cnn((28, 28), 10)
    convs = [layer for layer in model.layers if layer.name.startswith("conv")]
    assert [(c.filters, c.kernel_size) for c in convs] == [(32, (5, 5)), (64, (5, 5))]
    assert [layer.pool_size for layer in model.layers if "pool" in layer.name] == [(2, 2)] * 2
    assert model.get_layer("dense").units == 512
    # 5*5*32+32 + 5*5*32*64+64 + 7*7*64*512+512 + 512*10+10 (McMahan et al., 2017)
    assert model.count_params() == 1_663_370
    assert model.output_shape == (None, 10)


def test_cnn_rejects_non_images() -> None:
    with pytest.raises(ConfigError, match="image input"):
        build_cnn((784,), 10)


def test_mlp_shapes_and_float32_output() -> None:
    model = build_mlp((8, 8), 10, hidden_units=(16, 8))
    assert model.count_params() == (64 * 16 + 16) + (16 * 8 + 8) + (8 * 10 + 10)
    assert model.layers[-1].dtype == "float32"
    with pytest.raises(ConfigError, match="dropout"):
        build_mlp((4,), 2, dropout=1.0)


def test_recommender_tables_and_rating_output() -> None:
    from lmt_tf.models.recommender import build_recommender

    model = build_recommender((2,), 1, num_users=10, num_items=20, embedding_dim=4,
                              hidden_units=(8,))
    assert model.get_layer("user_embedding").input_dim == 10
    assert model.get_layer("item_embedding").input_dim == 20
    assert model.output_shape == (None, 1)
    assert model.count_params() == 10 * 4 + 20 * 4 + (8 * 8 + 8) + (8 + 1)
    with pytest.raises(ConfigError, match="\\(user, item\\) pairs"):
        build_recommender((28, 28), 10)
