"""Numeric comparisons for tests on tiny random-initialised models."""

import torch


def assert_close_scaled(got, want):
    """``assert_close`` relative to the reference's largest entry: maps of tiny random models can be
    ~1e-10, which any absolute tolerance would wave through. Accepts tensors or numpy arrays."""
    got, want = torch.as_tensor(got), torch.as_tensor(want)
    scale = want.abs().max()
    assert scale > 0, "the reference is all zero: the comparison would prove nothing"
    torch.testing.assert_close(got / scale, want / scale, atol=1e-5, rtol=1e-4)
