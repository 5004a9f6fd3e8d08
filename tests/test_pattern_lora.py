"""The LoRA patterns on tiny peft models: what is rewritten (counted), what is left alone and
reported, equivalence (fastft.check), training and saved adapters."""
from __future__ import annotations

import peft
import pytest
import torch

import fastft
from fastft.optimize import state_of

from helpers import DEVICE, assert_same_training, random_lora_b, tiny, twin

ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _adapted(model_type="llama", dtype=torch.float32, targets=ALL_LINEARS, **lora):
    torch.manual_seed(0)
    model = tiny(model_type).to(dtype)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=lora.pop("lora_dropout", 0.0),
                             **lora)
    model = peft.get_peft_model(model, config)
    random_lora_b(model)
    return model


def _batch(seed=0, batch=2, seq=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (batch, seq), generator=g).to(DEVICE)
    return {"input_ids": ids, "labels": ids}


def _counts(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in fastft.report(model).rewrites:
        counts[record.pattern] = counts.get(record.pattern, 0) + 1
    return counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_linear_adapters_fuse_and_check(dtype):
    model = fastft.optimize(_adapted(dtype=dtype))
    result = fastft.check(model, _batch())
    assert result.ok, str(result)
    counts = _counts(model)
    layers = model.get_base_model().config.num_hidden_layers
    assert counts.get("lora_glu_mlp") == layers  # gate, up and down as one op per layer
    assert counts.get("lora") == 2 * layers  # q, k and v as one op (one input), and o
    kernels = sorted(r.kernel for r in fastft.report(model).rewrites if r.pattern == "lora")
    assert kernels == ["fastft::lora_linear"] * layers + ["fastft::lora_linear_x3"] * layers
    assert "glu" not in counts
    assert result.regions_checked >= 5 * layers
    assert not [m for m in fastft.report(model).near_misses if m.pattern.startswith("lora")]


@pytest.mark.parametrize("bias", ["none", "lora_only"])
def test_q_k_v_with_biases_fuse_as_one_op(bias):
    """An attention whose q, k and v have biases (frozen, or trained with peft's lora_only) still
    reads its input once for the three adapters."""
    torch.manual_seed(0)
    model = peft.get_peft_model(tiny("qwen2").to(DEVICE), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, bias=bias, init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model = fastft.optimize(model.train())
    result = fastft.check(model, _batch())
    assert result.ok, str(result)
    layers = model.get_base_model().config.num_hidden_layers
    kernels = sorted(r.kernel for r in fastft.report(model).rewrites if r.pattern == "lora")
    assert kernels == ["fastft::lora_linear"] * layers + ["fastft::lora_linear_x3"] * layers
    assert not [m for m in fastft.report(model).near_misses if m.pattern.startswith("lora")]


def test_attention_only_adapters_leave_the_mlp_to_the_glu_rewrite():
    model = fastft.optimize(_adapted(targets=["q_proj", "v_proj"]))
    result = fastft.check(model, _batch())
    assert result.ok, str(result)
    counts = _counts(model)
    layers = model.get_base_model().config.num_hidden_layers
    assert counts.get("lora") == 2 * layers
    assert counts.get("glu") == layers
    assert "lora_glu_mlp" not in counts


@pytest.mark.parametrize("lower", ["eager", "inductor"])
def test_three_steps_train_like_the_original(lower):
    """Under Inductor the ops' backwards are traced (the x A^T they save included) and lowered."""
    model = _adapted()
    reference = twin(model)
    batches = [_batch(seed) for seed in range(3)]
    optimised = fastft.optimize(model, lower=lower)
    assert_same_training(reference, optimised, batches)
    assert _counts(optimised).get("lora_glu_mlp") == model.get_base_model().config.num_hidden_layers


def test_three_steps_with_the_mlp_backward_in_one_pass_train_like_the_original(monkeypatch):
    """The MLP's backward with the gate and up adapters' products and the down adapter's dA in the
    GLU backward's pass (kernels/lora_glu.py), which only large layers take: forced here."""
    import fastft.kernels.adapter_grads as adapter_grads
    import fastft.kernels.lora as lora_kernels

    monkeypatch.setattr(adapter_grads, "FUSED_MIN_ELEMENTS", 0)
    passes = []
    real = lora_kernels.lora_glu_backward
    monkeypatch.setattr(lora_kernels, "lora_glu_backward", lambda *a, **k: passes.append(1) or real(*a, **k))
    model = _adapted(dtype=torch.bfloat16)
    reference = twin(model)
    batches = [_batch(seed) for seed in range(3)]
    optimised = fastft.optimize(model, lower="eager")
    assert_same_training(reference, optimised, batches)
    assert len(passes) == 3 * model.get_base_model().config.num_hidden_layers  # each layer, each step


def test_saved_adapters_reload_with_the_same_outputs(tmp_path):
    model = fastft.optimize(_adapted())
    batch = _batch()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model(**batch).loss.backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"]).logits
    model.save_pretrained(tmp_path)
    base = tiny("llama")
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path).to(DEVICE).eval()
    with torch.no_grad():
        have = reloaded(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(have, want, atol=1e-4, rtol=1e-4)


def _lora_misses(model):
    return [m for m in fastft.report(model).near_misses if m.pattern.startswith("lora")]


def test_dropout_in_training_is_a_near_miss():
    model = fastft.optimize(_adapted(lora_dropout=0.1))
    model.train()
    model(**_batch()).loss.backward()
    assert "lora" not in _counts(model) and "lora_glu_mlp" not in _counts(model)
    misses = _lora_misses(model)
    assert len(misses) == 7 * model.get_base_model().config.num_hidden_layers
    assert all("dropout p=0.1" in m.reason for m in misses), misses


def test_dropout_in_evaluation_is_fused():
    model = fastft.optimize(_adapted(lora_dropout=0.1)).eval()
    result = fastft.check(model, _batch())
    assert result.ok, str(result)
    assert _counts(model).get("lora_glu_mlp") == model.get_base_model().config.num_hidden_layers


def test_two_active_adapters_are_left_alone():
    model = _adapted(targets=["q_proj"])
    model.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "second"])
    random_lora_b(model)
    fastft.optimize(model)
    result = fastft.check(model, _batch())
    assert result.ok, str(result)
    assert "lora" not in _counts(model)
    reasons = [m.reason for m in _lora_misses(model)]
    assert any("several active adapters" in r for r in reasons), reasons


