"""A chain of step ops run in one call (``attention_core.step_chain``): random chains of
linear, feed-forward and linear-attention steps against a plain-PyTorch formula written here
(float64 and float32, several calls threading the states, intermediate and column outputs),
the compiled chain against the composed public functions (grad mode, forced reference),
autograd and gradcheck, states left untouched and taken non-contiguous, weights changed in
place or given other storage, thread counts, zero rows, bad arguments, and the compiled
binding's validation of bad programs (in a subprocess, where a crash cannot take the run)."""

import random

import pytest
import torch
import torch.nn.functional as F

import attention_core.step_chain as step_chain_module
import attention_core.step_chain._run as step_chain_run
from attention_core.step_chain import StepChain
from attention_core.testing import assert_close

TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
}


def plain_ff(x, w1, b1, w2, b2, nw, nb, activation, norm_first, eps):
    """The feed-forward sublayer, written out."""
    ln = lambda t: F.layer_norm(t, (t.shape[-1],), nw, nb, eps)  # noqa: E731
    hidden = F.linear(ln(x) if norm_first else x, w1, b1)
    if activation == "relu":
        hidden = F.relu(hidden)
    elif activation == "gelu":
        hidden = F.gelu(hidden)
    else:
        value, gate = hidden.chunk(2, dim=-1)
        hidden = value * F.gelu(gate)
    y = x + F.linear(hidden, w2, b2)
    return y if norm_first else ln(y)


def plain_step(q, k, v, state, heads, eps, elu):
    """One linear attention step on ``(R, H E)`` columns, per row and head."""
    R = q.shape[0]
    q, k, v = (t.reshape(R, heads, -1) for t in (q, k, v))
    if elu:
        q, k = F.elu(q) + 1, F.elu(k) + 1
    S, Z = (0, 0) if state is None else state
    S = S + torch.einsum("rhe,rhm->rhem", k, v)
    Z = Z + k
    out = torch.einsum("rhe,rhem->rhm", q, S) / (torch.einsum("rhe,rhe->rh", q, Z)[..., None] + eps)
    return out.reshape(R, -1), (S, Z)


def dbl(t):  # the formula's dtype
    return None if t is None else t.double()


class Pair:
    """A `StepChain` built alongside its plain formula: a value is ``(slot, (index, a, b))``,
    the columns ``[a, b)`` of the formula's ``index``-th value."""

    def __init__(self, width, dtype, seed):
        self.chain = StepChain(width)
        self.input = (self.chain.input, (0, 0, width))
        self.dtype, self.g = dtype, torch.Generator().manual_seed(seed)
        self.ops, self.weights = [], []

    def rand(self, *shape, scale=1.0, shift=0.0):
        t = torch.randn(*shape, generator=self.g, dtype=self.dtype) * scale + shift
        self.weights.append(t)
        return t

    def _new(self, slot, width, formula):
        self.ops.append(formula)
        return slot, (len(self.ops), 0, width)

    @staticmethod
    def get(values, ref):
        index, a, b = ref
        return values[index][:, a:b]

    def linear(self, inputs, D, bias=True, residual=None, norm=False, norm_params=True, shift=0.0):
        K = inputs[1][2] - inputs[1][1]
        w = self.rand(D, K, scale=0.5 / K**0.5)
        b = self.rand(D, scale=0.1, shift=shift) if bias else None
        nw, nb = (self.rand(D, shift=1.0), self.rand(D)) if norm_params else (None, None)
        slot = self.chain.linear(
            inputs[0], w, b, residual=None if residual is None else residual[0],
            norm_weight=nw, norm_bias=nb, norm=norm, eps=1e-5,
        )  # fmt: skip

        def formula(values, states):
            y = F.linear(self.get(values, inputs[1]), dbl(w), dbl(b))
            if residual is not None:
                y = y + self.get(values, residual[1])
            return F.layer_norm(y, (D,), dbl(nw), dbl(nb), 1e-5) if norm else y

        return self._new(slot, D, formula)

    def feed_forward(self, x, hidden, activation, norm_first, biases=True):
        D = x[1][2] - x[1][1]
        first = 2 * hidden if activation == "geglu" else hidden
        w1, w2 = self.rand(first, D, scale=D**-0.5), self.rand(D, hidden, scale=hidden**-0.5)
        b1, b2, nb = (self.rand(first), self.rand(D), self.rand(D)) if biases else (None,) * 3
        nw = self.rand(D, shift=1.0) if biases else None
        params = (w1, b1, w2, b2, nw, nb)
        options = dict(activation=activation, norm_first=norm_first, eps=1e-5)
        slot = self.chain.feed_forward(x[0], *params, **options)
        formula = lambda values, _: plain_ff(self.get(values, x[1]), *map(dbl, params), **options)  # noqa: E731
        return self._new(slot, D, formula)

    def columns(self, value, a, b):
        index, start, _ = value[1]
        return self.chain.columns(value[0], a, b), (index, start + a, start + b)

    def attention(self, q, k, v, heads, elu, eps=1e-6):
        slot = self.chain.linear_attention_step(q[0], k[0], v[0], heads, eps, elu_feature_map=elu)
        index = self.chain.steps - 1

        def formula(values, states):
            qkv = (self.get(values, t[1]) for t in (q, k, v))
            out, states[index] = plain_step(*qkv, states[index], heads, eps, elu)
            return out

        return self._new(slot, v[1][2] - v[1][1], formula)

    def reference(self, x, states, output=None):
        """The formula's ``output`` (default: the last value) and its new states."""
        values, states = [x.double()], list(states or [None] * self.chain.steps)
        states = [None if s is None else (s[0].double(), s[1].double()) for s in states]
        for formula in self.ops:
            values.append(formula(values, states))
        last = (len(self.ops), 0, values[-1].shape[1])
        return self.get(values, output[1] if output else last), states


