"""Partitions and block views, checked against slices of dense matrices (a real float64 GGN included)."""

import oracles
import pytest
import scipy.sparse.linalg
import torch

from gnlib import curvature
from gnlib.curvature import blocks, spectra
from gnlib.models import mlp
from gnlib.params import flatten, numel, offsets, params_of, unflatten

LAYER_NAMES = [
    "attn_norm.weight",
    "attn.wq.weight",
    "attn.wk.weight",
    "attn.wv.weight",
    "attn.wo.weight",
    "mlp_norm.weight",
    "mlp.w_gate.weight",
    "mlp.w_up.weight",
    "mlp.w_down.weight",
]


def random_symmetric(n: int, seed: int = 0) -> torch.Tensor:
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a + a.T


def flat_positions(names: list[str], like: dict) -> torch.Tensor:
    """Flat indices of ``names`` found through params.unflatten of arange(n), an oracle independent of blocks."""
    numbered = unflatten(torch.arange(numel(like)), like)
    ordered = [name for name in like if name in names]
    return torch.cat([numbered[name].reshape(-1) for name in ordered])


@pytest.fixture(scope="module")
def ggn_setup():
    """(model, params, G, batch): dense float64 GGN G = Jᵀ H_z J of token-mean cross-entropy, tied 2-layer model."""
    model = oracles.dense_transformer(tied=True)
    like = params_of(model)
    gen = torch.Generator().manual_seed(0)
    tokens, targets = torch.randint(0, 8, (2, 2, 5), generator=gen)
    ggn = oracles.dense_ggn(model, like, (tokens, targets), oracles.token_cross_entropy)
    return model, like, ggn, (tokens, targets)


@pytest.mark.parametrize("tied", [False, True])
def test_partitions_cover_and_are_disjoint(tied):
    model = oracles.dense_transformer(tied, n_layers=3)
    names = [name for name, _ in model.named_parameters()]
    for partition in (blocks.per_tensor(model), blocks.per_layer(model), blocks.coarse_halves(model)):
        members = [name for group in partition.values() for name in group]
        assert sorted(members) == sorted(names)
        assert len(members) == len(set(members))
        blocks.validate_partition(partition, model)


def test_per_layer_untied_matches_study_layout():
    model = oracles.dense_transformer(tied=False)
    expected = {
        "embed": ["embed.weight"],
        "block0": [f"blocks.0.{name}" for name in LAYER_NAMES],
        "block1": [f"blocks.1.{name}" for name in LAYER_NAMES],
        "head": ["norm.weight", "head.weight"],
    }
    assert blocks.per_layer(model) == expected
    assert list(blocks.per_layer(model)) == list(expected)


def test_per_layer_tied_merges_embedding_and_head_and_puts_final_norm_in_last_block():
    model = oracles.dense_transformer(tied=True)
    expected = {
        "embed+head": ["embed.weight"],
        "block0": [f"blocks.0.{name}" for name in LAYER_NAMES],
        "block1": [f"blocks.1.{name}" for name in LAYER_NAMES] + ["norm.weight"],
    }
    assert blocks.per_layer(model) == expected
    assert blocks.per_layer(params_of(model)) == expected


def test_per_layer_generic_model_groups_by_module():
    model = mlp([3, 5, 4, 2])
    assert blocks.per_layer(model) == {
        "0": ["0.weight", "0.bias"],
        "2": ["2.weight", "2.bias"],
        "4": ["4.weight", "4.bias"],
    }


def test_per_layer_rejects_stray_transformer_parameter():
    like = dict(params_of(oracles.dense_transformer(tied=False)), **{"extra.bias": torch.zeros(3)})
    with pytest.raises(ValueError, match="extra.bias"):
        blocks.per_layer(like)


def test_per_tensor_is_named_parameters():
    model = mlp([3, 4, 2])
    assert blocks.per_tensor(model) == {name: [name] for name, _ in model.named_parameters()}


@pytest.mark.parametrize("n_layers, first_layers", [(4, 2), (3, 2), (2, 1)])
@pytest.mark.parametrize("tied", [False, True])
def test_coarse_halves_splits_layers(n_layers, first_layers, tied):
    halves = blocks.coarse_halves(oracles.dense_transformer(tied, n_layers=n_layers))
    first_layer_names = [f"blocks.{i}.{name}" for i in range(first_layers) for name in LAYER_NAMES]
    assert halves["first_half"] == ["embed.weight"] + first_layer_names
    rest = [f"blocks.{i}.{name}" for i in range(first_layers, n_layers) for name in LAYER_NAMES]
    assert halves["second_half"] == rest + (["norm.weight"] if tied else ["norm.weight", "head.weight"])


