"""Tests of lmt_tf.federated."""
