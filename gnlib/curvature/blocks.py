"""Parameter partitions and block views of curvature matrices.

A *partition* is an ordered ``dict[str, list[str]]`` mapping block names to parameter names; its blocks
are non-empty, pairwise disjoint and together cover every named parameter of the model (tied parameters
appear once, as in ``model.named_parameters()``). Layerwise Gauss-Newton uses a partition to keep only
the diagonal blocks G_bb of the GGN G; the views below measure what that discards.

Flat indices follow :mod:`gnlib.params` (the tensors in ``named_parameters()`` order, each row-major).
Within a block they are always taken in that order, whatever order the block lists its names in, so a
block of consecutive tensors is a contiguous slice of the full matrix. The transformer's blocks:
:func:`per_layer`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from gnlib.curvature.operators import LinearOperator
from gnlib.params import numel, offsets
from gnlib.runtime import check_choice

Partition = dict[str, list[str]]

PARTITION_SPECS = ["full", "per_layer", "per_layer_norm_with_last", "per_tensor", "halves"]
NORMALIZATIONS = ["none", "size", "diag"]

_LAYER = re.compile(r"blocks\.(\d+)\.")


def _like(model_or_params: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Named tensors of a model (``named_parameters()``, tied ones once) or of a params dict."""
    if isinstance(model_or_params, nn.Module):
        return dict(model_or_params.named_parameters())
    if isinstance(model_or_params, Mapping):
        return dict(model_or_params)
    raise ValueError(
        f"model_or_params must be an nn.Module or a dict of named tensors, got {type(model_or_params).__name__}"
    )


def per_tensor(model_or_params: nn.Module | Mapping[str, Tensor]) -> Partition:
    """One block per parameter tensor, named after the tensor."""
    return {name: [name] for name in _like(model_or_params)}


def _transformer_layout(
    names: list[str], norm_with_last: bool = False
) -> tuple[list[str], list[list[str]], list[str]] | None:
    """Split transformer parameter names into (embedding, per-layer lists, head), or None if not a transformer.

    The head holds ``norm.weight`` and ``head.weight``; when tied (no ``head.weight``) it is empty and
    ``norm.weight`` is appended to the last layer (see :func:`per_layer`), as it always is with
    ``norm_with_last``.

    Raises:
        ValueError: the names look like a transformer (``embed.weight`` and ``blocks.*``) but some
            parameter fits nowhere in the layout.
    """
    if "embed.weight" not in names or not any(_LAYER.match(name) for name in names):
        return None
    layers: dict[int, list[str]] = {}
    for name in names:
        match = _LAYER.match(name)
        if match:
            layers.setdefault(int(match.group(1)), []).append(name)
    layer_lists = [layers[i] for i in sorted(layers)]
    tied = "head.weight" not in names
    final = [name for name in ("norm.weight", "head.weight") if name in names]
    head = [] if tied else [name for name in final if not (norm_with_last and name == "norm.weight")]
    layer_lists[-1] = layer_lists[-1] + [name for name in final if name not in head]
    placed = {"embed.weight", *final, *(name for layer in layer_lists for name in layer)}
    stray = [name for name in names if name not in placed]
    if stray:
        raise ValueError(
            f"parameters {stray} do not fit the transformer layout (embed.weight, blocks.<i>.*, norm.weight, "
            "head.weight); use by_patterns to place them"
        )
    return ["embed.weight"], layer_lists, head


def _layer_groups(
    names: list[str], norm_with_last: bool = False
) -> tuple[list[str], list[tuple[str, list[str]]], list[str]]:
    """(embedding names, named layer groups, head names) for ``per_layer`` and ``coarse_halves``.

    Non-transformers have no embedding or head here: each layer group is the set of parameters owned
    by one module, i.e. the names sharing everything before the last ``.`` (``0.weight`` and ``0.bias``
    of an ``nn.Sequential`` form layer ``"0"``); a parameter of the root module is a group of its own.
    """
    layout = _transformer_layout(names, norm_with_last)
    if layout is not None:
        embed, layer_lists, head = layout
        return embed, [(f"block{i}", layer) for i, layer in enumerate(layer_lists)], head
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.rsplit(".", 1)[0], []).append(name)
    return [], list(groups.items()), []