def random_pair(seed, dtype):
    """A random chain: blocks of (qkv product, columns, attention step, output product with
    residual [and norm], feed-forward), widths, heads, E != M, None biases and norms drawn."""
    r = random.Random(seed)
    D = r.choice([4, 6, 8, 12])
    pair = Pair(D, dtype, seed)
    x, outputs = pair.input, []
    for _ in range(r.choice([1, 2])):
        H, E, M = r.choice([1, 2, 3]), r.choice([1, 2, 4]), r.choice([1, 3, 5])
        elu = r.random() < 0.7
        # the identity feature map needs positive queries and keys: a large positive bias
        qk = pair.linear(x, 2 * H * E, bias=True, shift=0.0 if elu else 3.0)
        value = pair.linear(x, H * M, bias=r.random() < 0.5, norm=r.random() < 0.5,
                            norm_params=r.random() < 0.5)  # fmt: skip
        q, k = pair.columns(qk, 0, H * E), pair.columns(qk, H * E, 2 * H * E)
        heads = pair.attention(q, k, value, H, elu)
        x = pair.linear(heads, D, bias=r.random() < 0.5, residual=x, norm=r.random() < 0.5,
                        norm_params=r.random() < 0.5)  # fmt: skip
        activation = r.choice(["relu", "gelu", "geglu"])
        x = pair.feed_forward(x, r.choice([3, 8]), activation, r.random() < 0.5, r.random() < 0.5)
        outputs += [heads, k]
    return pair, outputs


def draw(rows, width, dtype, seed):
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture
def compiled_calls(monkeypatch):
    """The dtypes of the compiled chain's calls (the binding the module looks up, spied on)."""
    calls, binding = [], step_chain_run.binding

    def spy(name, dtype):
        function = binding(name, dtype)
        return lambda *args: (calls.append(dtype), function(*args))[1]

    monkeypatch.setattr(step_chain_run, "binding", spy)
    return calls


