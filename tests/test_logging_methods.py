"""fastft/logging_methods.py: logger calls inside a forward are skipped while Dynamo traces it (no
graph break), and the set fastft puts in Dynamo's config survives what torch does with its config."""
from __future__ import annotations

import copy
import json
import logging
import pickle

import torch
import torch.nn as nn

import fastft
from fastft.logging_methods import logging_methods
from fastft.optimize import state_of

from helpers import DEVICE

_logger = logging.getLogger("fastft.tests.chatty")


class Chatty(nn.Module):
    """Two linears with logger calls between them, as model code often has."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        _logger.warning("between the layers")
        _logger.info("still between the layers: %s", "formatted")
        return self.second(torch.relu(h))


def test_logger_calls_inside_a_forward_break_no_graph():
    torch.manual_seed(0)
    model = Chatty().to(DEVICE)
    reference = copy.deepcopy(model)
    fastft.optimize(model)
    x = torch.randn(3, 8, device=DEVICE)
    out = model(x)
    report = fastft.report(model)
    assert report.capture_failures == [] and report.graph_breaks == [], str(report)
    assert len(state_of(model).graphs) == 1
    torch.testing.assert_close(out, reference(x))


def test_the_set_holds_the_logger_methods_dynamo_looks_up():
    methods = logging_methods()
    for name in ("warning", "info", "debug", "error", "exception", "critical", "log"):
        method = getattr(_logger, name)
        # Dynamo asks with the bound method's function
        assert method.__func__ in methods and getattr(logging.Logger, name) in methods, name
    assert logging.Logger.isEnabledFor not in methods and logging.Logger.addHandler not in methods


def test_the_set_sorts_encodes_copies_and_pickles():
    methods = logging_methods()
    # torch 2.11's compile-metrics logger: every set in Dynamo's config sorted, then JSON-encoded
    encoded = json.loads(json.dumps(sorted(methods)))
    assert "logging.Logger.warning" in encoded
    # Dynamo deep-copies its config to report it, and pickles it for compile workers
    for kept in (copy.deepcopy(methods), pickle.loads(pickle.dumps(methods))):
        assert logging.Logger.warning in kept and kept == methods