def test_coarse_halves_generic_and_too_small():
    assert blocks.coarse_halves(mlp([3, 5, 4, 2])) == {
        "first_half": ["0.weight", "0.bias", "2.weight", "2.bias"],
        "second_half": ["4.weight", "4.bias"],
    }
    with pytest.raises(ValueError, match="at least two"):
        blocks.coarse_halves(mlp([3, 2]))


def test_by_patterns_builds_custom_blocks():
    model = oracles.dense_transformer(tied=False)
    partition = blocks.by_patterns(model, {"attention": [r"\.attn\."], "rest": [r"^embed", r"mlp", r"norm", r"^head"]})
    assert partition["attention"] == [f"blocks.{i}.attn.w{c}.weight" for i in range(2) for c in "qkvo"]
    assert len(partition["attention"]) + len(partition["rest"]) == len(list(model.parameters()))


@pytest.mark.parametrize(
    "patterns, message",
    [
        ({"a": [r"^0\."]}, r"no block pattern: \['2.weight', '2.bias'\]"),
        ({"a": [r"weight", r"^0\."], "b": [r"^2\."]}, r"several blocks.*'2.weight': \['a', 'b'\]"),
        ({"a": [r"."], "b": [r"^nothing$"]}, r"empty blocks: \['b'\]"),
        ({"a": [r"("]}, r"invalid regex"),
        ({"a": r"."}, r"list of regexes"),
    ],
)
def test_by_patterns_errors(patterns, message):
    with pytest.raises(ValueError, match=message):
        blocks.by_patterns(mlp([3, 4, 2]), patterns)


@pytest.mark.parametrize(
    "partition, message",
    [
        ({"a": ["0.weight", "0.bias", "2.weight", "2.bias", "9.weight"]}, r"unknown parameters.*9.weight"),
        ({"a": ["0.weight", "0.bias", "2.weight", "2.bias"], "b": []}, r"empty blocks: \['b'\]"),
        ({"a": ["0.weight", "0.bias", "2.weight"], "b": ["2.weight", "2.bias"]}, r"overlap.*'2.weight': \['a', 'b'\]"),
        ({"a": ["0.weight", "0.bias"], "b": ["2.weight"]}, r"misses parameters: \['2.bias'\]"),
        ({}, r"non-empty dict"),
        ({"a": "0.weight"}, r"not strings"),
    ],
)
def test_validate_partition_errors(partition, message):
    with pytest.raises(ValueError, match=message):
        blocks.validate_partition(partition, mlp([3, 4, 2]))


def test_resolve_partition():
    model = oracles.dense_transformer(tied=False)
    names = [name for name, _ in model.named_parameters()]
    assert blocks.resolve_partition(None, model) == {"full": names}
    assert blocks.resolve_partition("full", model) == {"full": names}
    assert blocks.resolve_partition("per_layer", model) == blocks.per_layer(model)
    assert blocks.resolve_partition("per_tensor", model) == blocks.per_tensor(model)
    assert blocks.resolve_partition("halves", model) == blocks.coarse_halves(model)
    custom = {"x": names[:3], "y": names[3:]}
    assert blocks.resolve_partition(custom, model) == custom
    allowed = r"'full', 'per_layer', 'per_layer_norm_with_last', 'per_tensor', 'halves'"
    with pytest.raises(ValueError, match=rf"blocks='layers'.*{allowed}"):
        blocks.resolve_partition("layers", model)
    with pytest.raises(ValueError, match="misses"):
        blocks.resolve_partition({"x": names[:3]}, model)
    with pytest.raises(ValueError, match="blocks must be"):
        blocks.resolve_partition(3, model)


def test_block_indices_follow_flattening_order():
    model = oracles.dense_transformer(tied=False)
    like = params_of(model)
    slices = offsets(like)
    reordered = {
        "late": ["head.weight", "embed.weight"],
        "rest": [n for n in like if n not in ("head.weight", "embed.weight")],
    }
    index = blocks.block_indices(reordered, model)
    embed, head = slices["embed.weight"], slices["head.weight"]
    assert torch.equal(
        index["late"], torch.cat([torch.arange(embed.start, embed.stop), torch.arange(head.start, head.stop)])
    )
    assert torch.equal(index["rest"], flat_positions(reordered["rest"], like))
    assert index["late"].dtype == torch.long


