"""Models no one on the team wrote (``tests/library_models.py``): ``auto`` takes the method the
table names and says nothing, and sampled rows match float64 Hessian-vector products
(``jvp(grad)``); hessQuik's networks match hessQuik's own Hessians. Then ``auto``'s fallback
chain: a method that fails on the probe hands over to the next, in one line."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vmap

import pipeline
from pipeline.hessian import methods
from pipeline.hessian.errors import ArgumentError
from pipeline.hessian.methods import METHODS, Method, choose_method
from tests.library_models import LIBRARY, unavailable
from tests.zoo import HardAsClamp, assert_close_to_max

pytestmark = pytest.mark.usefixtures("float64_default")


def _hvp_rows(model: nn.Module, x: Tensor, k: int, rows: list[int], labels=None) -> Tensor:
    """Rows (N, R, D) of the Hessian of output k (or the cross-entropy loss) by forward over
    reverse Hessian-vector products with basis vectors, one sample at a time."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    d = x[0].numel()

    def f(xf: Tensor, n: int) -> Tensor:
        z = model(xf.view(1, *x.shape[1:]))[0]
        if labels is None:
            return z[k]
        return torch.nn.functional.cross_entropy(z[None], labels[n : n + 1])

    basis = torch.eye(d)[rows]
    out = []
    with sdpa_kernel([SDPBackend.MATH]), HardAsClamp():
        for n, xn in enumerate(x.reshape(len(x), -1)):
            g = grad(lambda u, n=n: f(u, n))
            out.append(vmap(lambda e, xn=xn, g=g: jvp(g, (xn,), (e,))[1])(basis))
    return torch.stack(out)


def _library_case(entry):
    reason = unavailable(entry.package) if entry.package != "torch" else None
    if reason:
        pytest.skip(reason)
    model = entry.build()
    torch.manual_seed(1)
    x = torch.randn(2, *entry.shape)
    labels = torch.tensor([0, 2]) if entry.outputs == "loss" else None
    return model, x, labels


@pytest.mark.parametrize("entry", LIBRARY, ids=[e.name for e in LIBRARY])
def test_library_model_in_float32_takes_the_same_method(entry):
    """In float32, as users run them: a convolution's kernel may differ with the batch size, and
    the check that samples do not mix must not take that for mixing (EfficientNet fell back to
    forward_over_reverse: one logit moved by 3e-5 beside another of 14.5)."""
    reason = unavailable(entry.package) if entry.package != "torch" else None
    if reason:
        pytest.skip(reason)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # the weights drawn as a float32 user gets them
    try:
        torch.manual_seed(0)
        model = entry.build()
        x = torch.randn(4, *entry.shape)
    finally:
        torch.set_default_dtype(previous)
    labels = torch.arange(4) % 3 if entry.outputs == "loss" else None
    with torch.no_grad():
        z = model(x)
    target = pipeline.make_target(entry.outputs, z, labels, "cross_entropy")
    choice = choose_method("auto", model, target, x)
    assert choice.name == entry.method, choice.note


