"""Masks: every representation and property, and their input validation."""

import pytest
import torch

from attention_core.masking import BaseMask, FullMask, LengthMask, TriangularCausalMask


def test_full_mask_from_sizes():
    mask = FullMask(3, 5)
    assert mask.shape == (3, 5)
    assert mask.all_ones
    assert mask.bool_matrix.dtype == torch.bool and mask.bool_matrix.all()
    assert torch.equal(mask.float_matrix, torch.ones(3, 5))
    assert torch.equal(mask.additive_matrix, torch.zeros(3, 5))
    assert not mask.lower_triangular
    assert FullMask(4).shape == (4, 4)
    assert FullMask(N=2, M=6).shape == (2, 6)


def test_full_mask_from_tensor():
    matrix = torch.tensor([[True, False, False], [True, True, False], [True, True, True]])
    mask = FullMask(matrix)
    assert not mask.all_ones
    assert mask.lower_triangular
    assert torch.equal(mask.lengths, torch.tensor([1, 2, 3]))
    additive = mask.additive_matrix
    assert torch.isinf(additive[0, 1]) and additive[0, 1] < 0 and additive[1, 0] == 0
    finite = mask.additive_matrix_finite
    assert torch.isfinite(finite).all() and finite[0, 1] <= -1e20 and finite[0, 0] == 0
    matrix[0, 1] = True  # the mask keeps its own copy
    assert not mask.bool_matrix[0, 1]


def test_lengths_of_non_length_mask_is_an_error():
    mask = FullMask(torch.tensor([[True, False, True]]))
    with pytest.raises(ValueError, match="not a length mask"):
        _ = mask.lengths
    assert not mask.lower_triangular


def test_length_mask():
    mask = LengthMask(torch.tensor([2, 4, 1]), max_len=5)
    assert mask.shape == (3, 5)
    assert not mask.all_ones
    expected = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(mask.bool_matrix, expected)
    assert torch.equal(mask.lengths, torch.tensor([2, 4, 1]))
    assert LengthMask(torch.tensor([3, 3])).all_ones
    assert LengthMask(torch.tensor([3, 2])).shape == (2, 3)


def test_triangular_causal_mask():
    mask = TriangularCausalMask(4)
    assert mask.lower_triangular
    assert mask.shape == (4, 4)
    assert torch.equal(mask.bool_matrix, torch.ones(4, 4, dtype=torch.bool).tril())
    assert not mask.all_ones
    assert TriangularCausalMask(1).all_ones


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: FullMask(torch.ones(2, 2)), ValueError, "bool tensor"),
        (lambda: FullMask(), ValueError, "size N"),
        (lambda: FullMask(-1), ValueError, "N must be a non-negative int"),
        (lambda: FullMask("3"), TypeError, "mask must be a bool tensor or an int"),
        (lambda: LengthMask([1, 2]), TypeError, "lengths must be a tensor"),
        (lambda: LengthMask(torch.tensor([[1, 2]])), ValueError, r"shape \(N,\); got \(1, 2\)"),
        (lambda: LengthMask(torch.tensor([1.0])), ValueError, "integers"),
        (lambda: LengthMask(torch.tensor([3, 5]), max_len=4), ValueError, r"\[0, max_len=4\]"),
        (lambda: LengthMask(torch.tensor([-1, 2])), ValueError, "got values in"),
        (lambda: TriangularCausalMask(0.5), ValueError, "N must be a non-negative int"),
    ],
    ids=[
        "full-float",
        "full-nothing",
        "full-negative",
        "full-string",
        "length-list",
        "length-2d",
        "length-float",
        "length-too-long",
        "length-negative",
        "causal-float",
    ],
)
def test_bad_masks(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_base_mask_is_abstract():
    with pytest.raises(NotImplementedError):
        _ = BaseMask().bool_matrix
