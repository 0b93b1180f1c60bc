"""The cache ops, the row ops and the positions of a `StepChain`: random chains of layer
norms, products, cache writes, cache attention and weighted sums against a plain-PyTorch
formula written here (float64 and float32, several calls at other positions, the caches after
them), on the compiled chain and on the composed functions; empty ranges, masked rows and a
causal bias; gradcheck; bad positions, shapes and programs (the binding's in a subprocess,
where a crash cannot take the run); held caches given other storage; copies."""

import copy
import math
import random

import pytest
import torch
import torch.nn.functional as F

import attention_core.step_chain._run as step_chain_run
from attention_core.step_chain import StepChain, WeightChangedError
from attention_core.testing import assert_close

TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
}


@pytest.fixture(autouse=True)
def seeded():
    """The tests that draw from torch's global generator draw the same numbers at every run."""
    torch.manual_seed(0)


@pytest.fixture
def compiled_calls(monkeypatch):
    """The dtypes of the compiled chain's calls (the binding the module looks up, spied on)."""
    calls, binding = [], step_chain_run.binding

    def spy(name, dtype):
        function = binding(name, dtype)
        return lambda *args: (calls.append(dtype), function(*args))[1]

    monkeypatch.setattr(step_chain_run, "binding", spy)
    return calls


# the formula, written out in float64


def plain_layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    return y * (1 if weight is None else weight) + (0 if bias is None else bias)


def plain_cache_attention(q, keys, values, start, end, bias, column, scale):
    """Query row ``b W + w``, head ``h``, over the positions ``start .. end - 1``."""
    B, H, _, E = keys.shape
    M, W = values.shape[3], q.shape[0] // B
    out = torch.zeros(q.shape[0], H, M, dtype=torch.float64)
    for b in range(B):
        for w in range(W):
            for h in range(H):
                query = q[b * W + w, h * E : (h + 1) * E]
                scores = scale * (keys[b, h, start:end] @ query)
                if bias is not None:
                    table = bias[b, h] if bias.dim() == 4 else bias[h]  # per element, or shared
                    scores = scores + table[w, column : column + end - start]
                if end > start and not torch.isneginf(scores).all():
                    out[b * W + w, h] = torch.softmax(scores, 0) @ values[b, h, start:end]
    return out.reshape(q.shape[0], H * M)


def plain_write(cache, x, position):
    B, H, _, E = cache.shape
    W = x.shape[0] // B
    for b in range(B):
        for w in range(W):
            cache[b, :, position + w] = x[b * W + w].reshape(H, E)


def dbl(t):
    return None if t is None else t.double()