@pytest.mark.parametrize("entry", LIBRARY, ids=[e.name for e in LIBRARY])
def test_library_model_on_the_graph_path_and_exact(entry, caplog):
    model, x, labels = _library_case(entry)
    target = pipeline.make_target(entry.outputs, model(x).detach(), labels, "cross_entropy")
    choice = choose_method("auto", model, target, x)
    assert choice.name == entry.method, choice.note
    assert choice.note is None
    d = x[0].numel()
    rows = sorted({0, d // 3, d // 2, d - 1})
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        h = pipeline.hessian(model, x, entry.outputs, rows, labels=labels)
    assert not [r for r in caplog.records if "method=" in r.message], caplog.text
    outputs = [None] if entry.outputs == "loss" else entry.outputs
    for i, k in enumerate(outputs):
        expected = _hvp_rows(model, x, k, rows, labels)
        assert_close_to_max(h[:, i], expected, 1e-9, f"{entry.name}, output {k}")


@pytest.mark.parametrize("kind", ["fully_connected", "resnet", "icnn"])
def test_hessquik_networks_match_hessquiks_own_hessians(kind):
    if unavailable("hessQuik"):
        pytest.skip(unavailable("hessQuik"))
    from tests.library_models import FirstOutput, _hessquik, randomized

    torch.manual_seed(0)
    net = randomized(_hessquik(kind))
    x = torch.randn(3, 6)
    _, _, d2f = net(x, do_gradient=True, do_Hessian=True)  # (N, D, D, m)
    h = pipeline.hessian(FirstOutput(net).eval(), x, "all")  # (N, m, D, D)
    assert_close_to_max(h, d2f.permute(0, 3, 1, 2), 1e-9, f"hessQuik {kind}")


class Tanh(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return torch.tanh(self.fc(x)) ** 2


def _failing(name: str) -> Method:
    def compute(*_args, **_kwargs):
        raise RuntimeError(f"{name} broke")

    return Method(name, compute, lambda _s: None)


@pytest.mark.parametrize(
    "broken, expected",
    [
        ((), "structured"),
        (("structured",), "forward_over_reverse"),
        (("structured", "forward_over_reverse"), "reverse_over_reverse"),
        (("structured", "forward_over_reverse", "reverse_over_reverse"), "autograd"),
    ],
)
def test_auto_hands_over_along_its_chain(monkeypatch, caplog, broken, expected):
    for name in broken:
        monkeypatch.setitem(METHODS, name, _failing(name))
    monkeypatch.setattr(methods, "_CHOICES", methods.weakref.WeakKeyDictionary())
    torch.manual_seed(0)
    model = Tanh().eval()
    x = torch.randn(2, 4)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        h = pipeline.hessian(model, x, [1])
    target = pipeline.make_target([1], model(x), None, "cross_entropy")
    choice = choose_method("auto", model, target, x)
    assert choice.name == expected
    notes = [r.message for r in caplog.records if r.message.startswith("method=auto")]
    if broken:
        assert notes == [choice.note] and "\n" not in choice.note
        assert all(f"{name} failed on a probe (RuntimeError: {name} broke)" in choice.note
                   for name in broken)  # fmt: skip
    else:
        assert notes == [] and choice.note is None
    assert_close_to_max(h, _hvp_rows(model, x, 1, list(range(4)))[:, None], 1e-9, expected)


def test_no_method_left_is_one_line_naming_each(monkeypatch):
    for name in ("structured", "forward_over_reverse", "reverse_over_reverse", "autograd"):
        monkeypatch.setitem(METHODS, name, _failing(name))
    monkeypatch.setattr(methods, "_CHOICES", methods.weakref.WeakKeyDictionary())
    with pytest.raises(ArgumentError) as err:
        pipeline.hessian(Tanh().eval(), torch.randn(2, 4), [0])
    message = str(err.value)
    assert err.value.argument == "model" and "\n" not in message
    assert message.startswith("no method can differentiate the model")
    assert all(f"{n} failed on a probe" in message for n in ("structured", "reverse_over_reverse",
                                                             "autograd"))  # fmt: skip
    assert "plain torch.autograd, must be able to differentiate the forward twice" in message


def _failing_beyond_one_sample(name: str) -> Method:
    """A method whose probe (one sample) passes and whose calls on more samples raise, as
    ``vmap`` over samples does on a neighbour list built with ``nonzero``."""
    real = METHODS[name]

    def compute(model, x, *args, **kwargs):
        if len(x) > 1:
            raise RuntimeError(f"{name} broke on {len(x)} samples")
        return real.compute(model, x, *args, **kwargs)

    return Method(name, compute, real.unsupported, real.probe_all_up_to)


def test_a_failure_after_the_probe_hands_over_once_and_is_remembered(monkeypatch, caplog):
    broken = ("structured", "forward_over_reverse", "reverse_over_reverse")
    for name in broken:
        monkeypatch.setitem(METHODS, name, _failing_beyond_one_sample(name))
    monkeypatch.setattr(methods, "_CHOICES", methods.weakref.WeakKeyDictionary())
    torch.manual_seed(0)
    model = Tanh().double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        first = pipeline.hessian(model, x, [1])
    handed = [r.message for r in caplog.records if "failed (RuntimeError" in r.message]
    assert [m.split(":")[0] for m in handed] == [
        "method=auto uses forward_over_reverse", "method=auto uses reverse_over_reverse",
        "method=auto uses autograd",
    ]  # fmt: skip
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        again = pipeline.hessian(model, x, [1])
    assert [r.message for r in caplog.records if "failed (" in r.message] == []
    expected = _hvp_rows(model, x, 1, list(range(4)))[:, None]
    for got, what in ((first, "first call"), (again, "second call")):
        assert_close_to_max(got, expected, 1e-9, what)


def test_auto_never_ends_in_a_raw_exception(monkeypatch):
    """Every method fails on the real call (not on the probe): one line naming each."""
    for name in ("structured", "forward_over_reverse", "reverse_over_reverse", "autograd"):
        monkeypatch.setitem(METHODS, name, _failing_beyond_one_sample(name))
    monkeypatch.setattr(methods, "_CHOICES", methods.weakref.WeakKeyDictionary())
    with pytest.raises(ArgumentError) as err:
        pipeline.hessian(Tanh().eval(), torch.randn(3, 4), [0])
    message = str(err.value)
    assert message.startswith("no method could compute the Hessians") and "\n" not in message
    assert all(
        f"{n} failed (RuntimeError: {n} broke on 3 samples)" in message
        for n in ("structured", "forward_over_reverse", "reverse_over_reverse", "autograd")
    )


class Branchy(nn.Module):
    """Control flow on the input's values: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        h = self.fc(x)
        return torch.tanh(h) if h.sum() > 0 else torch.sin(h)


def test_untraceable_model_says_why_in_one_line(caplog):
    torch.manual_seed(0)
    model = Branchy().eval()
    x = torch.randn(2, 3)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        h = pipeline.hessian(model, x, [0])
    notes = [r.message for r in caplog.records if r.message.startswith("method=auto")]
    assert len(notes) == 1 and "\n" not in notes[0]
    assert notes[0].startswith("method=auto uses forward_over_reverse: the graph path cannot")
    assert "torch.fx" in notes[0]
    assert_close_to_max(h, _hvp_rows(model, x, 0, [0, 1, 2])[:, None], 1e-9, "branchy")


DIAGONAL_ON = ("pinn", "pair_potential", "hessquik_fc", "timm_vit", "timm_mixer",
               "tv_mobilenet_v3")  # fmt: skip


@pytest.mark.parametrize("name", DIAGONAL_ON)
def test_the_diagonal_of_a_library_model_is_exact(name):
    """``output=diagonal``'s math on code no one on the team wrote: sampled diagonal entries
    against float64 Hessian-vector products."""
    from pipeline.hessian import diagonal

    entry = next(e for e in LIBRARY if e.name == name)
    model, x, labels = _library_case(entry)
    target = pipeline.make_target(entry.outputs, model(x).detach(), labels, "cross_entropy")
    with HardAsClamp():
        diag, _ = diagonal(model, x, target)
    d = x[0].numel()
    rows = sorted({0, d // 3, d // 2, d - 1})
    for i, k in enumerate(entry.outputs):
        expected = _hvp_rows(model, x, k, rows, labels)[:, range(len(rows)), rows]
        assert_close_to_max(diag[:, i, rows], expected, 1e-9, f"{name} diagonal, output {k}")


def test_the_factored_hessian_of_resnet18_under_its_loss_is_exact():
    """``output=factored`` on torchvision's ResNet-18 under the loss: rows of J^T A J against
    float64 Hessian-vector products."""
    from pipeline.hessian import factored

    entry = next(e for e in LIBRARY if e.name == "tv_resnet18_loss")
    model, x, labels = _library_case(entry)
    target = pipeline.make_target("loss", model(x).detach(), labels, "cross_entropy")
    jac, curv, _ = factored(model, x, target)
    d = x[0].numel()
    rows = sorted({0, d // 3, d // 2, d - 1})
    got = torch.einsum("ncr,nce,ned->nrd", jac[:, :, rows], curv[:, 0], jac)
    assert_close_to_max(got, _hvp_rows(model, x, None, rows, labels), 1e-9, "resnet18 J^T A J")
