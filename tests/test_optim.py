"""LARS, parameter groups, learning-rate scaling, the warm-up + cosine schedule and the optimizer factory."""

from __future__ import annotations

import math

import pytest
import torch

from medfm.train.optim import LARS, build_optimizer, param_groups, scaled_lr, warmup_cosine


def _linear(weight: list[float], bias: float) -> torch.nn.Linear:
    layer = torch.nn.Linear(len(weight), 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([weight]))
        layer.bias.fill_(bias)
    return layer


def test_lars_two_steps_match_hand_computation():
    lr, momentum, wd, tc, eps = 0.5, 0.9, 0.5, 0.1, 1e-8
    layer = _linear([3.0, 4.0], 1.0)
    groups = [
        {"params": [layer.weight], "weight_decay": wd, "lars_exclude": False},
        {"params": [layer.bias], "weight_decay": 0.0, "lars_exclude": True},
    ]
    opt = LARS(groups, lr=lr, momentum=momentum, trust_coefficient=tc, eps=eps)
    x = torch.tensor([[1.0, 2.0]])

    # hand computation, in plain floats: d(sum(w.x + b))/dw = x = [1, 2], d/db = 1
    w, b = [3.0, 4.0], 1.0
    v_w, v_b = [0.0, 0.0], 0.0
    for _ in range(2):
        opt.zero_grad()
        layer(x).sum().backward()
        opt.step()

        g = [1.0 + wd * w[0], 2.0 + wd * w[1]]  # decay added to the weight's gradient
        trust = tc * math.hypot(*w) / (math.hypot(*g) + eps)
        v_w = [momentum * v_w[0] + trust * g[0], momentum * v_w[1] + trust * g[1]]
        w = [w[0] - lr * v_w[0], w[1] - lr * v_w[1]]
        v_b = momentum * v_b + 1.0  # excluded: neither decay nor trust ratio
        b = b - lr * v_b

        torch.testing.assert_close(layer.weight.detach(), torch.tensor([w]), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(layer.bias.detach(), torch.tensor([b]), rtol=1e-6, atol=1e-7)

    # the bias, with momentum only: 1 - 0.5 * 1 - 0.5 * (0.9 + 1)
    assert b == pytest.approx(-0.45)


def test_lars_without_trust_or_decay_is_sgd_with_momentum():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    reference = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    reference.load_state_dict(model.state_dict())
    initial = [p.detach().clone() for p in model.parameters()]

    groups = [{**group, "lars_exclude": True, "weight_decay": 0.0} for group in param_groups(model, 1e-3)]
    lars = LARS(groups, lr=0.1, momentum=0.9)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)

    x, y = torch.randn(16, 5), torch.randn(16, 2)
    for _ in range(5):
        for net, opt in ((model, lars), (reference, sgd)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            opt.step()
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    assert all(not torch.allclose(p, q) for p, q in zip(model.parameters(), initial))  # the parameters did move


def test_lars_trust_ratio_is_one_for_zero_norms():
    layer = _linear([0.0, 0.0], 0.0)
    opt = LARS(param_groups(layer, 0.0), lr=0.5, momentum=0.9)
    layer(torch.tensor([[1.0, 2.0]])).sum().backward()
    opt.step()
    # ||w|| = 0: trust 1, so the plain step -lr * g
    torch.testing.assert_close(layer.weight.detach(), torch.tensor([[-0.5, -1.0]]))
    assert torch.isfinite(layer.weight).all()

    # zero gradient on a non-zero weight: trust 1, nothing moves but the momentum left from before
    other = _linear([3.0, 4.0], 0.0)
    opt = LARS(param_groups(other, 0.0), lr=0.5, momentum=0.9)
    other.weight.grad = torch.zeros_like(other.weight)
    opt.step()
    torch.testing.assert_close(other.weight.detach(), torch.tensor([[3.0, 4.0]]))
    assert torch.isfinite(opt.state[other.weight]["momentum_buffer"]).all()


def test_lars_rejects_bad_hyperparameters():
    with pytest.raises(ValueError):
        LARS(torch.nn.Linear(2, 2).parameters(), lr=-1.0)
    with pytest.raises(ValueError):
        LARS(torch.nn.Linear(2, 2).parameters(), lr=0.1, weight_decay=-1.0)


def test_param_groups_split_weights_from_biases_and_norms():
    conv = torch.nn.Conv3d(1, 2, 3, padding=1)
    bn = torch.nn.BatchNorm3d(2)
    linear = torch.nn.Linear(2 * 4 * 4 * 4, 3)
    ln = torch.nn.LayerNorm(3)
    gn = torch.nn.GroupNorm(1, 3)
    model = torch.nn.Sequential(
        conv, bn, torch.nn.ReLU(), torch.nn.Flatten(), linear, ln, torch.nn.Unflatten(1, (3, 1)), gn
    )
    assert model(torch.randn(2, 1, 4, 4, 4)).shape == (2, 3, 1)

    decayed, excluded = param_groups(model, 1e-6)
    assert decayed["weight_decay"] == 1e-6 and decayed["lars_exclude"] is False
    assert excluded["weight_decay"] == 0.0 and excluded["lars_exclude"] is True
    assert {id(p) for p in decayed["params"]} == {id(conv.weight), id(linear.weight)}
    assert {id(p) for p in excluded["params"]} == {
        id(p) for p in (conv.bias, bn.weight, bn.bias, linear.bias, ln.weight, ln.bias, gn.weight, gn.bias)
    }
    listed = [id(p) for group in (decayed, excluded) for p in group["params"]]
    assert sorted(listed) == sorted(id(p) for p in model.parameters())  # every parameter exactly once


def test_param_groups_leave_out_frozen_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    for p in model[0].parameters():
        p.requires_grad_(False)
    decayed, excluded = param_groups(model, 0.1)
    assert [id(p) for p in decayed["params"]] == [id(model[1].weight)]
    assert [id(p) for p in excluded["params"]] == [id(model[1].bias)]


def _lrs(total: int, warmup: int, final_ratio: float, steps: int) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = warmup_cosine(opt, total_steps=total, warmup_steps=warmup, final_ratio=final_ratio)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_warmup_cosine_multipliers():
    total, warmup, final = 110, 10, 0.1
    lrs = [lr / 2.0 for lr in _lrs(total, warmup, final, 150)]

    def cosine(step: int) -> float:
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    assert lrs[0] == pytest.approx(1 / warmup)
    assert lrs[4] == pytest.approx(5 / warmup)
    assert lrs[warmup - 1] == pytest.approx(1.0)
    assert lrs[warmup] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx((1 + final) / 2)  # halfway through the decay
    assert lrs[85] == pytest.approx(cosine(85))
    assert lrs[total] == pytest.approx(final)
    assert lrs[149] == pytest.approx(final)  # constant after the end
    assert all(a <= b for a, b in zip(lrs[:warmup], lrs[1 : warmup + 1]))
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1 :]))


