"""Random int8 tensors for the int8 tests."""

import torch


def rand_int8(*shape):
    return torch.randint(-128, 128, shape, dtype=torch.int8)