def test_adapter_bias_is_left_alone():
    model = fastft.optimize(_adapted(targets=["q_proj"], lora_bias=True))
    result = fastft.check(model, _batch())
    assert result.ok, str(result)
    assert "lora" not in _counts(model)
    assert any("adapter has a bias" in m.reason for m in _lora_misses(model))


def test_frozen_adapters_are_fused_for_evaluation():
    """Only the base weight's frozen-ness is required: an adapter that does not train (evaluation,
    or a second adapter stacked under a trained one) is the same math."""
    model = _adapted(targets=["q_proj"])
    for p in model.parameters():
        p.requires_grad_(False)
    fastft.optimize(model)
    batch = _batch()
    with torch.no_grad():
        have = model(**batch).logits
        with state_of(model).original():
            want = model(**batch).logits
    torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-4)
    assert _counts(model).get("lora") == model.get_base_model().config.num_hidden_layers
    assert not _lora_misses(model)


def test_trainable_base_is_left_alone():
    model = _adapted(targets=["q_proj"])
    for name, p in model.named_parameters():
        if "q_proj.base_layer" in name:
            p.requires_grad_(True)
    fastft.optimize(model)
    result = fastft.check(model, _batch())
    assert result.ok, str(result)
    assert "lora" not in _counts(model)
    assert any("base weight is trainable" in m.reason for m in _lora_misses(model))


def test_a_different_architecture_fuses_by_its_math():
    """Qwen3 (q/k norms) with adapters on every linear: the same rewrites, no per-model code."""
    model = fastft.optimize(_adapted("qwen3"))
    result = fastft.check(model, _batch())
    assert result.ok, str(result)
    layers = model.get_base_model().config.num_hidden_layers
    assert _counts(model).get("lora_glu_mlp") == layers and _counts(model).get("lora") == 2 * layers


def test_changes_to_the_modules_between_calls_are_seen():
    """What the captured forward read from the modules (the adapters' scale, whether adapters are
    enabled, which tensor a parameter is) may change between calls; each change reaches the
    optimised forward as it reaches the original, through a recompile where the graph depends on it."""
    model = _adapted()
    reference = twin(model)
    optimised = fastft.optimize(model)
    ids = _batch()["input_ids"]

    seen = []

    def assert_same(what):
        with torch.no_grad():
            have, want = optimised(input_ids=ids).logits, reference(input_ids=ids).logits
        torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-5, msg=what)
        # Each change changes the result: a forward that missed it would differ from the original.
        assert all((want - before).abs().max() > 1e-3 for before in seen), what
        seen.append(want)

    assert_same("as optimised")
    for m in (optimised, reference):
        for module in m.modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                module.scaling["default"] *= 3.0
    assert_same("scales tripled")
    with optimised.disable_adapter(), reference.disable_adapter():
        assert_same("adapters disabled")
    for m in (optimised, reference):
        layer = m.get_base_model().model.layers[0].self_attn.q_proj
        layer.lora_B["default"].weight = torch.nn.Parameter(torch.full_like(layer.lora_B["default"].weight, 0.5))
    assert_same("a B replaced")