def test_warmup_cosine_without_warmup_and_errors():
    lrs = [lr / 2.0 for lr in _lrs(total=4, warmup=0, final_ratio=0.0, steps=6)]
    assert lrs == pytest.approx(
        [1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2, 0.0, 0.0]
    )
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError):
        warmup_cosine(opt, total_steps=0)
    with pytest.raises(ValueError):
        warmup_cosine(opt, total_steps=10, warmup_steps=11)


def test_scaled_lr():
    assert scaled_lr(0.3, 256) == pytest.approx(0.3)
    assert scaled_lr(0.3, 4096) == pytest.approx(4.8)
    assert scaled_lr(0.3, 64) == pytest.approx(0.075)
    assert scaled_lr(0.075, 4096, rule="sqrt") == pytest.approx(4.8)
    with pytest.raises(ValueError, match="linear"):
        scaled_lr(0.3, 256, rule="cubic")
    with pytest.raises(ValueError):
        scaled_lr(0.3, 0)


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("lars", LARS),
        ("LARS", LARS),
        ("sgd", torch.optim.SGD),
        ("adamw", torch.optim.AdamW),
        ("adam", torch.optim.Adam),
    ],
)
def test_build_optimizer_types(name, cls):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = build_optimizer(name, param_groups(model, 1e-6), lr=0.1, weight_decay=1e-6)
    assert type(opt) is cls
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-6, 0.0]  # groups keep their own decay
    assert [g["lars_exclude"] for g in opt.param_groups] == [False, True]
    assert all(g["lr"] == 0.1 for g in opt.param_groups)
    if cls in (LARS, torch.optim.SGD):
        assert all(g["momentum"] == 0.9 for g in opt.param_groups)


def test_build_optimizer_unknown_name():
    with pytest.raises(ValueError, match="lars, sgd, adamw, adam"):
        build_optimizer("rmsprop", param_groups(torch.nn.Linear(2, 2), 0.0), lr=0.1, weight_decay=0.0)
