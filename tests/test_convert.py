"""convert() swaps a module only for a fused twin that computes the same thing: look-alikes, extra
submodules, shared instances, hooks, and a property test over random module trees."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

from fused_rnn import FusedCharLoopModel, convert
from fused_rnn.convert import CONVERTERS, Converter, register
from fused_rnn.reference import CharLoopModel as CourseModel

V, E, H = 7, 3, 5


def course_forward(self, *cs):
    """The course's forward, as a user copies it from the notebook."""
    h = torch.zeros(cs[0].shape[0], self.l_hidden.in_features, dtype=self.l_hidden.weight.dtype)
    for c in cs:
        h = torch.tanh(self.l_hidden(h + F.relu(self.l_in(self.e(c)))))
    return F.log_softmax(self.l_out(h), dim=-1)


def course_init(self, vocab_size=V, n_fac=E, n_hidden=H):
    nn.Module.__init__(self)
    self.e = nn.Embedding(vocab_size, n_fac)
    self.l_in = nn.Linear(n_fac, n_hidden)
    self.l_hidden = nn.Linear(n_hidden, n_hidden)
    self.l_out = nn.Linear(n_hidden, vocab_size)


def user_class(forward=course_forward, init=course_init):
    """A user's class named CharLoopModel, as convert() claims by name."""
    return type("CharLoopModel", (nn.Module,), {"__init__": init, "forward": forward})


UserModel = user_class()


def textbook_forward(self, *cs):  # W_h h + r: another recurrence with the same submodules
    h = torch.zeros(cs[0].shape[0], self.l_hidden.in_features, dtype=self.l_hidden.weight.dtype)
    for c in cs:
        h = torch.tanh(self.l_hidden(h) + F.relu(self.l_in(self.e(c))))
    return F.log_softmax(self.l_out(h), dim=-1)


def relu_forward(self, *cs):
    h = torch.zeros(cs[0].shape[0], self.l_hidden.in_features, dtype=self.l_hidden.weight.dtype)
    for c in cs:
        h = torch.relu(self.l_hidden(h + F.relu(self.l_in(self.e(c)))))
    return F.log_softmax(self.l_out(h), dim=-1)


def dropout_init(self):
    course_init(self)
    self.drop = nn.Dropout(0.5)


def dropout_forward(self, *cs):
    return self.drop(course_forward(self, *cs))


def nested_init(self):
    course_init(self)
    self.inner = CourseModel(V, E, H)


def nested_forward(self, *cs):
    return course_forward(self, *cs) + self.inner(*cs)


TextbookModel = user_class(textbook_forward)
ReluModel = user_class(relu_forward)
DropoutModel = user_class(dropout_forward, dropout_init)
NestedModel = user_class(nested_forward, nested_init)


def chars(B=4, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (B,), generator=g) for _ in range(T)]


def outputs(model, cs):
    with torch.no_grad():
        return model(*cs)