def check_states(got, want, dtype):
    assert len(got) == len(want)
    for i, ((S, Z), (S_ref, Z_ref)) in enumerate(zip(got, want)):
        assert S.dtype == Z.dtype == dtype
        assert_close(f"S{i}", S, S_ref, **TOLERANCES[dtype])
        assert_close(f"Z{i}", Z, Z_ref, **TOLERANCES[dtype])


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("rows", [1, 2, 3, 7])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("grad", [False, True], ids=["compiled", "composed"])
def test_random_chains_equal_the_formula_over_several_calls(
    seed, rows, dtype, grad, compiled_calls
):
    pair, outputs = random_pair(seed, dtype)
    chain, tol = pair.chain, TOLERANCES[dtype]
    states = ref_states = None
    with torch.set_grad_enabled(grad):
        for call in range(3):
            x = draw(rows, chain.input.width, dtype, 100 * seed + call)
            if call == 2:  # an explicit list: the first step starts again, the others go on
                states = [None, *states[1:]]
                ref_states = [None, *ref_states[1:]]
            y, new = chain(x, states)
            want, new_ref = pair.reference(x, ref_states)
            assert y.shape == want.shape and y.dtype == dtype
            assert_close("y", y, want, **tol)
            check_states(new, new_ref, dtype)
            for output in outputs:  # an intermediate value and a columns slot
                got, _ = chain(x, states, output=output[0])
                assert_close("output", got, pair.reference(x, ref_states, output)[0], **tol)
            states, ref_states = new, new_ref
        got, _ = chain(x, states, output=chain.input)
        assert torch.equal(got, x)
        x = draw(rows + 2, chain.input.width, dtype, seed)  # another row count, first step
        assert_close("y", chain(x)[0], pair.reference(x, None)[0], **tol)
    # one compiled call per call of the chain with grad mode off, none with it on
    assert compiled_calls == ([] if grad else [dtype] * (3 * (1 + len(outputs)) + 2))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_the_compiled_chain_equals_the_composed_functions(seed, dtype, monkeypatch, compiled_calls):
    pair, outputs = random_pair(seed, dtype)
    x = draw(3, pair.chain.input.width, dtype, seed)
    results = []
    for mode in ("no_grad", "enable_grad", "forced"):
        if mode == "forced":
            monkeypatch.setenv("ATTENTION_CORE_FORCE_REFERENCE", "1")
        with torch.no_grad() if mode != "enable_grad" else torch.enable_grad():
            y1, s1 = pair.chain(x)
            y2, s2 = pair.chain(x, s1)
            mid, _ = pair.chain(x, s1, output=outputs[0][0])
        results.append([y1, y2, mid, *(t for s in s1 + s2 for t in s)])
        assert len(compiled_calls) == 3  # the first mode's only
    for other in results[1:]:
        for got, want in zip(results[0], other):
            assert_close("compiled vs composed", got, want, **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_many_row_counts_in_turn(dtype, compiled_calls):
    pair, _ = random_pair(4, dtype)
    with torch.no_grad():
        for rows in [*range(1, 12), 3, 1, 11]:  # more row counts than the chain keeps programs
            x = draw(rows, pair.chain.input.width, dtype, rows)
            y, states = pair.chain(x)
            want, want_states = pair.reference(x, None)
            assert_close("y", y, want, **TOLERANCES[dtype])
            check_states(states, want_states, dtype)
    assert len(compiled_calls) == 14


@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_columns_of_the_input_and_of_wider_values(rows, dtype, compiled_calls):
    pair = Pair(12, dtype, 0)
    normed = pair.linear(pair.input, 6, norm=True)
    q, k, v = (pair.columns(pair.input, a, b) for a, b in ((0, 4), (4, 8), (6, 12)))
    heads = pair.attention(q, k, v, 2, True)  # the heads of the input's columns
    residual = pair.columns(pair.linear(heads, 10), 2, 8)  # rows 10 apart
    y = pair.linear(pair.columns(pair.input, 3, 9), 6, residual=residual, norm=True)
    pair.linear(y, 6, residual=normed, norm_params=False)
    with torch.no_grad():
        x = draw(rows, 12, dtype, rows)
        got, states = pair.chain(x)
        got2, _ = pair.chain(x, states, output=residual[0])
    want, want_states = pair.reference(x, None)
    assert_close("y", got, want, **TOLERANCES[dtype])
    assert_close("residual", got2, pair.reference(x, want_states, residual)[0], **TOLERANCES[dtype])
    assert len(compiled_calls) == 2


def tiny_pair(dtype=torch.float64, seed=0):
    pair = Pair(4, dtype, seed)
    qkv = pair.linear(pair.input, 8, norm=True)
    q, k, v = (pair.columns(qkv, a, a + 4) for a in (0, 2, 4))  # overlapping columns
    heads = pair.attention(q, k, v, 2, True)
    y = pair.linear(heads, 4, residual=pair.input, norm=True)
    pair.feed_forward(y, 6, "geglu", True)
    return pair


def test_autograd_flows_through_the_chain_and_gradcheck_passes():
    pair = tiny_pair()
    weight = pair.weights[0].requires_grad_()
    x = draw(3, 4, torch.float64, 1).requires_grad_()
    state = (torch.rand(3, 2, 2, 2, dtype=torch.float64), torch.rand(3, 2, 2, dtype=torch.float64))
    y, ((S, Z),) = pair.chain(x, [state])
    assert y.requires_grad and S.requires_grad and Z.requires_grad
    (y.sum() + S.sum()).backward()
    grads = weight.grad.clone(), x.grad.clone()
    weight.grad = x.grad = None
    y_ref, ((S_ref, _),) = pair.reference(x, [state])
    (y_ref.sum() + S_ref.sum()).backward()
    assert_close("dW", grads[0], weight.grad, rtol=1e-10, atol=1e-10)
    assert_close("dx", grads[1], x.grad, rtol=1e-10, atol=1e-10)

    # gradcheck perturbs its inputs in place: the held weight itself is one of them
    def run(x, w):
        assert w is weight
        return pair.chain(x, [state])[0]

    assert torch.autograd.gradcheck(run, (x.detach().requires_grad_(), weight))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_states_are_left_untouched_and_may_be_non_contiguous(dtype):
    pair, _ = random_pair(1, dtype)
    x = draw(3, pair.chain.input.width, dtype, 0)
    with torch.no_grad():
        _, states = pair.chain(x)
        before = [(S.clone(), Z.clone()) for S, Z in states]
        x_before = x.clone()
        y, new = pair.chain(x, states)
        for (S, Z), (S0, Z0) in zip(states, before):
            assert torch.equal(S, S0) and torch.equal(Z, Z0)
        assert torch.equal(x, x_before)
        # transposed back: the same values, rows apart by one element
        strided = [
            tuple(t.transpose(0, -1).contiguous().transpose(0, -1) for t in s) for s in states
        ]
        assert not any(t.is_contiguous() for s in strided for t in s)
        y2, new2 = pair.chain(x, strided)
        strided_x = torch.stack([x, -x], dim=-1)[..., 0]  # x, every other element
        y3, _ = pair.chain(strided_x, states)
    assert torch.equal(y, y2) and torch.equal(y, y3)
    for (S, Z), (S2, Z2) in zip(new, new2):
        assert torch.equal(S, S2) and torch.equal(Z, Z2)


def test_weight_changes_are_seen(compiled_calls):
    pair = tiny_pair(torch.float32)
    w = pair.weights[0]
    x = draw(2, 4, torch.float32, 3)

    def check(label, compiled=True):
        before = len(compiled_calls)
        with torch.no_grad():
            y, _ = pair.chain(x)
        assert_close(label, y, pair.reference(x, None)[0], **TOLERANCES[torch.float32])
        assert len(compiled_calls) == before + compiled

    check("first call")
    w.mul_(2)
    check("in-place change")
    w.data = torch.randn(w.shape, generator=torch.Generator().manual_seed(5))
    check("other storage")
    w.data = w.data.t().contiguous().t()  # non-contiguous: the composed path
    assert not w.is_contiguous()
    check("non-contiguous weight", compiled=False)
    w.data = w.data.contiguous() * 0.5
    check("contiguous again")


@pytest.mark.parametrize("new", ["float64", "wider"])
@pytest.mark.parametrize("grad", [False, True], ids=["compiled", "composed"])
def test_a_weight_given_another_dtype_or_shape_is_refused(new, grad):
    # found while writing these tests: the compiled chain used to run its old program on such
    # a weight (float64 bytes read as float32; the wider one's first 64 values as (8, 8))
    w = torch.randn(8, 8)
    chain = StepChain(8)
    chain.linear(chain.input, w)
    x = torch.randn(3, 8)
    with torch.set_grad_enabled(grad):
        chain(x)
        # larger than the old weight, so that nothing reads outside it if the check is missing
        w.data = torch.randn(8, 8, dtype=torch.float64) if new == "float64" else torch.randn(8, 16)
        with pytest.raises((ValueError, RuntimeError)) as info:
            chain(x)
    # the chain's own check, also on the composed path (F.linear would raise otherwise)
    words = ["weight 0", "float32", "float64"] if new == "float64" else ["(8, 8)", "(8, 16)"]
    assert info.type is step_chain_module.WeightChangedError, info.value
    assert all(w in str(info.value) for w in words), info.value


def error_chain():
    chain = StepChain(4)
    qkv = chain.linear(chain.input, torch.randn(12, 4))
    q, k, v = (chain.columns(qkv, a, a + 4) for a in (0, 4, 8))
    chain.linear_attention_step(q, k, v, heads=2)
    return chain


def S_Z(dtype=torch.float32, S_shape=(2, 2, 2, 2), Z_shape=(2, 2, 2)):
    return [(torch.zeros(S_shape, dtype=dtype), torch.zeros(Z_shape, dtype=dtype))]


X = torch.zeros(2, 4)
CALL_ERRORS = {  # id: (x, states, output, exception, words of the message)
    "x-width": (torch.zeros(2, 5), None, None, ValueError, ["x", "(R, 4)", "(2, 5)"]),
    "x-dim": (torch.zeros(4), None, None, ValueError, ["x", "(R, 4)", "(4,)"]),
    "x-dtype": (X.double(), None, None, TypeError, ["x", "float32", "float64"]),
    "x-not-a-tensor": ([[0.0] * 4], None, None, TypeError, ["x", "list"]),
    "states-length": (X, [None, None], None, ValueError, ["states", "1 states", "2 states"]),
    "S-shape": (X, S_Z(S_shape=(2, 2, 2, 3)), None, ValueError,
                ["states[0].S", "(2, 2, 2, 2)", "(2, 2, 2, 3)"]),
    "Z-shape": (X, S_Z(Z_shape=(3, 2, 2)), None, ValueError,
                ["states[0].Z", "(2, 2, 2)", "(3, 2, 2)"]),
    "state-dtype": (X, S_Z(torch.float64), None, ValueError, ["states[0].S", "float32", "float64"]),
    "output-of-another-chain": (X, None, StepChain(4).input, ValueError,
                                ["output", "Slot of this chain"]),
}  # fmt: skip


@pytest.mark.parametrize("case", CALL_ERRORS)
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_bad_call_arguments_are_named(case, grad):
    x, states, output, error, words = CALL_ERRORS[case]
    chain = error_chain()
    with torch.set_grad_enabled(grad), pytest.raises(error) as info:
        chain(x, states, output=output)
    for word in words:
        assert word in str(info.value), str(info.value)


def other_slot(chain, a, w):
    return chain.linear(StepChain(4).input, w)


BUILD_ERRORS = {  # id: (what adds the op to a chain with (R, 8) value a, exception, words)
    "slot-of-another-chain": (other_slot, ValueError, ["inputs", "Slot of this chain"]),
    "columns-out-of-range": (lambda c, a, w: c.columns(a, 4, 9), ValueError,
                             ["0 <= start < stop <= 8", "4, 9"]),
    "columns-empty": (lambda c, a, w: c.columns(a, 3, 3), ValueError,
                      ["0 <= start < stop <= 8", "3, 3"]),
    "weight-shape": (lambda c, a, w: c.linear(a, w), ValueError, ["weight", "(8, 8)", "(8, 4)"]),
    "dtypes": (lambda c, a, w: c.linear(a, torch.randn(4, 8).double()), TypeError,
               ["dtype", "torch.float32", "torch.float64"]),
    "heads": (lambda c, a, w: c.linear_attention_step(c.columns(a, 0, 3), c.columns(a, 3, 6), a, 2),
              ValueError, ["query", "divisible by heads (2)", "3"]),
    "key-width": (lambda c, a, w: c.linear_attention_step(c.columns(a, 0, 4), a, a, 2),
                  ValueError, ["key", "width of query (4)", "8"]),
    "no-ops": (lambda c, a, w: StepChain(4)(torch.zeros(1, 4)), ValueError, ["no ops"]),
    "zero-width": (lambda c, a, w: StepChain(0), ValueError, ["width", "positive", "0"]),
}  # fmt: skip


@pytest.mark.parametrize("case", BUILD_ERRORS)
def test_bad_chains_are_refused_when_built(case):
    build, error, words = BUILD_ERRORS[case]
    chain, w = StepChain(4), torch.randn(8, 4)
    a = chain.linear(chain.input, w)
    with pytest.raises(error) as info:
        build(chain, a, w)
    for word in words:
        assert word in str(info.value), str(info.value)


# programs for the binding, with bases x (2, 4), w (3, 4) and out (2, 3) (float32): a product
# x w^T: x (null), ldx, a, lda, R, D, K, W, b, norm, norm weight, norm bias, out
GOOD = [0, -1, 0, 3, 0, 0, 4, 2, 3, 4, 1, 0, -1, 0, 0, -1, 0, -1, 0, 2, 0]
# a feed-forward sublayer (x, ldx, R, D, F, W1, b1, W2, b2, norms, activation, norm first, out)
# and an attention step (q, k, v with strides, S, Z, out, new S and Z, N, H, E, M, elu)
FF = [1, 0, 0, 3, 2, 3, 2, 1, 0, -1, 0, 1, 0, *[-1, 0] * 3, 3, 0, 2, 0]
STEP = [2, 0, 0, 4, 1, 0, 1, 4, 1, 0, 2, 4, 1, *[-1, 0] * 2, 2, 0, 2, 2, 2, 4, 2, 1, 1, 1, 2]
BAD_PROGRAMS = {  # id: (program, scalars, threads, message)
    "valid": (GOOD, [1e-5], 1, "ok"),
    "kind": ([7, *GOOD[1:]], [1e-5], 1, "op 0: kind must be 0 (linear), 1 (feed forward), 2"),
    "truncated": (GOOD[:-3], [1e-5], 1, "program ends inside op 0: it needs 20 fields"),
    "base": ([*GOOD[:10], 9, *GOOD[11:]], [1e-5], 1, "op 0: address (9, 0) outside the bases (3)"),
    "offset": ([*GOOD[:10], 1, -1, *GOOD[12:]], [1e-5], 1, "op 0: address (1, -1) outside"),
    "flag": ([*GOOD[:14], 2, *GOOD[15:]], [1e-5], 1, "op 0: a flag must be 0 or 1; got 2"),
    "elu-flag": (STEP, [1e-6], 1, "op 0: a flag must be 0 or 1; got 2"),
    "activation": (FF, [1e-5], 1, "activation must be 0 (relu), 1 (gelu) or 2 (geglu); got 3"),
    "scalars-short": (GOOD, [], 1, "scalars holds 0 values; op 0 needs one"),
    "scalars-long": (GOOD, [1e-5, 1e-5], 1, "scalars holds 2 values for 1 ops"),
    "threads": (GOOD, [1e-5], 0, "threads must be a positive int; got 0"),
    "second-op-kind": ([*GOOD, 9, *GOOD[1:]], [1e-5, 1e-5], 1, "op 1: kind must be"),
}
SUBPROCESS_CODE = """
import json, sys, torch
from attention_core import _C
x, w, out = torch.randn(2, 4), torch.randn(3, 4), torch.zeros(2, 3)
for name, (program, scalars, threads, _) in json.loads(sys.argv[1]).items():
    try:
        p = torch.tensor(program, dtype=torch.int64)
        bases = [x.data_ptr(), w.data_ptr(), out.data_ptr()]
        _C.step_chain_f32(p.data_ptr(), p.numel(), bases, scalars, [], threads)
        print(name, "ok" if torch.allclose(out, x @ w.T, atol=1e-5) else "wrong result", flush=True)
    except ValueError as e:
        print(name, f"ValueError: {e}", flush=True)
"""


@pytest.fixture(scope="module")
def bad_program_output(run_programs):
    return run_programs(SUBPROCESS_CODE, BAD_PROGRAMS)


@pytest.mark.parametrize("name", BAD_PROGRAMS)
def test_the_binding_refuses_bad_programs(bad_program_output, name):
    got, message = bad_program_output[name], BAD_PROGRAMS[name][3]
    assert got == message if name == "valid" else got.startswith("ValueError: " + message), got


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_one_thread_equals_two(dtype):
    pair = Pair(64, dtype, 0)  # large enough for the kernels to share the work
    qkv = pair.linear(pair.input, 192)
    heads = pair.attention(*(pair.columns(qkv, a, a + 64) for a in (0, 64, 128)), 4, True)
    y = pair.linear(heads, 64, residual=pair.input, norm=True)
    pair.feed_forward(y, 256, "gelu", False)
    x = draw(33, 64, dtype, 0)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with torch.no_grad():
                y, states = pair.chain(x)
                y2, states2 = pair.chain(x, states)
            results.append([y, y2, *(t for s in states2 for t in s)])
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert_close("threads", one, two, **TOLERANCES[dtype])


@pytest.mark.parametrize(
    "attention, with_states",
    [
        pytest.param(False, False, id="no-attention"),
        pytest.param(True, False, id="first-step"),
        pytest.param(True, True, id="states"),
    ],
)
def test_zero_rows_give_empty_outputs(attention, with_states):
    if attention:
        pair, outputs = random_pair(3, torch.float64)
        inner = outputs[1][0]
    else:
        pair = Pair(5, torch.float64, 0)
        inner = pair.columns(pair.linear(pair.input, 7, norm=True), 2, 5)[0]
        pair.feed_forward(pair.linear(pair.input, 5, residual=pair.input), 6, "gelu", False)
    chain = pair.chain
    x = torch.zeros(0, chain.input.width, dtype=torch.float64)
    with torch.no_grad():
        _, shapes_from = chain(draw(1, chain.input.width, torch.float64, 0))
        states = [(S[:0], Z[:0]) for S, Z in shapes_from] if with_states else None
        y, new = chain(x, states)
        mid, _ = chain(x, states, output=inner)
    assert y.shape == (0, chain.input.width) and mid.shape == (0, inner.width)
    assert len(new) == chain.steps
    for (S, Z), (S1, Z1) in zip(new, shapes_from):
        assert S.shape == (0, *S1.shape[1:]) and Z.shape == (0, *Z1.shape[1:])


def test_slots_outside_their_buffer_and_of_copies_are_refused():
    import copy
    import dataclasses

    chain = StepChain(4)
    a = chain.linear(chain.input, torch.randn(8, 4))
    for forged in (
        dataclasses.replace(a, width=4_000_000),
        dataclasses.replace(a, start=6),
        dataclasses.replace(a, buffer=5),
        dataclasses.replace(a, start=-1),
    ):
        with pytest.raises(ValueError, match="Slot of this chain"):
            chain.linear(forged, torch.randn(2, forged.width if forged.width < 100 else 8))
    twin = copy.deepcopy(chain)  # another chain: its values are made from its own input
    with pytest.raises(ValueError, match="Slot of this chain"):
        twin.linear(a, torch.randn(2, 8))
    b = twin.linear(twin.input, torch.randn(3, 4))
    with pytest.raises(ValueError, match="Slot of this chain"):
        chain.linear(b, torch.randn(2, 3))
    with torch.no_grad():
        y, _ = twin(torch.randn(2, 4))
    assert y.shape == (2, 3)


def test_a_weight_whose_storage_shrank_is_refused():
    w = torch.randn(8, 4)
    chain = StepChain(4)
    chain.linear(chain.input, w)
    x = torch.randn(3, 4)
    with torch.no_grad():
        chain(x)
        w.untyped_storage().resize_(8)  # behind the tensor's back: 2 of its 32 elements
        with pytest.raises(step_chain_module.WeightChangedError, match="storage"):
            chain(x)


@pytest.mark.parametrize("start, stop", [(True, 2), (0, 2.0), (0, 0), (1, 5)])
def test_columns_take_int_bounds_inside_the_value(start, stop):
    chain = StepChain(4)
    with pytest.raises(ValueError, match="columns"):
        chain.columns(chain.input, start, stop)
