"""The public decision API: ``after_backward(loss) -> Decision`` after each backward, and the
torch-style ``step(closure)``; both against a hand-written fixed-accumulation oracle."""

import math

import pytest
import torch

import gqc_dist
from reference import adamw, loss_of, make_mlp, micro_batches


def _oracle(k, batches):
    """Fixed accumulation of ``k`` by hand: mean of each window's gradients, AdamW."""
    model = make_mlp()
    optimizer = adamw(model.parameters())
    for index, batch in enumerate(batches):
        loss_of(model, batch).backward()
        if (index + 1) % k == 0:
            for p in model.parameters():
                p.grad /= k
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return [p.detach() for p in model.parameters()]


def test_after_backward_decides_and_reports_the_window():
    model = make_mlp()
    wrapper = gqc_dist.OptimizerWrapperFixed(adamw(model.parameters()), 3)
    batches = micro_batches(9)
    decisions = []
    for batch in batches:
        loss = loss_of(model, batch)
        loss.backward()
        decisions.append(wrapper.after_backward(loss))
    assert [bool(d) for d in decisions] == [False, False, True] * 3
    assert [d.num_draws for d in decisions[:3]] == [1, 2, 0]
    stepped = decisions[2]
    assert stepped.window.num_draws == 3 and stepped.window.step == 0 and stepped.window.lr == pytest.approx(1e-2)
    assert decisions[0].window is None and not any(d.dropped for d in decisions)
    assert stepped.statistics()["num_steps"] == 3  # read when asked: the wrapper's current statistics
    for got, want in zip(model.parameters(), _oracle(3, batches)):
        torch.testing.assert_close(got.detach(), want)


def test_a_non_finite_gradient_is_a_dropped_decision():
    model = make_mlp()
    wrapper = gqc_dist.OptimizerWrapperFixed(adamw(model.parameters()), 3)
    loss_of(model, micro_batches(1)[0]).backward()
    wrapper.after_backward()
    (loss_of(model, micro_batches(2)[1]) * math.nan).backward()  # a non-finite micro-batch
    decision = wrapper.after_backward()
    assert decision.dropped and not decision and decision.num_draws == 0


def test_step_with_a_closure_runs_it_first():
    """Lightning and torch.optim call ``optimizer.step(closure)``: the closure does the forward
    and backward, the wrapper then decides."""
    model = make_mlp()
    wrapper = gqc_dist.OptimizerWrapperFixed(adamw(model.parameters()), 2)
    batches = micro_batches(6)
    calls = []
    for batch in batches:
        def closure(batch=batch):
            loss = loss_of(model, batch)
            loss.backward()
            calls.append(torch.is_grad_enabled())
            return loss
        with torch.no_grad():  # Lightning's precision plugins step under no_grad: the closure re-enables it
            wrapper.step(closure)
    assert calls == [True] * 6 and wrapper.num_steps == 3
    for got, want in zip(model.parameters(), _oracle(2, batches)):
        torch.testing.assert_close(got.detach(), want)


def test_mht_takes_its_metric_from_the_loss_or_the_closure():
    model = make_mlp()
    wrapper, _ = gqc_dist.make_mht_with_warmup_schedule(
        adamw(model.parameters()), confidence_level=0.9, percent_error_threshold=0.1, num_training_steps=10,
        num_warmup_steps=2, max_batch_draws=4)
    batch = micro_batches(1)[0]

    def closure():
        loss = loss_of(model, batch)
        loss.backward()
        return loss

    wrapper.step(closure=closure)
    loss = loss_of(model, batch)
    loss.backward()
    wrapper.after_backward(loss)
    assert wrapper.num_batches == 2
    # a missing argument is a TypeError (as torch-gqc's), and a GQCError, with the fix in its one line
    with pytest.raises(gqc_dist.GQCTypeError, match=r"needs the micro-batch's metric: call step\(loss\)") as raised:
        wrapper.after_backward()
    assert isinstance(raised.value, TypeError) and isinstance(raised.value, gqc_dist.GQCError)
    assert "\n" not in str(raised.value)
    with pytest.raises(TypeError, match="needs the micro-batch's metric"):
        wrapper.step()
    assert wrapper.num_batches == 2  # neither counted a micro-batch
