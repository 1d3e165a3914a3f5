"""Oracle tests for carried state: windows one at a time == one pass over the sequence, and
detaching at a window edge cuts every gradient path into earlier windows."""

from __future__ import annotations

import pytest
import torch

from forecaster import features as F
from forecaster.models import ModelConfig, Seq2SeqForecaster, build_model
from forecaster.training import detach

SPEC = F.FeatureSpec(freq_seconds=3600, horizon=6)
KINDS = ["rnn", "lstm", "gru", "seq2seq"]


def _model(kind: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(
        kind=kind,
        n_inputs=SPEC.n_inputs,
        n_head_features=SPEC.n_head_features,
        horizon=SPEC.horizon,
        hidden=16,
        head_hidden=16,
        layers=kw.pop("layers", 2),
        **kw,
    )
    model = build_model(cfg).double().eval()
    # The zero-initialised output layer would hide the network behind the naive base.
    for p in model.parameters():
        if torch.count_nonzero(p) == 0:
            torch.nn.init.normal_(p, std=0.3)
    return model


def _series(s=3, n=60) -> torch.Tensor:
    torch.manual_seed(1)
    v = torch.sin(torch.arange(n) * 2 * torch.pi / 24).repeat(s, 1) + 0.1 * torch.randn(s, n)
    v[0, 5] = float("nan")  # a missing point
    return v.double()


def _inputs(values, lo, hi):
    x = F.step_inputs(SPEC, values, 0, lo, hi).double()
    hx = F.head_inputs(SPEC, values, 0, F.origins(lo, hi)).double()
    return x, hx


@pytest.mark.parametrize("kind", KINDS)
def test_windows_with_carried_state_equal_one_pass(kind):
    model, values = _model(kind), _series()
    with torch.no_grad():
        whole, state_whole = model(*_inputs(values, 0, 60))
        parts, state = [], None
        for a in range(0, 60, 17):  # uneven windows on purpose
            out, state = model(*_inputs(values, a, min(a + 17, 60)), state)
            parts.append(out)
    torch.testing.assert_close(torch.cat(parts, dim=1), whole)
    for s_a, s_b in zip(
        state if isinstance(state, tuple) else (state,),
        state_whole if isinstance(state_whole, tuple) else (state_whole,),
        strict=True,
    ):
        torch.testing.assert_close(s_a, s_b)


@pytest.mark.parametrize("kind", KINDS)
def test_detached_state_gives_zero_gradient_to_the_previous_window(kind):
    model, values = _model(kind), _series()
    x1, hx1 = _inputs(values, 0, 24)
    x2, hx2 = _inputs(values, 24, 48)
    x1.requires_grad_(True)
    _, state = model(x1, hx1)
    out, _ = model(x2, hx2, detach(state))
    out.sum().backward()
    assert x1.grad is None or torch.count_nonzero(x1.grad) == 0
    # Without the detach, the gradient does flow: the test can fail.
    x1.grad = None
    _, state = model(x1, hx1)
    out, _ = model(x2, hx2, state)
    out.sum().backward()
    assert torch.count_nonzero(x1.grad) > 0


def test_head_reads_nothing_after_the_origin():
    """Changing values after origin t leaves the head inputs of origins <= t unchanged."""
    values = _series()
    changed = values.clone()
    changed[:, 31:] += 100.0
    a = F.head_inputs(SPEC, values, 0, F.origins(0, 31))
    b = F.head_inputs(SPEC, changed, 0, F.origins(0, 31))
    torch.testing.assert_close(a, b)


def test_bidirectional_seq2seq_forecasts_only_from_the_window_end_and_carries_only_forward():
    model = _model("seq2seq", bidirectional=True, layers=1)
    assert isinstance(model, Seq2SeqForecaster) and model.last_origin_only
    values = _series()
    x, hx = _inputs(values, 0, 24)
    with torch.no_grad():
        out, state = model(x, hx)
        fwd, fwd_state = model.encoder(x)
    assert out.shape == (3, 1, SPEC.horizon, 3)
    torch.testing.assert_close(state[0], fwd_state[0])  # the carried state is the forward one
    # The backward direction starts from zero in every window: the forecast from window 2
    # depends on window 1 only through the carried forward state.
    x2, hx2 = _inputs(values, 24, 27)  # short, so the carried state still matters at its end
    x1_other = x.clone()
    x1_other[:, -1, 0] += 5.0
    with torch.no_grad():
        _, state_other = model(x1_other, hx)
        a, _ = model(x2, hx2, state)
        b, _ = model(x2, hx2, state_other)
    assert not torch.allclose(a, b)  # the forward state did carry the change
    torch.testing.assert_close(state_other[0], model.encoder(x1_other)[1][0])


def test_quantiles_never_cross():
    model, values = _model("lstm"), _series()
    with torch.no_grad():
        out, _ = model(*_inputs(values, 0, 60))
    assert bool((out.diff(dim=-1) >= 0).all())


def test_input_shape_errors_say_what_was_expected():
    model, values = _model("gru"), _series()
    x, hx = _inputs(values, 0, 10)
    with pytest.raises(AssertionError, match=r"x must be \(B, T, 6\)"):
        model(x[..., :3], hx)


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
def test_forecasting_from_some_steps_equals_those_steps_of_every_step(kind):
    """`at`: the recurrence over every step, the head only at the steps asked for (what
    training with origin_stride > 1 runs); the forecasts and the state are those of the full
    forward at those steps."""
    model, values = _model(kind), _series()
    x, hx = _inputs(values, 0, 60)
    at = torch.arange(2, 60, 4)
    with torch.no_grad():
        every, state = model(x, hx, None)
        some, state_some = model(x, hx[:, at], None, at=at)
    torch.testing.assert_close(some, every[:, at])
    for s_a, s_b in zip(
        state if isinstance(state, tuple) else (state,),
        state_some if isinstance(state_some, tuple) else (state_some,),
        strict=True,
    ):
        torch.testing.assert_close(s_a, s_b)
