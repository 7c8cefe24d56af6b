"""Greedy layer-wise autoencoder pre-training on scikit-learn's digits."""

import pytest
import torch

from fastpt.data.digits import load_digits_split
from fastpt.pretrain.autoencoder import (StackedAutoencoder, digits_experiment, error_rate,
                                         fine_tune, greedy_pretrain)


def test_digits_split():
    d = load_digits_split(n_labeled=100, seed=0)
    assert d["x_labeled"].shape == (100, 64) and torch.bincount(d["y_labeled"]).tolist() == [10] * 10
    assert 0.0 <= float(d["unlabeled"].min()) and float(d["unlabeled"].max()) <= 1.0
    assert len(d["x_test"]) == 597
    with pytest.raises(ValueError, match="n_labeled"):
        load_digits_split(n_labeled=5)


def test_greedy_layerwise_trains_each_layer_on_frozen_codes():
    torch.manual_seed(0)
    x = load_digits_split(seed=0)["unlabeled"][:400]
    ae = StackedAutoencoder([64, 32, 16])
    before = [p.clone() for p in ae.encoders[0].parameters()]
    frozen_first = {}

    original = ae.reconstruction_loss

    def spy(h, layer):  # once layer 1 trains, layer 0 must no longer move
        if layer == 1 and not frozen_first:
            frozen_first.update({i: p.clone() for i, p in enumerate(ae.encoders[0].parameters())})
        return original(h, layer)
    ae.reconstruction_loss = spy
    curves = greedy_pretrain(ae, x, epochs=15, seed=0)
    assert len(curves) == 2
    for curve in curves:
        assert curve[-1] < 0.7 * curve[0]  # each layer learns to reconstruct its input
    assert any(not torch.equal(a, b) for a, b in zip(before, ae.encoders[0].parameters()))
    for i, p in enumerate(ae.encoders[0].parameters()):
        assert torch.equal(frozen_first[i], p)


def test_classifier_shares_the_pretrained_encoders():
    ae = StackedAutoencoder([64, 16, 8])
    net = ae.classifier(10)
    assert net[0] is ae.encoders[0] and net[2] is ae.encoders[1]
    d = load_digits_split(seed=1)
    fine_tune(net, d["x_labeled"], d["y_labeled"], epochs=100)
    assert error_rate(net, d["x_labeled"], d["y_labeled"]) < 0.2
    with pytest.raises(ValueError, match="sizes"):
        StackedAutoencoder([64])


@pytest.mark.slow
def test_pretraining_lowers_test_error_with_100_labels():
    """The seed lecture's MNIST table in miniature (README records the numbers)."""
    result = digits_experiment(seeds=range(5))
    print(result)
    assert result["mean"]["pretrained"] < result["mean"]["random_init"]


@pytest.mark.parametrize("x, kwargs, message", [
    (torch.rand(20, 5), {}, r"5 features per example.*sizes\[0\] is 6"),   # was torch's "mat1 and mat2 shapes"
    (torch.randint(0, 2, (20, 6)), {}, "x is torch.int64.*torch.float32"),  # was "must have the same dtype"
    (torch.rand(20, 6, dtype=torch.float64), {}, "x is torch.float64"),
    (torch.full((20, 6), float("nan")), {}, "NaN or infinite"),           # trained to NaN curves silently
    (torch.rand(20, 6), {"batch_size": 2.5}, "batch_size.*2.5"),           # was a bare TypeError in range()
    (torch.rand(20, 6), {"batch_size": True}, "batch_size.*True"),
    (torch.rand(20, 6), {"epochs": -1}, "epochs.*-1"),
    ([[0.5] * 6] * 20, {}, "x must be a .*tensor, got list"),
])
def test_greedy_pretrain_names_bad_input(x, kwargs, message):
    with pytest.raises(ValueError, match=message):
        greedy_pretrain(StackedAutoencoder([6, 4]), x, **{"epochs": 1, **kwargs})