def per_layer(model_or_params: nn.Module | Mapping[str, Tensor], norm_with_last: bool = False) -> Partition:
    """The study's layerwise partition: embedding, each transformer block, head.

    Transformer (parameter names fixed by :mod:`gnlib.models`): ``"embed"`` (``embed.weight``), ``"block0"``
    .. ``"block{L-1}"`` (every ``blocks.{i}.*`` parameter), ``"head"`` (the final ``norm.weight`` and
    ``head.weight``). With tied embeddings ``head.weight`` does not exist and ``embed.weight`` serves as both
    input embedding and output head: it forms one block ``"embed+head"``, and the final ``norm.weight``
    joins ``"block{L-1}"``, which is how the study groups the final norm in layerwise GN. Any other model:
    one block per module that owns parameters, named by the module's prefix (``"0"``, ``"2"`` for an
    ``nn.Sequential`` MLP).

    ``norm_with_last`` (``blocks="per_layer_norm_with_last"``): the final ``norm.weight`` joins
    ``"block{L-1}"`` whether tied or not, and ``"head"`` is ``head.weight`` alone: the reference's layerwise
    blocks (``wte``; each block; ``ln_f`` with the last block; ``lm_head``).

    Raises:
        ValueError: a transformer-named model holds a parameter outside the fixed layout.
    """
    names = list(_like(model_or_params))
    embed, layers, head = _layer_groups(names, norm_with_last)
    partition: Partition = {}
    if embed:
        partition["embed" if head else "embed+head"] = embed
    partition.update(layers)
    if head:
        partition["head"] = head
    return partition


def coarse_halves(model_or_params: nn.Module | Mapping[str, Tensor]) -> Partition:
    """Two blocks: ``"first_half"`` (embedding + first ⌈L/2⌉ layers) and ``"second_half"`` (the rest + head).

    Layers are the ``per_layer`` layer groups (transformer blocks, or modules of other models). With tied
    embeddings ``embed.weight`` goes with the first half and the final norm with the last layer.

    Raises:
        ValueError: the second half would be empty (a single layer and no separate head).
    """
    names = list(_like(model_or_params))
    embed, layers, head = _layer_groups(names)
    cut = math.ceil(len(layers) / 2)
    first = embed + [name for _, group in layers[:cut] for name in group]
    second = [name for _, group in layers[cut:] for name in group] + head
    if not second:
        raise ValueError(f"coarse_halves needs at least two layer groups to split, got {[g for g, _ in layers]}")
    return {"first_half": first, "second_half": second}


def by_patterns(model_or_params: nn.Module | Mapping[str, Tensor], patterns: Mapping[str, list[str]]) -> Partition:
    """Custom partition: a parameter joins the block one of whose regexes it matches (``re.search``).

    Blocks keep the order of ``patterns``; names within a block keep the flattening order. Anchor a
    pattern (``^...$``) to match whole names only.

    Args:
        model_or_params: model or params dict whose parameters are partitioned.
        patterns: block name → list of regular expressions.

    Raises:
        ValueError: an invalid regex, a parameter matched by no block or by several blocks, or a block
            that matches no parameter.
    """
    compiled: dict[str, list[re.Pattern[str]]] = {}
    for block, regexes in patterns.items():
        if isinstance(regexes, str):
            raise ValueError(f"patterns[{block!r}] must be a list of regexes, got the string {regexes!r}")
        try:
            compiled[block] = [re.compile(regex) for regex in regexes]
        except re.error as err:
            raise ValueError(f"patterns[{block!r}] holds an invalid regex: {err}") from err
    names = list(_like(model_or_params))
    partition: Partition = {block: [] for block in compiled}
    unmatched, doubly = [], {}
    for name in names:
        owners = [block for block, regexes in compiled.items() if any(r.search(name) for r in regexes)]
        if not owners:
            unmatched.append(name)
        elif len(owners) > 1:
            doubly[name] = owners
        else:
            partition[owners[0]].append(name)
    if unmatched:
        raise ValueError(f"parameters matched by no block pattern: {unmatched}")
    if doubly:
        raise ValueError(f"parameters matched by several blocks (name: blocks): {doubly}")
    validate_partition(partition, model_or_params)
    return partition


def validate_partition(partition: Mapping[str, list[str]], model_or_params: nn.Module | Mapping[str, Tensor]) -> None:
    """Check that ``partition`` has non-empty, disjoint blocks of known names covering every parameter.

    Raises:
        ValueError: naming the offending blocks or parameters (not a mapping, empty blocks, unknown
            names, names in several blocks, parameters in no block).
    """
    if not isinstance(partition, Mapping) or not partition:
        raise ValueError(f"partition must be a non-empty dict block name -> parameter names, got {partition!r}")
    names = list(_like(model_or_params))
    known = set(names)
    bad_values = [block for block, members in partition.items() if isinstance(members, str)]
    if bad_values:
        raise ValueError(f"blocks {bad_values} must map to lists of parameter names, not strings")
    empty = [block for block, members in partition.items() if len(members) == 0]
    if empty:
        raise ValueError(f"partition has empty blocks: {empty}")
    unknown = {block: [m for m in members if m not in known] for block, members in partition.items()}
    unknown = {block: members for block, members in unknown.items() if members}
    if unknown:
        raise ValueError(f"partition names unknown parameters (block: names): {unknown}; known: {names}")
    owners: dict[str, list[str]] = {}
    for block, members in partition.items():
        for member in members:
            owners.setdefault(member, []).append(block)
    overlaps = {name: blocks for name, blocks in owners.items() if len(blocks) > 1}
    if overlaps:
        raise ValueError(f"partition blocks overlap (name: blocks): {overlaps}")
    missing = [name for name in names if name not in owners]
    if missing:
        raise ValueError(f"partition misses parameters: {missing}")


