"""Autoencoder pre-training and greedy layer-wise stacking (Hinton & Salakhutdinov 2006;
Bengio et al. 2006), the unsupervised pre-training that came before transformers.

Layer k is trained as an autoencoder on the codes of layers 1..k-1 (frozen), minimising
||h - dec_k(enc_k(h))||^2; then the encoders are stacked under a classifier head and everything
is fine-tuned on the few labels there are.
"""

from __future__ import annotations

import torch
from torch import nn

from fastpt._checks import check_int


class StackedAutoencoder(nn.Module):
    """Encoders ``sizes[0] -> sizes[1] -> ...`` with sigmoid units, each with its own decoder."""

    def __init__(self, sizes: list[int]):
        super().__init__()
        if not isinstance(sizes, (list, tuple)) or len(sizes) < 2:
            raise ValueError(f"sizes must list at least an input and one hidden size, got {sizes!r}")
        for i, size in enumerate(sizes):  # True made a layer of 1 unit, 2.5 failed inside nn.Linear
            check_int(f"sizes[{i}]", size, minimum=1)
        self.sizes = list(sizes)
        self.encoders = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.decoders = nn.ModuleList(nn.Linear(b, a) for a, b in zip(sizes, sizes[1:]))

    def encode(self, x: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """The code of ``x`` after the first ``depth`` encoders (all of them for None)."""
        if depth is not None:  # a slice bound: 9 of 2 layers gave the top code, -1 one layer less
            check_int("depth", depth, minimum=0)
            if depth > len(self.encoders):
                raise ValueError(f"depth must be at most the {len(self.encoders)} encoders, got {depth}")
        for enc in self.encoders[:depth]:
            x = torch.sigmoid(enc(x))
        return x

    def reconstruction_loss(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """||h - dec(enc(h))||^2 per example, averaged, for one layer (decoder is linear for
        the first layer's real-valued pixels, sigmoid above, matching the codes' range)."""
        check_int("layer", layer, minimum=0)  # -1 took the top layer with a mismatched input
        if layer >= len(self.encoders):
            raise ValueError(f"layer must lie in [0, {len(self.encoders)}), got {layer}")
        code = torch.sigmoid(self.encoders[layer](h))
        out = self.decoders[layer](code)
        if layer > 0:
            out = torch.sigmoid(out)
        return ((h - out) ** 2).sum(-1).mean()

    def classifier(self, n_classes: int) -> nn.Sequential:
        """The stacked encoders (sharing these weights) under a fresh linear head."""
        layers: list[nn.Module] = []
        for enc in self.encoders:
            layers += [enc, nn.Sigmoid()]
        return nn.Sequential(*layers, nn.Linear(self.sizes[-1], n_classes))


def greedy_pretrain(model: StackedAutoencoder, x: torch.Tensor, epochs: int = 200,
                    lr: float = 1e-2, batch_size: int = 128, seed: int = 0) -> list[list[float]]:
    """Train each layer in turn on the frozen codes below it; returns each layer's loss curve."""
    _check_examples(x, model.encoders[0])
    if x.shape[1] != model.sizes[0]:
        raise ValueError(f"x has {x.shape[1]} features per example, the model's input size "
                         f"sizes[0] is {model.sizes[0]}")
    for name, value, low in (("batch_size", batch_size, 1), ("epochs", epochs, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    check_int("seed", seed)
    g = torch.Generator().manual_seed(seed)
    curves = []
    for layer in range(len(model.encoders)):
        with torch.no_grad():
            h = model.encode(x, depth=layer)  # frozen: no gradient reaches lower layers
        params = [*model.encoders[layer].parameters(), *model.decoders[layer].parameters()]
        opt = torch.optim.Adam(params, lr=lr)
        curve = []
        for _ in range(epochs):
            perm = torch.randperm(len(h), generator=g)
            total = 0.0
            for i in range(0, len(h), batch_size):
                loss = model.reconstruction_loss(h[perm[i:i + batch_size]], layer)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(perm[i:i + batch_size])
            curve.append(total / len(h))
        curves.append(curve)
    return curves


def _check_examples(x, net: nn.Module) -> None:
    """``x``: a non-empty (N, features) tensor of ``net``'s dtype, without NaN or infinities."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a (N, features) tensor, got {type(x).__name__}")
    if x.dim() != 2 or len(x) == 0:  # a per-example mean over no example is undefined
        raise ValueError(f"x must be a non-empty (N, features) tensor, got shape {tuple(x.shape)}")
    dtype = next(net.parameters()).dtype
    if x.dtype != dtype:
        raise ValueError(f"x is {x.dtype}, the model's weights are {dtype}: convert x (x.to({dtype}))")
    if not bool(torch.isfinite(x).all()):  # it would train every weight to NaN without a word
        raise ValueError("x holds NaN or infinite values")


def _check_targets(x: torch.Tensor, y, n_classes: int | None = None) -> None:
    """``y``: one integer class per example of ``x``, each in [0, n_classes) where given. A
    (1,) y was broadcast against every prediction in error_rate; a float one was refused by
    cross_entropy with a message naming neither."""
    if not isinstance(y, torch.Tensor) or y.shape != (len(x),):
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"y must be a ({len(x)},) tensor of class ids, one per example of x, got {shape}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"y must hold integer class ids, got {y.dtype}")
    if n_classes is not None and bool(((y < 0) | (y >= n_classes)).any()):
        raise ValueError(f"y must hold class ids in [0, {n_classes}) (the model's outputs), got values in "
                         f"[{int(y.min())}, {int(y.max())}]")


def fine_tune(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 300,
              lr: float = 1e-2, weight_decay: float = 1e-4) -> nn.Module:
    """Full-batch supervised fine-tuning of every layer (cross-entropy, Adam)."""
    _check_examples(x, net)
    check_int("epochs", epochs, minimum=0)
    with torch.no_grad():
        n_classes = net(x[:1]).shape[-1]
    _check_targets(x, y, n_classes)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


@torch.no_grad()
def error_rate(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    _check_examples(x, net)
    _check_targets(x, y)
    return float((net(x).argmax(-1) != y).float().mean())


def digits_experiment(seeds=range(5), n_labeled: int = 100, sizes=(64, 128, 64),
                      pretrain_epochs: int = 100) -> dict:
    """Test error on digits with ``n_labeled`` labels: random init vs greedy layer-wise
    autoencoder pre-training, both fine-tuned the same way; per seed and averaged."""
    from fastpt.data.digits import load_digits_split
    seeds = list(seeds)
    if not seeds:  # the mean over no seed was a ZeroDivisionError
        raise ValueError("seeds must hold at least one seed")
    rows = []
    for seed in seeds:
        data = load_digits_split(n_labeled=n_labeled, seed=seed)
        if sizes[0] != data["x_labeled"].shape[1]:  # else a shape error inside the random-init run
            raise ValueError(f"sizes[0] must be the {data['x_labeled'].shape[1]} pixels of a digit, got {sizes[0]}")
        errors = {}
        for pretrained in (False, True):
            torch.manual_seed(seed)
            ae = StackedAutoencoder(list(sizes))
            if pretrained:
                greedy_pretrain(ae, data["unlabeled"], epochs=pretrain_epochs, seed=seed)
            net = fine_tune(ae.classifier(10), data["x_labeled"], data["y_labeled"])
            errors["pretrained" if pretrained else "random_init"] = error_rate(net, data["x_test"], data["y_test"])
        rows.append({"seed": seed, **errors})
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("random_init", "pretrained")}
    return {"per_seed": rows, "mean": mean}