@pytest.mark.parametrize("tied", [False, True])
def test_block_views_equal_slices_of_full_matrix(tied):
    model = oracles.dense_transformer(tied)
    like = params_of(model)
    matrix = random_symmetric(numel(like))
    attention = {"attn": [r"\.attn\."], "other": [r"^(?!.*\.attn\.)"]}
    for partition in (blocks.per_tensor(model), blocks.per_layer(model), blocks.by_patterns(model, attention)):
        positions = {b: flat_positions(names, like) for b, names in partition.items()}
        for row, rows in positions.items():
            for col, cols in positions.items():
                view = blocks.block_view(matrix, partition, like, row, col)
                assert torch.equal(view, matrix[rows[:, None], cols[None, :]])


def test_block_view_of_contiguous_blocks_is_a_plain_slice(ggn_setup):
    model, like, ggn, _ = ggn_setup
    slices = offsets(like)
    partition = blocks.per_tensor(model)
    for row in ("embed.weight", "blocks.1.mlp.w_up.weight"):
        for col in ("blocks.0.attn.wq.weight", "norm.weight"):
            assert torch.equal(blocks.block_view(ggn, partition, like, row, col), ggn[slices[row], slices[col]])


def test_block_view_errors():
    model = mlp([3, 4, 2])
    partition = blocks.per_layer(model)
    with pytest.raises(ValueError, match=r"row_block='9'.*available blocks: \['0', '2'\]"):
        blocks.block_view(torch.zeros(26, 26), partition, model, "9", "0")
    with pytest.raises(ValueError, match=r"col_block='x'"):
        blocks.block_view(torch.zeros(26, 26), partition, model, "0", "x")
    with pytest.raises(ValueError, match=r"expected \(26, 26\)"):
        blocks.block_view(torch.zeros(25, 25), partition, model, "0", "0")


def test_block_norms_all_normalizations(ggn_setup):
    model, like, ggn, _ = ggn_setup
    partition = blocks.per_layer(model)
    names = list(partition)
    plain = blocks.block_norms(ggn, partition, like)
    sizes = {b: sum(like[name].numel() for name in partition[b]) for b in names}
    for i, row in enumerate(names):
        for j, col in enumerate(names):
            expected = torch.linalg.matrix_norm(blocks.block_view(ggn, partition, like, row, col))
            torch.testing.assert_close(plain[i, j], expected, rtol=1e-12, atol=0)
    size = blocks.block_norms(ggn, partition, like, normalize="size")
    expected_size = plain / torch.tensor(
        [[(sizes[r] * sizes[c]) ** 0.5 for c in names] for r in names], dtype=torch.float64
    )
    torch.testing.assert_close(size, expected_size, rtol=1e-12, atol=0)
    diag = blocks.block_norms(ggn, partition, like, normalize="diag")
    torch.testing.assert_close(diag.diagonal(), torch.ones(len(names), dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(diag[0, 1], plain[0, 1] / (plain[0, 0] * plain[1, 1]).sqrt(), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match=r"normalize='frobenius'.*'none', 'size', 'diag'"):
        blocks.block_norms(ggn, partition, like, normalize="frobenius")


def test_off_diagonal_share_by_hand():
    like = {"a": torch.zeros(2), "b": torch.zeros(1)}
    matrix = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 5.0], [3.0, 5.0, 6.0]], dtype=torch.float64)
    # entries outside the blocks {0, 1} and {2}: 3, 5 and their mirror images
    share = blocks.off_diagonal_share(matrix, blocks.per_tensor(like), like)
    assert share == pytest.approx((9 + 25 + 9 + 25) / (1 + 4 + 9 + 4 + 16 + 25 + 9 + 25 + 36), rel=1e-14)
    assert blocks.off_diagonal_share(matrix, {"all": ["a", "b"]}, like) == 0.0
    with pytest.raises(ValueError, match="zero"):
        blocks.off_diagonal_share(torch.zeros(3, 3), blocks.per_tensor(like), like)