def convert_quietly(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(model, **kw)


# --- what is left alone, and why ------------------------------------------------------------------

@pytest.mark.parametrize("cls, why", [
    (TextbookModel, "forward differs from the fused twin's"),
    (ReluModel, "forward differs from the fused twin's"),
    (DropoutModel, r"submodules beyond e, l_in, l_hidden, l_out \(drop\)"),
    (NestedModel, r"submodules beyond e, l_in, l_hidden, l_out \(inner\)"),
], ids=["textbook-form", "relu", "extra-dropout", "extra-nested-model"])
def test_a_class_named_char_loop_model_that_computes_something_else_is_left_alone(cls, why):
    torch.manual_seed(0)
    tree = nn.Sequential(cls())
    want = outputs(tree[0].eval(), chars())
    with pytest.warns(UserWarning, match=f"left CharLoopModel alone: .*{why}"):
        convert(tree)
    assert isinstance(tree[0], cls)
    # the same outputs; the nested model's inner course model is converted (next test), so its
    # sums run in another order: equal to fp32 rounding there, bit for bit elsewhere
    exact = cls is not NestedModel
    torch.testing.assert_close(outputs(tree[0], chars()), want, rtol=0 if exact else 1e-6, atol=0 if exact else 1e-6)


def test_the_nested_course_model_of_a_refused_one_is_still_converted():
    torch.manual_seed(0)
    model = NestedModel()
    want = outputs(model, chars())
    convert_quietly(model)
    assert isinstance(model.inner, FusedCharLoopModel)
    torch.testing.assert_close(outputs(model, chars()), want)


def test_a_look_alike_that_agrees_only_at_its_current_weights_is_left_alone():
    torch.manual_seed(0)
    model = TextbookModel()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # both forms give the uniform distribution here
    uniform = torch.full((4, V), -math.log(V))
    torch.testing.assert_close(outputs(model, chars()), uniform)  # as the course model's here
    with pytest.warns(UserWarning, match="with random weights"):
        assert convert(model) is model
    assert all((p == 0).all() for p in model.parameters())  # the probe put the weights back


@pytest.mark.parametrize("option", [dict(padding_idx=0), dict(max_norm=1.0), dict(sparse=True),
                                    dict(scale_grad_by_freq=True)], ids=lambda o: next(iter(o)))
def test_embedding_options_the_fused_model_ignores_are_refused(option):
    model = UserModel()
    model.e = nn.Embedding(V, E, **option)
    with pytest.warns(UserWarning, match=f"its embedding sets {next(iter(option))}="):
        assert convert(model) is model


def test_own_parameters_are_refused():
    model = UserModel()
    model.scale = nn.Parameter(torch.ones(()))
    with pytest.warns(UserWarning, match=r"its own parameters or buffers \(scale\)"):
        assert convert(model) is model


def test_explicit_classes_warn_for_what_they_cannot_convert():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(3, 4)

    with pytest.warns(UserWarning, match="left Net alone: .*its submodule 'e' is missing"):
        assert isinstance(convert(nn.Sequential(Net()), classes=[Net])[0], Net)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend must be one of"):
        convert(CourseModel(V, E, H), backend="gpu")


# --- shared instances, hooks, attributes, state restored ---------------------------------------------

def test_every_reference_to_a_shared_instance_is_replaced_by_one_twin():
    torch.manual_seed(0)
    shared = UserModel()
    tree = nn.Module()
    tree.a, tree.b = shared, nn.ModuleList([shared, nn.Linear(2, 2), shared])
    tree.c = nn.Sequential(nn.Sequential(shared))
    convert(tree)
    twins = [tree.a, tree.b[0], tree.b[2], tree.c[0][0]]
    assert all(t is twins[0] for t in twins) and isinstance(twins[0], FusedCharLoopModel)
    assert not any(isinstance(m, UserModel) for m in tree.modules())


def test_forward_hooks_and_pre_hooks_carry_over_and_their_handles_still_work():
    torch.manual_seed(0)
    model = CourseModel(V, E, H)
    cs = chars()
    raw = outputs(model, cs)
    calls = []
    post = model.register_forward_hook(lambda m, args, out: calls.append("post") or out + 1.0)
    pre = model.register_forward_pre_hook(lambda m, args: (calls.append("pre"), tuple(reversed(args)))[1])
    want = outputs(model, cs)
    calls.clear()
    fused = convert(model)
    assert isinstance(fused, FusedCharLoopModel) and calls == []  # the probe calls no hooks
    torch.testing.assert_close(outputs(fused, cs), want)
    assert calls == ["pre", "post"]
    post.remove()
    pre.remove()
    torch.testing.assert_close(outputs(fused, cs), raw)


@pytest.mark.parametrize("where", ["submodule-forward", "backward"])
def test_hooks_the_twin_would_not_call_keep_the_module(where):
    model = CourseModel(V, E, H)
    if where == "backward":
        model.register_full_backward_hook(lambda m, gi, go: None)
    else:
        model.l_hidden.register_forward_hook(lambda m, args, out: out * 2)
    with pytest.warns(UserWarning, match="hooks"):
        assert convert(model) is model


def test_plain_attributes_carry_over():
    model = UserModel()
    model.itos = list("abcdefg")
    assert convert(model).itos == list("abcdefg")


def test_the_probe_restores_rng_training_modes_and_weights():
    torch.manual_seed(0)
    model = nn.Sequential(UserModel(), ReluModel())
    model[0].l_in.eval()
    modes = [m.training for m in model.modules()]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    with pytest.warns(UserWarning):
        convert(model)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k


# --- the table ------------------------------------------------------------------------------------------

class Doubler(nn.Module):
    def forward(self, x):
        return 2 * x


@pytest.mark.parametrize("factor, converted", [(2.0, True), (3.0, False)], ids=["same", "different"])
def test_registering_a_converter_is_one_call_and_the_probe_judges_it(factor, converted):
    class Twin(nn.Module):
        def forward(self, x):
            return x * factor

    entry = register(Converter(name="Doubler", matches=lambda m: isinstance(m, Doubler),
                               build=lambda m, backend: Twin(),
                               probe_args=lambda m, g: (torch.randn(3, generator=g),)))
    try:
        tree = nn.Sequential(Doubler(), nn.Linear(2, 2))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            convert(tree)
        assert isinstance(tree[0], Twin) == converted
        assert any("left Doubler alone" in str(w.message) for w in caught) != converted
    finally:
        CONVERTERS.remove(entry)


# --- property: convert never changes any output -----------------------------------------------------------

def add_one_hook(m, args, out):
    return out + 1.0


def hooked_course_model():
    model = CourseModel(V, E, H)
    model.register_forward_hook(add_one_hook)
    return model


def subhooked_course_model():
    model = UserModel()
    model.l_hidden.register_forward_hook(lambda m, args, out: 0.5 * out)
    return model


def zeroed_textbook_model():
    model = TextbookModel()
    for p in model.parameters():
        nn.init.zeros_(p)
    return model


# name -> (constructor, convert should replace it)
LEAVES = {"course": (lambda: CourseModel(V, E, H), True), "user": (UserModel, True),
          "hooked": (hooked_course_model, True), "textbook": (TextbookModel, False),
          "relu": (ReluModel, False), "dropout": (DropoutModel, False), "nested": (NestedModel, False),
          "subhooked": (subhooked_course_model, False), "zeroed-textbook": (zeroed_textbook_model, False),
          "linear": (lambda: nn.Linear(V, V), False)}


class Tree(nn.Module):
    """Runs every leaf on the same chars; a leaf may sit in several places (shared)."""

    def __init__(self, leaves, places):
        super().__init__()
        self.items = nn.ModuleList(leaves[i] for i in places)
        self.deeper = nn.Sequential(nn.ModuleDict({"x": leaves[places[0]]}))

    def forward(self, *cs):
        outs = [m(torch.nn.functional.one_hot(cs[0], V).double()) if isinstance(m, nn.Linear) else m(*cs)
                for m in [*self.items, self.deeper[0]["x"]]]
        return torch.cat(outs, dim=-1)


@pytest.mark.exhaustive
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kinds=st.lists(st.sampled_from(sorted(LEAVES)), min_size=1, max_size=4),
       places=st.lists(st.integers(0, 3), min_size=1, max_size=6), training=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_property_convert_never_changes_any_output(kinds, places, training, seed):
    torch.manual_seed(seed)
    leaves = [LEAVES[k][0]() for k in kinds]
    tree = Tree(leaves, [p % len(leaves) for p in places]).double().train(training)
    cs = chars(seed=seed)

    def run():
        torch.manual_seed(seed)  # the same dropout masks before and after
        out = tree(*cs)
        grads = torch.autograd.grad(out.sum(), list(tree.parameters()), allow_unused=True)
        return out.detach(), {id(p): g for p, g in zip(tree.parameters(), grads)}

    want, want_grads = run()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert convert(tree) is tree
    got, got_grads = run()
    torch.testing.assert_close(got, want)
    assert got_grads.keys() == want_grads.keys()  # the same parameter objects
    for key, g in got_grads.items():
        if want_grads[key] is None:
            assert g is None
        else:
            torch.testing.assert_close(g, want_grads[key])
    converted = [isinstance(m, FusedCharLoopModel) for m in [*tree.items, tree.deeper[0]["x"]]]
    expected = [LEAVES[kinds[p % len(leaves)]][1] for p in [*places, places[0]]]
    assert converted == expected
    placed = {kinds[p % len(leaves)] for p in places}
    refused = {k for k in placed if k != "linear" and not LEAVES[k][1]}
    assert bool([w for w in caught if "left" in str(w.message)]) == bool(refused)