@pytest.mark.parametrize("model_type, targets, lora", [
    ("falcon", ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"], {}),
    ("gpt2", ["c_attn", "c_proj", "c_fc"], {"fan_in_fan_out": True}),
])
def test_linears_of_other_spellings_fuse(model_type, targets, lora):
    """Falcon's own linear layers compute ``x @ W.T``, and GPT-2's ``Conv1D`` stores its weight
    [in, out] and computes ``addmm(b, x2d, W)`` between two views of x: the same math as F.linear,
    so their adapted linears fuse too. Falcon's parallel attention adds the MLP's output to the
    attention's in place, which the fused op's output must allow."""
    model = _adapted(model_type, targets=targets, **lora)
    reference = twin(model)
    fastft.optimize(model)
    result = fastft.check(model, _batch())
    assert result.ok, str(result)
    layers = model.get_base_model().config.num_hidden_layers
    assert _counts(model).get("lora") == 4 * layers, fastft.report(model)
    assert not _lora_misses(model), fastft.report(model)
    assert_same_training(reference, model, [_batch(seed) for seed in range(3)])


def _adapted_proj(make, targets=("proj",), **lora) -> torch.nn.Module:
    """The module ``make()`` builds after seeding, with LoRA adapters on its ``targets``; B drawn
    at random so that the adapters change the output."""
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), **lora)
    model = peft.get_peft_model(make().to(DEVICE), config)
    random_lora_b(model)
    return model


def _assert_step_like(model, reference, x) -> None:
    """One forward and backward of ``model`` and of its unoptimised twin: the same loss and the
    same gradient for every trainable parameter."""
    loss, want = model(x), reference(x)
    loss.backward()
    want.backward()
    torch.testing.assert_close(loss, want)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, msg=name)


class _InPlaceAfterLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 16, bias=False)

    def forward(self, x):
        h = self.proj(x)
        h += x  # in place, on the adapted linear's output
        return h.square().mean()


@pytest.mark.parametrize("lower", ["eager", "inductor"])
def test_the_fused_output_takes_an_in_place_add(lower):
    if lower == "inductor" and DEVICE == "cpu":
        pytest.skip("Inductor lowers for the GPU here")
    model = _adapted_proj(_InPlaceAfterLinear)
    reference = twin(model)
    fastft.optimize(model, lower=lower)
    _assert_step_like(model, reference, torch.randn(3, 5, 16, device=DEVICE))
    assert _counts(model).get("lora") == 1


class _MatmulLinear(torch.nn.Linear):
    """A linear layer whose forward spells x W^T one of several ways ("none": x W, not a linear)."""

    def __init__(self, spelling: str) -> None:
        super().__init__(16, 16, bias=False)
        self.spelling = spelling

    def forward(self, x):
        w = self.weight
        if self.spelling == "T":
            return x @ w.T
        if self.spelling == "mT":
            return x @ w.mT
        if self.spelling == "t":
            return torch.matmul(x, w.t())
        if self.spelling == "transpose":
            return x.matmul(w.transpose(-1, -2))
        if self.spelling == "permute":
            return x @ w.permute(1, 0)
        if self.spelling == "mm":
            return torch.mm(x, w.t())
        return x @ w


class _SquaredMeanOf(torch.nn.Module):
    """A scalar of one projection's output, for a check or a backward; ``checkpointed``: the
    projection in a non-reentrant checkpointed region, as HF's gradient checkpointing runs a layer."""

    def __init__(self, proj: torch.nn.Module, checkpointed: bool = False) -> None:
        super().__init__()
        self.proj, self.checkpointed = proj, checkpointed

    def forward(self, x):
        if self.checkpointed:
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self.proj, x, use_reentrant=False).square().mean()
        return self.proj(x).square().mean()


@pytest.mark.parametrize("spelling", ["T", "mT", "t", "transpose", "permute", "mm", "none"])
def test_each_spelling_of_x_times_w_transposed_is_a_linear(spelling):
    model = _adapted_proj(lambda: _SquaredMeanOf(_MatmulLinear(spelling)))
    fastft.optimize(model)
    x = torch.randn(6, 16, device=DEVICE)
    result = fastft.check(model, (x,))
    assert result.ok, str(result)
    if spelling == "none":  # x W is another product: left alone, and reported
        assert "lora" not in _counts(model)
        assert any("neither a linear" in m.reason for m in _lora_misses(model))
    else:
        assert _counts(model).get("lora") == 1, fastft.report(model)


class _GatedMLPStoredInOut(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.gate, self.up, self.down = Conv1D(32, 16), Conv1D(32, 16), Conv1D(16, 32)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x)).square().mean()


