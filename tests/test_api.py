"""The public API's contract: plain modules, bad input, graph breaks, failed captures, failing checks,
HF Trainer, and the fastft-inspect command."""
from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
import torch.nn as nn

import fastft
from fastft.cli import main as inspect_main
from fastft.passes.pattern import Pattern, Replacement
from fastft.patterns import RMS_NORM

# What the tiny two-layer Llama-style model has: 5 RMSNorms, 2 rotary attentions, 2 gated MLPs
# and the loss (qwen3 adds q/k norms: 9 RMSNorms).
LLAMA_COUNTS = {"rms_norm": 5, "rope": 2, "glu_mlp": 2, "linear_cross_entropy": 1}
from fastft.tiny import random_batch

from helpers import DEVICE, assert_same_training, tiny, twin


class Norm(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width))

    def forward(self, x):
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


@dataclasses.dataclass
class Out:
    hidden: torch.Tensor
    loss: torch.Tensor


class Plain(nn.Module):
    def __init__(self, returns: str) -> None:
        super().__init__()
        self.returns = returns
        self.lin = nn.Linear(6, 10)
        self.norm = Norm(10)

    def forward(self, x):
        h = self.norm(self.lin(x))
        loss = h.square().mean()
        if self.returns == "tensor":
            return loss
        if self.returns == "tuple":
            return loss, h
        return Out(hidden=h, loss=loss)


@pytest.mark.parametrize("returns", ["tensor", "tuple", "dataclass"])
def test_plain_modules(returns):
    torch.manual_seed(0)
    model = Plain(returns).to(DEVICE)
    x = torch.randn(5, 6, device=DEVICE)
    fastft.optimize(model)
    loss_fn = (lambda out: out[0]) if returns == "tuple" else None
    result = fastft.check(model, (x,), loss_fn=loss_fn)
    assert result.ok, str(result)
    assert fastft.report(model).counts() == {"rms_norm": 1}
    assert result.regions_checked == 1


def test_not_a_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fastft.optimize(lambda x: x)


def test_unknown_option():
    with pytest.raises(TypeError, match="unknown option"):
        fastft.optimize(Plain("tensor"), turbo=True)


def test_cuda_graphs_reach_inductor_and_refuse_eager_lowering(monkeypatch):
    with pytest.raises(ValueError, match="cuda_graphs needs Inductor"):
        fastft.optimize(Plain("tensor"), cuda_graphs=True, lower="eager")
    import torch._inductor.compile_fx as inductor

    seen = []

    def spy(gm, example_inputs, config_patches=None, **kw):  # stands in for Inductor on the CPU
        seen.append(config_patches)
        return gm.forward

    monkeypatch.setattr(inductor, "compile_fx", spy)
    for flag in (True, False):
        model = fastft.optimize(Plain("tensor"), cuda_graphs=flag, lower="inductor")
        model(torch.randn(3, 6))
        patches = seen.pop()
        assert patches["triton.cudagraphs"] is flag
        # The norm's joins with the adds beside it run in each graph Inductor lowers.
        assert type(patches["post_grad_custom_post_pass"]).__name__ == "LoweredJoins"
        assert set(patches) == {"triton.cudagraphs", "post_grad_custom_post_pass"}
        assert fastft.report(model).counts() == {"rms_norm": 1}


def test_unsupported_parameter_dtype_names_the_parameter():
    model = Plain("tensor").double()
    with pytest.raises(TypeError, match=r"'lin.weight' is torch.float64"):
        fastft.optimize(model)


def test_report_and_check_need_an_optimised_model():
    with pytest.raises(ValueError, match="not optimised"):
        fastft.report(Plain("tensor"))
    with pytest.raises(fastft.CheckError, match="not optimised"):
        fastft.check(Plain("tensor"), (torch.randn(2, 6),))


