"""Shared test helpers. In CI (CI=true) a skipped test fails the run: nothing is skipped silently."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN random affine parameters and running statistics (in place), so that
    checks run in eval mode are not trivially satisfied by identity-like BN layers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) or type(m).__name__ == "FrozenBatchNorm2d":
                n = m.weight.shape[0]
                if m.weight.abs().sum() > 0:  # keep zero-initialised BNs (identity blocks) at zero
                    m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
    return model


@pytest.fixture
def rand_norms():
    return randomize_norms


_skipped: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("CI") and _skipped and session.exitstatus == 0:
        session.exitstatus = 1
        print(f"\nCI: {len(_skipped)} test(s) were skipped; every test must run in CI: {_skipped}")