class CacheChain:
    """A random chain: layer norm, a product to keys, values and queries, their writes into
    held caches at ``p``, attention over ``start .. end - 1`` (``end = p + W``, what was
    just written included), a product with residual, a feed-forward sublayer and a weighted
    sum; with its formula. Positions: ``[p, start, end]`` (and the bias column)."""

    def __init__(self, seed, dtype, W):
        r = random.Random(100 * W + seed)
        self.g = torch.Generator().manual_seed(100 * W + seed)
        self.dtype, self.W = dtype, W
        self.B, H = r.randint(1, 3), r.randint(1, 3)
        E, M = r.randint(1, 16), r.randint(1, 16)
        self.C, D = r.randint(W + 1, 40), r.choice([3, 8])
        self.H, self.E, self.M, self.D = H, E, M, D
        self.keys = self.rand(self.B, H, self.C, E)
        self.values = self.rand(self.B, H, self.C, M)
        # the chain's first op: it must hold a tensor (the weight, the bias or both)
        norm = self.rand(D, shift=1.0), self.rand(D)
        self.ln = r.choice([norm, (norm[0], None), (None, norm[1])])
        self.w_in = self.rand(H * (2 * E + M), D, scale=D**-0.5)
        self.w_out = self.rand(D, H * M, scale=(H * M) ** -0.5)
        self.ff = (self.rand(5, D), self.rand(5), self.rand(D, 5), None, self.rand(D), None)
        self.coefficients = self.rand(3)
        self.scale = None if r.random() < 0.5 else r.uniform(0.1, 2.0)
        self.bias_kind = r.choice(["none", "by-position", "own-column"])
        columns = self.C + (r.randint(0, 5) if self.bias_kind == "own-column" else 0)
        self.bias = None if self.bias_kind == "none" else self.rand(H, W + r.randint(0, 2), columns)
        self.eps = r.choice([1e-5, 1e-3])

        chain = self.chain = StepChain(D)
        C = self.C
        self.positions = [chain.position(C - W), chain.position(C), chain.position(C)]
        if self.bias_kind == "own-column":
            self.positions.append(chain.position(columns))
        ln = chain.layer_norm(chain.input, *self.ln, eps=self.eps)
        kvq = chain.linear(ln, self.w_in)
        k, v, q = (chain.columns(kvq, H * a, H * b) for a, b in ((0, E), (E, E + M),
                                                                 (E + M, 2 * E + M)))  # fmt: skip
        # strided sources: a layer norm (neither scale nor shift) and a weighted sum of columns
        self.side_coefficients = self.rand(2)
        self.side = chain.weighted_sum([chain.layer_norm(q, None, None), k], self.side_coefficients)
        chain.cache_write(k, self.keys, self.positions[0])
        chain.cache_write(v, self.values, self.positions[0])
        heads = chain.cache_attention(
            q, self.keys, self.values, self.positions[1], self.positions[2], self.bias,
            self.positions[3] if self.bias_kind == "own-column" else None, scale=self.scale,
        )  # fmt: skip
        y = chain.linear(heads, self.w_out, residual=chain.input)
        f = chain.feed_forward(y, *self.ff, activation="gelu", norm_first=True)
        chain.weighted_sum([f, chain.input, ln], self.coefficients)
        self.heads = heads
        self.ref_keys, self.ref_values = self.keys.double(), self.values.double()

    def rand(self, *shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=self.g, dtype=self.dtype) * scale + shift

    def draw_positions(self, r):
        p = r.randint(0, self.C - self.W)
        end = p + self.W
        start = r.randint(0, end)
        positions = [p, start, end]
        if self.bias_kind == "own-column":
            positions.append(r.randint(0, self.bias.shape[2] - (end - start)))
        return positions

    def reference(self, x, positions):
        """The output, the attention's output; writes the formula's own caches."""
        H, E, M = self.H, self.E, self.M
        x = x.double()
        ln = plain_layer_norm(x, *map(dbl, self.ln), self.eps)
        kvq = ln @ self.w_in.double().T
        plain_write(self.ref_keys, kvq[:, : H * E], positions[0])
        plain_write(self.ref_values, kvq[:, H * E : H * (E + M)], positions[0])
        scale = self.E**-0.5 if self.scale is None else self.scale
        column = positions[3] if self.bias_kind == "own-column" else positions[1]
        heads = plain_cache_attention(
            kvq[:, H * (E + M) :], self.ref_keys, self.ref_values, positions[1], positions[2],
            dbl(self.bias), column, scale,
        )  # fmt: skip
        y = x + heads @ self.w_out.double().T
        w1, b1, w2, _, nw, _ = map(dbl, self.ff)
        f = y + F.gelu(plain_layer_norm(y, nw, None, 1e-5) @ w1.T + b1) @ w2.T
        c = self.coefficients.double()
        q, k, s = kvq[:, H * (E + M) :], kvq[:, : H * E], self.side_coefficients.double()
        side = s[0] * plain_layer_norm(q, None, None, 1e-5) + s[1] * k
        return c[0] * f + c[1] * x + c[2] * ln, heads, side


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("W", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("grad", [False, True], ids=["compiled", "composed"])
def test_random_cache_chains_equal_the_formula_over_several_calls(
    seed, W, dtype, grad, compiled_calls
):
    case = CacheChain(seed, dtype, W)
    chain, tol, r = case.chain, TOLERANCES[dtype], random.Random(seed)
    with torch.set_grad_enabled(grad):
        for _ in range(4):
            x = case.rand(case.B * W, case.D)
            positions = case.draw_positions(r)
            heads, _ = chain(x, positions=positions, output=case.heads)  # writes once more
            side, _ = chain(x, positions=positions, output=case.side)
            y, states = chain(x, positions=positions)
            want, want_heads, want_side = case.reference(x, positions)
            assert states == [] and y.dtype == dtype
            assert_close("y", y, want, **tol)
            assert_close("heads", heads, want_heads, **tol)
            assert_close("side", side, want_side, **tol)
            assert_close("keys", case.keys, case.ref_keys, **tol)
            assert_close("values", case.values, case.ref_values, **tol)
    assert compiled_calls == ([] if grad else [dtype] * 12)


def small_chain(dtype=torch.float64, B=2, H=2, E=2, C=6, bias=None, scale=None):
    """x (R, H E) written into K and V at p, attention of x over ``start .. end - 1``."""
    chain = StepChain(H * E)
    K, V = torch.zeros(B, H, C, E, dtype=dtype), torch.zeros(B, H, C, E, dtype=dtype)
    p, start, end = chain.position(C), chain.position(C), chain.position(C)
    chain.layer_norm(chain.input, torch.ones(H * E, dtype=dtype), None)  # fixes the dtype
    chain.cache_write(chain.input, K, p)
    chain.cache_write(chain.input, V, p)
    chain.cache_attention(chain.input, K, V, start, end, bias, scale=scale)
    return chain, K, V


@pytest.mark.parametrize("grad", [False, True], ids=["compiled", "composed"])
def test_empty_ranges_and_masked_rows_give_zeros(grad, compiled_calls):
    bias = torch.zeros(2, 2, 6, dtype=torch.float64)
    bias[1, 0] = -math.inf  # head 1 of the first query of each batch element: masked
    chain, K, V = small_chain(bias=bias)
    x = torch.randn(4, 4, dtype=torch.float64)
    with torch.set_grad_enabled(grad):
        for start in range(5):  # an empty range at every position
            y, _ = chain(x, positions=[3, start, start])
            assert torch.equal(y, torch.zeros(4, 4, dtype=torch.float64))
        y, _ = chain(x, positions=[0, 0, 2])
    assert not y.isnan().any()
    assert torch.equal(y[0::2, 2:], torch.zeros(2, 2, dtype=torch.float64))  # masked rows
    want = plain_cache_attention(x.double(), K, V, 0, 2, bias, 0, 2**-0.5)
    assert_close("y", y, want, **TOLERANCES[torch.float64])
    assert compiled_calls == ([] if grad else [torch.float64] * 6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("grad", [False, True], ids=["compiled", "composed"])
def test_a_bias_per_batch_element(grad, dtype, compiled_calls):
    """A `(B, H, W, J)` bias: each batch element masks its own positions (a padded memory of
    lengths 7, 4 and 0; the last element's rows see nothing and give zeros), on both paths,
    and a bias of another batch size is refused when the op is added."""
    g = torch.Generator().manual_seed(5)
    B, H, E, C = 3, 2, 4, 7
    K, V = (torch.randn(B, H, C, E, generator=g, dtype=dtype) for _ in range(2))
    bias = torch.randn(B, H, 2, C + 1, generator=g, dtype=dtype)
    for b, length in enumerate((7, 4, 0)):
        bias[b, :, :, length + 1 :] = -math.inf  # columns from 1: position j at column j + 1

    def new_chain():
        chain = StepChain(H * E)
        chain.layer_norm(chain.input, torch.ones(H * E, dtype=dtype), None)  # fixes the dtype
        return chain, chain.position(C), chain.position(C), chain.position(C + 1)

    chain, start, end, column = new_chain()
    chain.cache_attention(chain.input, K, V, start, end, bias, column, scale=0.6)
    x = torch.randn(B * 2, H * E, generator=g, dtype=dtype)
    with torch.set_grad_enabled(grad):
        for positions in ([0, 7, 1], [2, 6, 3]):
            y, _ = chain(x, positions=positions)
            first, last, at = positions
            want = plain_cache_attention(dbl(x), dbl(K), dbl(V), first, last, dbl(bias), at, 0.6)
            assert_close(f"y {positions}", y.double(), want, **TOLERANCES[dtype])
            assert torch.equal(y[4:], torch.zeros_like(y[4:]))  # length 0: zeros, no NaN
    assert compiled_calls == ([] if grad else [dtype] * 2)
    other, start, end, column = new_chain()
    with pytest.raises(ValueError, match="bias") as info:
        other.cache_attention(other.input, K, V, start, end, bias[:2], column)
    assert "(3, 2" in str(info.value) and "(2, 2, 2, 8)" in str(info.value), str(info.value)


@pytest.mark.parametrize("W", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("grad", [False, True], ids=["compiled", "composed"])
def test_a_causal_bias_over_the_rows_just_written(W, dtype, grad, compiled_calls):
    # query w of a call at p sees the positions 0 .. p + w: the bias column of position j is
    # bias_start + j with bias_start = C - W - p, masked past column C - W + w
    B, H, E, C = 2, 2, 3, 9
    bias = torch.randn(H, W, C, dtype=dtype)
    for w in range(W):
        bias[:, w, C - W + w + 1 :] = -math.inf
    chain = StepChain(H * E)
    K, V = torch.zeros(B, H, C, E, dtype=dtype), torch.randn(B, H, C, E, dtype=dtype)
    p, zero, end, column = (chain.position(C) for _ in range(4))
    x_in = chain.linear(chain.input, torch.eye(H * E, dtype=dtype))
    chain.cache_write(x_in, K, p)
    chain.cache_attention(x_in, K, V, zero, end, bias, column)
    ref_K = K.double()
    with torch.set_grad_enabled(grad):
        for p in range(0, C - W + 1, W):
            x = torch.randn(B * W, H * E, dtype=dtype)
            y, _ = chain(x, positions=[p, 0, p + W, C - W - p])
            plain_write(ref_K, x.double(), p)
            # each query alone over the positions it may see, with no masked column in them
            want = torch.cat([
                plain_cache_attention(x[b * W + w : b * W + w + 1].double(), ref_K[b : b + 1],
                                      V[b : b + 1].double(), 0, p + w + 1,
                                      bias[:, w : w + 1].double(), C - W - p, E**-0.5)
                for b in range(B) for w in range(W)
            ])  # fmt: skip
            assert_close("y", y, want, **TOLERANCES[dtype])
    assert len(compiled_calls) == (0 if grad else len(range(0, C - W + 1, W)))


def test_gradcheck_through_layer_norm_weighted_sum_and_cache_attention():
    g = torch.Generator().manual_seed(0)
    H, E, C = 2, 2, 5

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    w, b, c = rand(4), rand(4), rand(3)
    K, V, bias = rand(2, H, C, E), rand(2, H, C, E), rand(H, 2, C + 2)
    chain = StepChain(4)
    start, end, column = chain.position(C), chain.position(C), chain.position(C + 2)
    ln = chain.layer_norm(chain.input, w, b)
    att = chain.cache_attention(ln, K, V, start, end, bias, column, scale=0.7)
    chain.weighted_sum([chain.input, ln, att], c)
    held = (w, b, c, K, V, bias)

    def run(x, *tensors):
        assert all(t is u for t, u in zip(tensors, held))  # perturbed in place by gradcheck
        return chain(x, positions=[1, 4, 2])[0]

    x = torch.randn(4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(run, (x, *held))
    y = run(x, *held)
    want_ln = plain_layer_norm(x, w, b, 1e-5)
    want = c[0] * x + c[1] * want_ln + c[2] * plain_cache_attention(
        want_ln, K, V, 1, 4, bias, 2, 0.7
    )  # fmt: skip
    assert_close("y", y, want, **TOLERANCES[torch.float64])


def error_chain(dtype=torch.float32):
    """x (R, 4) -> keys and values written at p (B 2, H 2, C 6); attention of x over
    ``start .. end - 1`` with a bias (2, 2, 7) from column ``bias_start``."""
    chain = StepChain(4)
    K, V = torch.zeros(2, 2, 6, 2, dtype=dtype), torch.zeros(2, 2, 6, 2, dtype=dtype)
    positions = [chain.position(6), chain.position(6), chain.position(6), chain.position(7)]
    kv = chain.linear(chain.input, torch.randn(8, 4, dtype=dtype))
    chain.cache_write(chain.columns(kv, 0, 4), K, positions[0])
    chain.cache_write(chain.columns(kv, 4, 8), V, positions[0])
    y = chain.cache_attention(chain.input, K, V, *positions[1:3], torch.zeros(2, 2, 7, dtype=dtype),
                              positions[3])  # fmt: skip
    chain.weighted_sum([y, chain.input], torch.ones(2, dtype=dtype))
    return chain, K, V


X4 = torch.randn(4, 4)
CALL_ERRORS = {  # id: (x, positions, exception, words of the message)
    "positions-length": (X4, [0, 0, 1], ValueError, ["positions", "4 ints", "3 positions"]),
    "positions-not-a-list": (X4, 3, ValueError, ["positions", "int"]),
    "position-float": (X4, [0, 1.0, 2, 0], ValueError, ["positions[1]", "0 to 6", "1.0"]),
    "position-bool": (X4, [0, 0, True, 0], ValueError, ["positions[2]", "True"]),
    "position-negative": (X4, [-1, 0, 1, 0], ValueError, ["positions[0]", "-1"]),
    "position-past-limit": (X4, [0, 0, 1, 8], ValueError, ["positions[3]", "0 to 7", "8"]),
    "rows-not-a-multiple": (torch.randn(3, 4), [0, 0, 1, 0], ValueError,
                            ["multiple of the cache's batch (2)", "3"]),
    "end-before-start": (X4, [0, 3, 1, 0], ValueError,
                         ["0 <= start <= end <= 6", "got 3 and 1"]),
    "bias-rows": (torch.randn(6, 4), [0, 0, 3, 0], ValueError,
                  ["cache attention: the bias", "must hold 3 rows", "3 columns from column 0"]),
    "bias-columns": (X4, [0, 0, 4, 4], ValueError,
                     ["cache attention: the bias", "must hold 2 rows", "4 columns from column 4"]),
    "write-past-the-cache": (X4, [5, 0, 1, 0], ValueError,
                             ["cache write", "2 positions from position 5", "(6 positions)"]),
}  # fmt: skip


@pytest.mark.parametrize("case", CALL_ERRORS)
@pytest.mark.parametrize("grad", [False, True], ids=["compiled", "composed"])
def test_bad_positions_and_rows_are_refused_and_leave_the_caches(case, grad, compiled_calls):
    x, positions, error, words = CALL_ERRORS[case]
    chain, K, V = error_chain()
    with torch.set_grad_enabled(grad):
        chain(X4, positions=[0, 0, 2, 1])
        before = K.clone(), V.clone()
        with pytest.raises(error) as info:
            chain(x * 2, positions=positions)
    for word in words:
        assert word in str(info.value), str(info.value)
    assert torch.equal(K, before[0]) and torch.equal(V, before[1])
    assert K.abs().sum() > 0  # the first call wrote


@pytest.mark.parametrize("grad", [False, True], ids=["compiled", "composed"])
def test_a_cache_made_to_require_grad_after_it_was_added(grad, compiled_calls):
    chain, K, _ = small_chain()
    K.requires_grad_()
    x = torch.randn(4, 4, dtype=torch.float64)
    with torch.set_grad_enabled(grad):
        if grad:  # autograd would refuse the in-place write: the chain says which tensor
            with pytest.raises(ValueError, match="cache must not require grad"):
                chain(x, positions=[0, 0, 2])
            assert not K.detach().any()
        else:  # written in place as under torch.no_grad
            chain(x, positions=[0, 0, 2])
            assert torch.equal(K[:, :, :2], x.view(2, 2, 2, 2).transpose(1, 2))
    assert len(compiled_calls) == (0 if grad else 1)


def other_position(chain, K, V, q):
    return chain.cache_attention(q, K, V, StepChain(4).position(3), chain.position(3))


F32, F64 = torch.float32, torch.float64
BUILD_ERRORS = {  # id: (what adds the op to a chain with (R, 4) value q, exception, words)
    "position-of-another-chain": (other_position, ValueError, ["start", "Position of this chain"]),
    "not-a-position": (lambda c, K, V, q: c.cache_attention(q, K, V, 0, c.position(3)),
                       ValueError, ["start", "Position of this chain", "0"]),
    "write-position": (lambda c, K, V, q: c.cache_write(q, K, 2), ValueError,
                       ["position", "Position of this chain"]),
    "bias-start": (lambda c, K, V, q: c.cache_attention(q, K, V, c.position(1), c.position(1),
                                                        torch.zeros(2, 2, 6), 1), ValueError,
                   ["bias_start", "Position of this chain"]),
    "end-beyond-C": (lambda c, K, V, q: c.cache_attention(q, K, V, c.position(6),
                                                          c.position(7)), ValueError,
                     ["end", "limit at most 6 (the cache length)", "7"]),
    "position-limit": (lambda c, K, V, q: c.position(-1), ValueError, ["limit", "-1"]),
    "cache-requires-grad": (lambda c, K, V, q: c.cache_write(q, K.requires_grad_(), c.position(4)),
                            ValueError, ["cache", "require grad"]),
    "values-shape": (lambda c, K, V, q: c.cache_attention(q, K, torch.zeros(2, 2, 5, 3),
                                                          c.position(1), c.position(1)),
                     ValueError, ["values", "(2, 2, 6, M)", "(2, 2, 5, 3)"]),
    "keys-shape": (lambda c, K, V, q: c.cache_attention(q, torch.zeros(2, 2, 6), V,
                                                        c.position(1), c.position(1)),
                   ValueError, ["keys", "(2, 2, 6)"]),
    "query-width": (lambda c, K, V, q: c.cache_attention(c.columns(q, 0, 3), K, V, c.position(1),
                                                         c.position(1)),
                    ValueError, ["query", "H E = 4", "3"]),
    "write-width": (lambda c, K, V, q: c.cache_write(c.columns(q, 0, 2), K, c.position(1)),
                    ValueError, ["x", "H E = 4", "2"]),
    "keys-dtype": (lambda c, K, V, q: c.cache_attention(q, K.double(), V, c.position(1),
                                                        c.position(1)),
                   TypeError, ["keys", "float64", "float32"]),
    "cache-device": (lambda c, K, V, q: c.cache_write(q, K.to("meta"), c.position(1)),
                     ValueError, ["cache", "meta", "cpu"]),
    "bias-dtype": (lambda c, K, V, q: c.cache_attention(q, K, V, c.position(1), c.position(1),
                                                        torch.zeros(2, 2, 6, dtype=F64)),
                   TypeError, ["bias", "float64"]),
    "bias-heads": (lambda c, K, V, q: c.cache_attention(q, K, V, c.position(1), c.position(1),
                                                        torch.zeros(3, 2, 6)),
                   ValueError, ["bias", "(3, 2, 6)"]),
    "coefficients-length": (lambda c, K, V, q: c.weighted_sum([q, q], torch.ones(3)),
                            ValueError, ["coefficients", "(2,)", "(3,)"]),
    "coefficients-dtype": (lambda c, K, V, q: c.weighted_sum([q], torch.ones(1, dtype=F64)),
                           TypeError, ["coefficients", "float64"]),
    "weighted-widths": (lambda c, K, V, q: c.weighted_sum([q, c.columns(q, 0, 3)], torch.ones(2)),
                        ValueError, ["values", "one width", "[3, 4]"]),
    "weighted-none": (lambda c, K, V, q: c.weighted_sum([], torch.ones(0)), ValueError,
                      ["values", "1 to 256", "0"]),
    "weighted-not-a-list": (lambda c, K, V, q: c.weighted_sum(q, torch.ones(1)), TypeError,
                            ["values", "list"]),
    "layer-norm-weight": (lambda c, K, V, q: c.layer_norm(q, torch.ones(3), None), ValueError,
                          ["weight", "(4,)", "(3,)"]),
    "first-op": (lambda c, K, V, q: StepChain(4).weighted_sum([q], torch.ones(1)), ValueError,
                 ["values[0]", "Slot of this chain"]),
    "first-op-held": (lambda c, K, V, q: (lambda s: s.cache_write(s.input, K, s.position(1)))(
        StepChain(4)), ValueError, ["cache_write", "first op must hold weights"]),
}  # fmt: skip


@pytest.mark.parametrize("case", BUILD_ERRORS)
def test_bad_cache_and_row_ops_are_refused_when_built(case):
    build, error, words = BUILD_ERRORS[case]
    chain, K, V = StepChain(4), torch.zeros(2, 2, 6, 2), torch.zeros(2, 2, 6, 2)
    q = chain.linear(chain.input, torch.randn(4, 4))
    with pytest.raises(error) as info:
        build(chain, K, V, q)
    for word in words:
        assert word in str(info.value), str(info.value)
    x = torch.randn(2, 4)
    with torch.no_grad():  # the chain as it was (and any positions made for the op)
        assert len(chain._ops) == 1
        assert chain(x, positions=[0] * len(chain._positions))[0].shape == (2, 4)


# programs for the binding (float32) over the bases x (2, 4), w (4,), b (4,), out (2, 4),
# coefficients (2,), keys (1, 1, 5, 4), values (1, 1, 5, 4) and bias (1, 2, 5):
# a layer norm: x, ldx, R, K, weight, bias, out
LN = [3, 0, 0, 4, 2, 4, 1, 0, 2, 0, 3, 0]
# a weighted sum c0 x + c1 keys[..., :2, :]: R, K, n, coefficients, (value, ld) n times, out
WS = [4, 2, 4, 2, 4, 0, 0, 0, 4, 5, 0, 4, 3, 0]
# cache attention of x (B 1, W 2, H 1, E 4) over positions indices[0] .. indices[1] - 1 with
# the bias from column indices[2]: q, ldq, R, k and its strides, v and its strides, bias, its
# strides (batch 0: shared) and size, out, B, H, E, M, C, start, end, bias column
CA = [5, 0, 0, 4, 2, 5, 0, 20, 20, 4, 1, 6, 0, 20, 20, 4, 7, 0, 0, 10, 5, 2, 5, 3, 0,
      1, 1, 4, 4, 5, 0, 1, 2]  # fmt: skip
# a write of x into keys at indices[0]: x, ldx, R, B, H, E, cache and its strides, C, position
CW = [6, 0, 0, 4, 2, 1, 1, 4, 5, 0, 20, 20, 4, 1, 5, 0]
BAD_PROGRAMS = {  # id: (program, scalars, indices, message)
    "layer-norm": (LN, [1e-5], [], "ok"),
    "weighted-sum": (WS, [0.0], [], "ok"),
    "cache-attention": (CA, [0.5], [1, 4, 0], "ok"),
    "cache-attention-empty": (CA, [0.5], [2, 2, 0], "ok"),
    "cache-write": (CW, [0.0], [2], "ok"),
    "write-then-attention": ([*CW, *CA], [0.0, 0.5], [2, 4, 0], "ok"),
    "position-index": (CA, [0.5], [1, 4], "op 0: position 2 outside the call's indices (2)"),
    "position-index-negative": ([*CW[:-1], -1], [0.0], [2], "op 0: position -1 outside"),
    "negative-index": (CW, [0.0], [-1], "indices[0] must be non-negative; got -1"),
    "end-beyond-C": (CA, [0.5], [1, 6, 0], "start and end must satisfy 0 <= start <= end <= 5"),
    "end-before-start": (CA, [0.5], [3, 1, 0], "start and end must satisfy 0 <= start <= end"),
    "bias-columns": (CA, [0.5], [1, 4, 3], "cache attention: the bias (2 rows, 5 columns)"),
    # column + (end - start) would overflow int64
    "bias-column-huge": (CA, [0.5], [1, 4, 2**63 - 1], "cache attention: the bias (2 rows"),
    "write-beyond-C": (CW, [0.0], [4], "cache write: 2 positions from position 4 outside the"),
    # position + rows would overflow int64
    "write-huge": (CW, [0.0], [2**63 - 1], "cache write: 2 positions from position 9223372"),
    "write-rows": ([*CW[:5], 3, *CW[6:]], [0.0], [0], "cache write: the rows (2) must be a"),
    "sum-of-none": ([*WS[:3], 0, *WS[4:]], [0.0], [], "op 0: a weighted sum must add 1 to 256"),
    "sum-of-300": ([*WS[:3], 300, *WS[4:]], [0.0], [], "op 0: a weighted sum must add 1 to 256"),
    "sum-past-the-end": ([*WS[:3], 3, *WS[4:]], [0.0], [], "program ends inside op 0: it needs 16"),
    "sum-without-count": (WS[:3], [0.0], [], "op 0: a weighted sum must add 1 to 256 values; got"),
    "layer-norm-truncated": (LN[:-1], [1e-5], [], "program ends inside op 0: it needs 11 fields"),
    "attention-truncated": (CA[:-2], [0.5], [1, 4, 0], "program ends inside op 0: it needs 32"),
    "write-truncated": ([*CW, *CW[:9]], [0.0, 0.0], [2], "program ends inside op 1: it needs 15"),
    "scale-nan": (CA, [math.nan], [1, 4, 0], "cache attention: scale must be finite"),
    "scale-inf": (CA, [-math.inf], [1, 4, 0], "cache attention: scale must be finite"),
    "negative-eps": (LN, [-1.0], [], "eps must be a finite non-negative number; got -1"),
    "rows-overlap": ([*LN[:3], 2, *LN[4:]], [1e-5], [], "layer norm: rows overlap"),
}  # fmt: skip
SUBPROCESS_CODE = """
import json, sys, torch
import torch.nn.functional as F
from attention_core import _C
g = torch.Generator().manual_seed(0)
x, w, b, c = (torch.randn(*s, generator=g) for s in ((2, 4), (4,), (4,), (2,)))
keys0, values = torch.randn(1, 1, 5, 4, generator=g), torch.randn(1, 1, 5, 4, generator=g)
bias = torch.randn(1, 2, 5, generator=g)

def attention(k, start, end, column):
    s = 0.5 * x @ k[0, 0, start:end].T + bias[0, :, column : column + end - start]
    return torch.softmax(s, -1) @ values[0, 0, start:end] if end > start else torch.zeros(2, 4)

for name, (program, scalars, indices, _) in json.loads(sys.argv[1]).items():
    keys, out = keys0.clone(), torch.full((2, 4), 7.0)  # an empty range writes zeros
    try:
        p = torch.tensor(program, dtype=torch.int64)
        bases = [t.data_ptr() for t in (x, w, b, out, c, keys, values, bias)]
        _C.step_chain_f32(p.data_ptr(), p.numel(), bases, scalars, indices, 1)
        written = keys0.clone()
        if program[0] == 6:
            written[0, 0, indices[0] : indices[0] + 2] = x
        want = {3: lambda: F.layer_norm(x, (4,), w, b, 1e-5),
                4: lambda: c[0] * x + c[1] * keys0.view(-1)[:8].view(2, 4),
                5: lambda: attention(keys0, *indices),
                6: lambda: attention(written, *indices) if len(program) > 16 else out}
        ok = torch.allclose(out, want[program[0]](), atol=1e-5) and torch.equal(keys, written)
        print(name, "ok" if ok else "wrong result", flush=True)
    except ValueError as e:
        print(name, f"ValueError: {e}", flush=True)
"""


@pytest.fixture(scope="module")
def bad_program_output(run_programs):
    return run_programs(SUBPROCESS_CODE, BAD_PROGRAMS)


@pytest.mark.parametrize("name", BAD_PROGRAMS)
def test_the_binding_refuses_bad_programs_of_the_new_kinds(bad_program_output, name):
    got, message = bad_program_output[name], BAD_PROGRAMS[name][3]
    assert got == message if message == "ok" else got.startswith("ValueError: " + message), got


@pytest.mark.parametrize("grad", [False, True], ids=["compiled", "composed"])
def test_a_held_cache_given_other_storage_is_read_and_a_resized_one_refused(grad, compiled_calls):
    bias = torch.randn(2, 2, 6, dtype=torch.float64)
    chain, K, V = small_chain(bias=bias, scale=0.5)
    x = torch.randn(4, 4, dtype=torch.float64)
    with torch.set_grad_enabled(grad):
        chain(x, positions=[0, 0, 2])
        K.data = torch.randn(2, 2, 6, 2, dtype=torch.float64)  # same shape, other storage
        V.data = torch.randn(2, 2, 6, 2, dtype=torch.float64)
        y, _ = chain(x, positions=[2, 0, 4])  # writes 2 .. 3 of the new storage, reads 0 .. 3
        assert torch.equal(K[:, :, 2:4], x.view(2, 2, 2, 2).transpose(1, 2))
        want = plain_cache_attention(x, K, V, 0, 4, bias, 0, 0.5)
        assert_close("y", y, want, **TOLERANCES[torch.float64])
        V.data = torch.zeros(2, 2, 7, 2, dtype=torch.float64)
        with pytest.raises(WeightChangedError, match=r"\(2, 2, 6, 2\).*\(2, 2, 7, 2\)"):
            chain(x, positions=[2, 0, 4])
    assert len(compiled_calls) == (0 if grad else 2)


def test_a_copy_has_its_own_positions_and_caches(compiled_calls):
    chain, K, V = small_chain()
    x = torch.randn(4, 4, dtype=torch.float64)
    twin = copy.deepcopy(chain)
    with torch.no_grad():
        y, _ = chain(x, positions=[1, 0, 3])
        y_twin, _ = twin(x, positions=[1, 0, 3])
    assert torch.equal(y, y_twin) and len(compiled_calls) == 2
    assert torch.equal(twin._ops[1].cache, K) and twin._ops[1].cache is not K
    start, own = chain._positions[1], twin.position(6)  # the copy's own, a 4th position
    with pytest.raises(ValueError, match="start must be a Position of this chain"):
        twin.cache_attention(twin.input, K, V, start, own)
    with pytest.raises(ValueError, match="position must be a Position of this chain"):
        twin.cache_write(twin.input, K, start)
    twin.cache_write(twin.input, twin._ops[1].cache, own)
    with torch.no_grad():
        twin(x, positions=[1, 0, 3, 4])
    assert torch.equal(twin._ops[1].cache[:, :, 4:6], x.view(2, 2, 2, 2).transpose(1, 2))
    assert not torch.equal(K[:, :, 4:6], x.view(2, 2, 2, 2).transpose(1, 2))