def resolve_partition(
    spec: str | Mapping[str, list[str]] | None, model_or_params: nn.Module | Mapping[str, Tensor]
) -> Partition:
    """Turn a ``blocks`` option into a validated partition.

    Args:
        spec: ``None`` or ``"full"`` (one block ``"full"`` with every parameter), ``"per_layer"``,
            ``"per_layer_norm_with_last"`` (:func:`per_layer` with ``norm_with_last``),
            ``"per_tensor"``, ``"halves"`` (:func:`coarse_halves`), or a partition dict (validated, copied).
        model_or_params: model or params dict to partition.

    Raises:
        ValueError: unknown string (naming ``blocks`` and the allowed values) or an invalid partition.
    """
    if spec is None or isinstance(spec, str):
        spec = "full" if spec is None else spec
        check_choice("blocks", spec, PARTITION_SPECS)
        if spec == "full":
            return {"full": list(_like(model_or_params))}
        if spec == "per_layer_norm_with_last":
            return per_layer(model_or_params, norm_with_last=True)
        return {"per_layer": per_layer, "per_tensor": per_tensor, "halves": coarse_halves}[spec](model_or_params)
    if not isinstance(spec, Mapping):
        raise ValueError(f"blocks must be None, one of {PARTITION_SPECS} or a dict block -> names, got {spec!r}")
    validate_partition(spec, model_or_params)
    return {block: list(members) for block, members in spec.items()}