def test_a_gated_mlp_stored_in_out_fuses_linear_by_linear():
    """The fused MLP op takes [out, in] weights without biases: a gated MLP of ``Conv1D`` layers
    is not fused whole, and each of its adapted layers is fused alone."""
    model = _adapted_proj(_GatedMLPStoredInOut, targets=("gate", "up", "down"), fan_in_fan_out=True)
    fastft.optimize(model)
    x = torch.randn(2, 5, 16, device=DEVICE)
    result = fastft.check(model, (x,))
    assert result.ok, str(result)
    assert _counts(model).get("lora") == 3 and "lora_glu_mlp" not in _counts(model), fastft.report(model)
    assert not _lora_misses(model), fastft.report(model)


class _RowsLinear(torch.nn.Linear):
    """A linear layer (with a bias) that flattens x's leading dims around a 2-D product, one of
    several ways ("beta": a product that is not x W^T + b)."""

    def __init__(self, spelling: str) -> None:
        super().__init__(16, 12)
        self.spelling = spelling

    def forward(self, x):
        rows = x.reshape(-1, x.shape[-1])
        if self.spelling == "linear":
            y = torch.nn.functional.linear(rows, self.weight, self.bias)
        elif self.spelling == "addmm":
            y = torch.addmm(self.bias, rows, self.weight.t())
        else:
            y = torch.addmm(self.bias, rows, self.weight.t(), beta=0.5)
        return y.view(*x.shape[:-1], -1)


@pytest.mark.parametrize("lead", [(2, 3), (6,)], ids=["3d", "2d"])  # 2-D: both views change nothing
@pytest.mark.parametrize("spelling", ["linear", "addmm", "beta"])
def test_a_linear_over_flattened_rows_is_a_linear_of_x(spelling, lead):
    model = _adapted_proj(lambda: _SquaredMeanOf(_RowsLinear(spelling)))
    fastft.optimize(model)
    x = torch.randn(*lead, 16, device=DEVICE)
    result = fastft.check(model, (x,))
    assert result.ok, str(result)
    if spelling == "beta":  # b / 2 + x W^T is not the linear: left alone, and reported
        assert "lora" not in _counts(model)
        assert _lora_misses(model), fastft.report(model)
    else:
        assert _counts(model).get("lora") == 1, fastft.report(model)


@pytest.mark.parametrize("lead", [(2, 3), (6,)], ids=["3d", "2d"])
def test_a_conv1d_layer_fuses_for_inputs_of_either_rank(lead):
    from transformers.pytorch_utils import Conv1D

    model = _adapted_proj(lambda: _SquaredMeanOf(Conv1D(12, 16)), fan_in_fan_out=True)
    fastft.optimize(model)
    result = fastft.check(model, (torch.randn(*lead, 16, device=DEVICE),))
    assert result.ok, str(result)
    assert _counts(model).get("lora") == 1 and not _lora_misses(model), fastft.report(model)


class _AdaptedChainBesideSharedInput(torch.nn.Module):
    """``right`` reads ``left``'s output; ``left``, ``q`` and ``k`` read one input. Matched from the
    output back, ``right`` waits for partners of its input before ``left`` completes the group of
    three that replaces that input (a layout Gemma 3n's LAuReL block has beside its attention)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.left, self.right, self.q, self.k = (torch.nn.Linear(width, width, bias=False) for _ in range(4))

    def forward(self, x):
        chained = self.right(self.left(x))
        return (chained + self.q(x) * self.k(x)).square().mean()


def test_a_waiting_match_reads_the_op_that_replaced_its_input():
    model = _adapted_proj(_AdaptedChainBesideSharedInput, targets=("left", "right", "q", "k"))
    reference = twin(model)
    fastft.optimize(model)
    _assert_step_like(model, reference, torch.randn(3, 5, 16, device=DEVICE))
    report = fastft.report(model)
    assert not report.capture_failures, report.capture_failures
    # left, q and k as one op, right as another
    kernels = sorted(r.kernel for r in report.rewrites)
    assert kernels == ["fastft::lora_linear", "fastft::lora_linear_x3"], kernels


@pytest.mark.parametrize("spelling", ["T", "t", "none"])
def test_x_times_w_transposed_is_a_linear_inside_a_checkpointed_layer(spelling):
    """Dynamo may hand the checkpointed body W^T computed outside it (Falcon's layers): x times
    that input is a linear of the weight stored [in, out]; x W with W itself is not."""
    model = _adapted_proj(lambda: _SquaredMeanOf(_MatmulLinear(spelling), checkpointed=True))
    reference = twin(model)
    fastft.optimize(model)
    x = torch.randn(6, 16, device=DEVICE, requires_grad=True)
    result = fastft.check(model, (x,))
    assert result.ok, str(result)
    if spelling == "none":
        assert "lora" not in _counts(model)
        assert any("neither a linear" in m.reason for m in _lora_misses(model))
        return
    assert _counts(model).get("lora") == 1 and not _lora_misses(model), fastft.report(model)
    _assert_step_like(model, reference, x)