def test_check_without_a_loss_says_so():
    model = fastft.optimize(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(fastft.CheckError, match="loss"):
        fastft.check(model, (torch.randn(3, 4),))


class Breaks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = Norm(8)
        self.norm2 = Norm(8)

    def forward(self, x):
        h = self.norm1(x)
        if h.sum() > 0:  # data-dependent control flow: Dynamo must break the graph here
            h = h * 2
        return self.norm2(h).mean()


def test_graph_break_is_reported_and_model_still_correct():
    torch.manual_seed(0)
    model = Breaks().to(DEVICE)
    reference = twin(model)
    fastft.optimize(model)
    x = torch.randn(4, 8, device=DEVICE)
    loss = model(x)
    assert torch.allclose(loss, reference(x), atol=1e-5)
    report = fastft.report(model)
    assert report.graph_breaks, str(report)
    assert report.counts() == {"rms_norm": 2}  # one in each graph around the break
    assert {r.module_path for r in report.rewrites} == {"norm1", "norm2"}
    assert fastft.check(model, (x,)).ok


LOGGER = logging.getLogger(__name__)  # module-level, as libraries keep theirs


class Chatty(nn.Module):
    """Logs a warning in its forward between two norms, as library models do."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1 = Norm(8)
        self.norm2 = Norm(8)

    def forward(self, x):
        h = self.norm1(x)
        LOGGER.warning("a warning inside the forward")
        return self.norm2(h).mean()


def test_a_logging_call_does_not_break_the_graph():
    torch.manual_seed(0)
    model = fastft.optimize(Chatty().to(DEVICE), fullgraph=True)  # a break would raise
    x = torch.randn(4, 8, device=DEVICE)
    model(x).backward()
    report = fastft.report(model)
    assert not report.graph_breaks and report.counts() == {"rms_norm": 2}, str(report)
    assert fastft.check(model, (x,)).ok


def test_graph_break_with_fullgraph_is_an_error():
    model = fastft.optimize(Breaks().to(DEVICE), fullgraph=True)
    with pytest.raises(fastft.CaptureError, match="one graph"):
        model(torch.randn(4, 8, device=DEVICE))


def _broken_replace(match):
    raise RuntimeError("deliberately broken pattern")


def test_failed_capture_falls_back_to_unoptimised_and_is_reported():
    broken = dataclasses.replace(RMS_NORM, name="broken_rms_norm", replace=_broken_replace)
    torch.manual_seed(0)
    model = Plain("tensor").to(DEVICE)
    reference = twin(model)
    fastft.optimize(model, patterns=[broken])
    x = torch.randn(5, 6, device=DEVICE)
    with pytest.warns(UserWarning, match="runs unoptimised"):
        loss = model(x)
    assert torch.allclose(loss, reference(x))
    failures = fastft.report(model).capture_failures
    assert failures and "deliberately broken" in failures[0].error


def _wrong_eps_replace(match):
    good = RMS_NORM.replace(match)
    args = list(good.args)
    args[2] = 0.5  # a replacement that computes something else
    return Replacement(good.target, tuple(args))


def test_check_names_a_region_whose_rewrite_is_wrong():
    wrong = dataclasses.replace(RMS_NORM, name="wrong_rms_norm", replace=_wrong_eps_replace)
    torch.manual_seed(0)
    model = fastft.optimize(Plain("tensor").to(DEVICE), patterns=[wrong])
    result = fastft.check(model, (torch.randn(5, 6, device=DEVICE),))
    assert not result.ok
    assert any("wrong_rms_norm@norm" in c.name for c in result.region_errors), str(result)
    assert "FAIL" in str(result) and "wrong_rms_norm@norm" in str(result)


class CancellingGeluGate(nn.Module):
    """erf-GELU gate far in its negative tail times a large up projection: PyTorch's own
    0.5 x (1 + erf(x / sqrt 2)) cancels there, so fused and original differ by more than the
    elementwise tolerance while the fused one is no less accurate."""

    def __init__(self) -> None:
        super().__init__()
        self.up_scale = nn.Parameter(torch.ones(32))

    def forward(self, g, u):
        return (torch.nn.functional.gelu(g) * (u * self.up_scale)).sum()


def test_check_judges_a_region_against_float64_where_the_original_itself_rounds():
    torch.manual_seed(0)
    g = torch.randn(64, 32, device=DEVICE)
    g[:, :8] = -3.5 - 2 * torch.rand(64, 8, device=DEVICE)  # a few columns deep in the tail
    u = 1e3 * (1 + torch.rand(64, 32, device=DEVICE))
    model = fastft.optimize(CancellingGeluGate().to(DEVICE))
    result = fastft.check(model, (g, u), loss_fn=lambda y: y)
    assert fastft.report(model).counts() == {"glu_mlp": 1}
    (output,) = [c for c in result.regions if c.name.endswith(" output")]
    assert output.max_abs_error > 1e-5 and "no further from float64" in output.bound, str(result)
    assert result.ok, str(result)


def test_trainer_runs_and_saves(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny("llama")
    fastft.optimize(model)
    rows = [random_batch(model, batch=1, seq=16, seed=s) for s in range(8)]
    data = [{k: v[0].cpu() for k, v in r.items()} for r in rows]  # any indexable of dicts will do
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                             report_to=[], use_cpu=DEVICE == "cpu", save_strategy="no", logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    out = trainer.train()
    assert out.global_step == 2 and torch.isfinite(torch.tensor(out.training_loss))
    # The Trainer's forward runs without a KV cache: the causal mask it builds is proved and removed.
    assert fastft.report(model).counts() == {**LLAMA_COUNTS, "attention": 2}
    trainer.save_model(str(tmp_path / "saved"))
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved")).to(DEVICE)
    for (n, p), (m, q) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert n == m and torch.equal(p, q), n


def test_inspect_default_and_json(capsys):
    assert inspect_main([]) == 0
    text = capsys.readouterr().out
    assert "rms_norm" in text and "fastft::rms_norm" in text
    assert inspect_main(["qwen3", "--json", "--check"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["counts"] == {**LLAMA_COUNTS, "rms_norm": 9} and data["check"]["ok"] is True


def test_inspect_local_folder(tmp_path, capsys):
    tiny("mistral").save_pretrained(tmp_path)
    assert inspect_main([str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"] == LLAMA_COUNTS


def test_inspect_unknown_model(capsys):
    assert inspect_main(["no_such_architecture"]) == 2
    assert "no_such_architecture" in capsys.readouterr().err


def test_training_steps_match_for_plain_module():
    torch.manual_seed(0)
    model = Plain("dataclass").to(DEVICE)
    reference = twin(model)
    fastft.optimize(model)
    batches = [{"x": torch.randn(5, 6, device=DEVICE)} for _ in range(3)]
    assert_same_training(reference, model, batches)