def block_indices(
    partition: Mapping[str, list[str]], params_like: nn.Module | Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Flat indices of each block (LongTensor, ascending, i.e. in flattening order) after validating."""
    like = _like(params_like)
    validate_partition(partition, like)
    slices = offsets(like)
    out = {}
    for block, members in partition.items():
        ranges = sorted((slices[m].start, slices[m].stop) for m in members)
        out[block] = torch.cat([torch.arange(start, stop) for start, stop in ranges])
    return out


def _block_ids(partition: Mapping[str, list[str]], like: dict[str, Tensor]) -> Tensor:
    """LongTensor (n,): position in ``partition`` of the block owning each flat index."""
    ids = torch.empty(numel(like), dtype=torch.long)
    for position, index in enumerate(block_indices(partition, like).values()):
        ids[index] = position
    return ids


def _check_matrix(matrix: Tensor, like: dict[str, Tensor]) -> None:
    n = numel(like)
    if matrix.shape != (n, n):
        raise ValueError(f"matrix has shape {tuple(matrix.shape)}, expected ({n}, {n}) to match the parameters")


def _check_block(block: str, partition: Mapping[str, list[str]], parameter: str) -> None:
    if block not in partition:
        raise ValueError(f"{parameter}={block!r} is not a block of the partition; available blocks: {list(partition)}")


def block_view(
    matrix: Tensor,
    partition: Mapping[str, list[str]],
    params_like: nn.Module | Mapping[str, Tensor],
    row_block: str,
    col_block: str,
) -> Tensor:
    """The block G_bc of a dense (n, n) matrix: rows of ``row_block``, columns of ``col_block``.

    Returns:
        Tensor (n_b, n_c), rows and columns in flattening order.

    Raises:
        ValueError: wrong matrix shape, invalid partition, or unknown block names (listing the blocks).
    """
    like = _like(params_like)
    _check_matrix(matrix, like)
    _check_block(row_block, partition, "row_block")
    _check_block(col_block, partition, "col_block")
    index = block_indices(partition, like)
    rows, cols = index[row_block].to(matrix.device), index[col_block].to(matrix.device)
    return matrix.index_select(0, rows).index_select(1, cols)


def block_norms(
    matrix: Tensor,
    partition: Mapping[str, list[str]],
    params_like: nn.Module | Mapping[str, Tensor],
    normalize: str = "none",
) -> Tensor:
    """Frobenius norms of every block pair, rows and columns in partition order.

    With ``normalize="none"`` entry (b, c) is ‖G_bc‖_F; ``"size"`` divides it by sqrt(n_b n_c) (the RMS
    entry of the block); ``"diag"`` divides it by sqrt(‖G_bb‖_F ‖G_cc‖_F), giving ones on the diagonal
    (nan where a diagonal block is zero).

    Returns:
        Tensor (n_blocks, n_blocks) in the matrix's dtype, on its device.
    """
    check_choice("normalize", normalize, NORMALIZATIONS)
    like = _like(params_like)
    _check_matrix(matrix, like)
    ids = _block_ids(partition, like).to(matrix.device)
    count = len(partition)
    squares = matrix.square()
    rows = torch.zeros(count, squares.shape[1], dtype=matrix.dtype, device=matrix.device).index_add_(0, ids, squares)
    norms = torch.zeros(count, count, dtype=matrix.dtype, device=matrix.device).index_add_(1, ids, rows).sqrt()
    if normalize == "size":
        sizes = torch.bincount(ids, minlength=count).to(matrix.dtype)
        norms = norms / torch.outer(sizes, sizes).sqrt()
    elif normalize == "diag":
        diag = norms.diagonal()
        norms = norms / torch.outer(diag, diag).sqrt()
    return norms


def _block_mask(partition: Mapping[str, list[str]], like: dict[str, Tensor], device: torch.device) -> Tensor:
    """Bool (n, n): True where row and column belong to the same block."""
    ids = _block_ids(partition, like).to(device)
    return ids[:, None] == ids[None, :]


def block_diagonal(
    matrix: Tensor, partition: Mapping[str, list[str]], params_like: nn.Module | Mapping[str, Tensor]
) -> Tensor:
    """blockdiag(G): the dense (n, n) matrix with every entry outside the diagonal blocks set to zero."""
    like = _like(params_like)
    _check_matrix(matrix, like)
    return matrix * _block_mask(partition, like, matrix.device)


def off_diagonal_share(
    matrix: Tensor, partition: Mapping[str, list[str]], params_like: nn.Module | Mapping[str, Tensor]
) -> float:
    """Share of the squared Frobenius norm outside the diagonal blocks: ‖G − blockdiag(G)‖_F² / ‖G‖_F².

    0 for a block-diagonal matrix, 1 when every diagonal block is zero.

    Raises:
        ValueError: the matrix is zero (the share is undefined).
    """
    like = _like(params_like)
    _check_matrix(matrix, like)
    total = matrix.square().sum()
    if total == 0:
        raise ValueError("matrix is zero; its off-diagonal share is undefined")
    outside = matrix.masked_fill(_block_mask(partition, like, matrix.device), 0).square().sum()
    return (outside / total).item()


class BlockDiagonalOperator(LinearOperator):
    """blockdiag(A) for an operator A, applied matrix-free: y = Σ_b P_b A P_b x.

    P_b zeroes every coordinate outside block b; one product costs one product of ``op`` per block (a
    whole (n, k) block of columns at once). Follows the operator protocol of
    :class:`gnlib.curvature.operators.LinearOperator`, with ``.like`` from ``params_like``; symmetric when ``op`` is
    (a dense ``op`` when it equals its transpose up to rounding).

    Args:
        op: operator (or dense (n, n) tensor) on the flat parameter space of ``params_like``.
        partition: blocks to keep (validated).
        params_like: model or params dict fixing names, shapes and flattening order.
    """

    def __init__(self, op: Any, partition: Mapping[str, list[str]], params_like: nn.Module | Mapping[str, Tensor]):
        """Validate shapes and the partition; precompute each block's flat indices on ``op``'s device."""
        like = {name: t.detach() for name, t in _like(params_like).items()}
        n = numel(like)
        if tuple(op.shape) != (n, n):
            raise ValueError(f"op has shape {tuple(op.shape)}, expected ({n}, {n}) to match the parameters")
        if isinstance(op, Tensor):
            symmetric = bool(torch.allclose(op, op.mT))
        else:
            symmetric = bool(getattr(op, "symmetric", False))
        super().__init__(n, op.dtype, op.device, symmetric=symmetric, like=like)
        self.op = op
        self.partition = {block: list(members) for block, members in partition.items()}
        self._indices = {block: index.to(op.device) for block, index in block_indices(partition, like).items()}

    @property
    def blocks(self) -> list[str]:
        """Block names in partition order."""
        return list(self.partition)

    def _matmat(self, x: Tensor) -> Tensor:
        """Σ_b P_b A P_b x for x of shape (n,) or (n, k)."""
        out = torch.zeros_like(x)
        for index in self._indices.values():
            restricted = torch.zeros_like(x).index_copy_(0, index, x.index_select(0, index))
            out.index_copy_(0, index, (self.op @ restricted).index_select(0, index))
        return out

    _matvec = _matmat