def test_block_diagonal_is_masked_matrix_and_has_no_off_diagonal_share(ggn_setup):
    model, like, ggn, _ = ggn_setup
    partition = blocks.per_layer(model)
    expected = torch.zeros_like(ggn)
    for b in partition:
        index = flat_positions(partition[b], like)
        expected[index[:, None], index[None, :]] = ggn[index[:, None], index[None, :]]
    masked = blocks.block_diagonal(ggn, partition, like)
    assert torch.equal(masked, expected)
    assert blocks.off_diagonal_share(masked, partition, like) == 0.0
    share = blocks.off_diagonal_share(ggn, partition, like)
    assert share == pytest.approx(((ggn - expected).square().sum() / ggn.square().sum()).item(), rel=1e-12)
    assert 0 < share < 1


def test_block_diagonal_operator_on_every_basis_vector(ggn_setup):
    model, like, ggn, _ = ggn_setup
    partition = blocks.per_layer(model)
    op = blocks.BlockDiagonalOperator(ggn, partition, model)
    expected = blocks.block_diagonal(ggn, partition, like)
    n = ggn.shape[0]
    assert op.shape == (n, n) and op.dtype == torch.float64 and op.device == ggn.device
    assert op.blocks == list(partition)
    columns = torch.stack([op @ e for e in torch.eye(n, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(columns, expected, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(op @ torch.eye(n, dtype=torch.float64), expected, rtol=1e-12, atol=1e-15)
    v = unflatten(torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64), like)
    product = op @ v
    assert list(product) == list(like)
    torch.testing.assert_close(flatten(product), expected @ flatten(v), rtol=1e-12, atol=1e-15)


def test_block_diagonal_operator_composes_with_operators(ggn_setup):
    model, like, ggn, _ = ggn_setup
    inner = blocks.BlockDiagonalOperator(ggn, blocks.per_layer(model), like)
    finer = blocks.BlockDiagonalOperator(inner, blocks.per_tensor(model), like)
    expected = blocks.block_diagonal(ggn, blocks.per_tensor(model), like)
    x = torch.randn(ggn.shape[0], 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(finer @ x, expected @ x, rtol=1e-12, atol=1e-15)


def test_block_diagonal_operator_to_scipy_eigsh(ggn_setup):
    model, like, ggn, _ = ggn_setup
    partition = blocks.per_layer(model)
    op = blocks.BlockDiagonalOperator(ggn, partition, like).to_scipy()
    top = scipy.sparse.linalg.eigsh(op, k=4, which="LA", return_eigenvectors=False)
    exact = torch.linalg.eigvalsh(blocks.block_diagonal(ggn, partition, like))[-4:]
    torch.testing.assert_close(torch.tensor(sorted(top), dtype=torch.float64), exact, rtol=1e-8, atol=1e-12)


def test_block_diagonal_operator_errors():
    model = mlp([3, 4, 2])
    with pytest.raises(ValueError, match=r"expected \(26, 26\)"):
        blocks.BlockDiagonalOperator(torch.zeros(5, 5), blocks.per_layer(model), model)
    with pytest.raises(ValueError, match="misses"):
        blocks.BlockDiagonalOperator(torch.zeros(26, 26), {"0": ["0.weight"]}, model)
    op = blocks.BlockDiagonalOperator(torch.zeros(26, 26), blocks.per_layer(model), model)
    with pytest.raises(ValueError, match="x has shape"):
        op @ torch.zeros(25)


def test_block_diagonal_operator_and_lanczos_on_a_ggn_operator(ggn_setup):
    model, like, ggn, batch = ggn_setup
    partition = blocks.per_layer(model)
    op = curvature.GGNOperator(model, like, batch)
    x = torch.randn(ggn.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = blocks.block_diagonal(ggn, partition, like) @ x
    torch.testing.assert_close(blocks.BlockDiagonalOperator(op, partition, like) @ x, expected, rtol=1e-10, atol=1e-14)
    top, _ = spectra.lanczos(op, 1, n_iter=20)
    torch.testing.assert_close(top, torch.linalg.eigvalsh(ggn)[-1:], rtol=1e-8, atol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_per_layer_norm_with_last_puts_the_final_norm_in_the_last_block(tied):
    model = oracles.dense_transformer(tied=tied)
    plain, reference = blocks.per_layer(model), blocks.resolve_partition("per_layer_norm_with_last", model)
    last = [b for b in plain if b.startswith("block")][-1]
    assert list(reference) == list(plain)
    assert reference[last] == plain[last] + ([] if tied else ["norm.weight"])
    if not tied:
        assert plain["head"] == ["norm.weight", "head.weight"] and reference["head"] == ["head.weight"]
    blocks.validate_partition(reference, model)
