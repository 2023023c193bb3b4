"""Interactive explorers for JupyterLab: ipywidgets controls over pure, tested functions.

An :class:`Explorer` is a row of controls above a figure. Every change of a control calls
``render(**values)``, a pure function from the controls' values to a matplotlib Figure (built from
:mod:`gnlib.curvature.blocks`, :mod:`gnlib.curvature.spectra`, :mod:`gnlib.notebook.plots`, ...), and shows it as a
PNG image drawn at the size it is shown (times ``pixel_ratio``, for sharp high-density screens), so the
explorer needs no plotting backend and no browser: tests set a control's ``value`` and look at
``explorer.figure``. A ``ValueError`` raised by ``render`` is shown as a message instead of breaking the
callback. Notebooks build explorers after their static figures; executed headlessly (papermill) the
widgets are created and rendered once, and nothing waits for a front end.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import ipywidgets as widgets
from matplotlib.figure import Figure
from torch import Tensor, nn

from gnlib.curvature.blocks import NORMALIZATIONS, block_norms, block_view
from gnlib.notebook.plots import heatmap, short_name, to_png


class Explorer(widgets.VBox):
    """Controls above a figure; the figure is ``render(**values)`` for the controls' current values.

    Attributes:
        controls: name → widget; ``values`` maps the same names to the widgets' values.
        figure: the last rendered Figure (None if the last render raised ``ValueError``).
        image: the ``ipywidgets.Image`` showing it.
        message: an ``ipywidgets.HTML`` holding the last render error ("" when none).
        renders: number of renders so far.

    Args:
        render: pure function of keyword arguments named like ``controls``, returning a Figure.
        controls: name → ipywidgets value widget (Dropdown, Checkbox, FloatLogSlider, ...).
        pixel_ratio: PNG pixels per displayed pixel; the image is shown at the figure's own size
            (``figsize · dpi`` pixels) and drawn at ``pixel_ratio`` times that.
    """

    def __init__(
        self, render: Callable[..., Figure], controls: Mapping[str, widgets.ValueWidget], *, pixel_ratio: int = 2
    ):
        """Lay out the controls, observe them, and render once."""
        if not controls:
            raise ValueError("controls must name at least one widget")
        self.render = render
        self.controls = dict(controls)
        self.pixel_ratio = pixel_ratio
        self.figure: Figure | None = None
        self.renders = 0
        self.image = widgets.Image(format="png")
        self.message = widgets.HTML()
        self._held = 0
        self._shown: dict[str, Any] | None = None
        super().__init__(
            [
                widgets.HBox(list(self.controls.values()), layout=widgets.Layout(flex_flow="row wrap")),
                self.message,
                self.image,
            ]
        )
        for control in self.controls.values():
            control.observe(self._changed, names="value")
        self.refresh()

    @property
    def values(self) -> dict[str, Any]:
        """Control name → current value."""
        return {name: control.value for name, control in self.controls.items()}

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Change several controls without a render per change; one render follows if the values changed."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
            self._changed({})

    def _changed(self, change: dict) -> None:
        """Observer of every control: render unless held or already showing these values."""
        if not self._held and self.values != self._shown:
            self.refresh()

    def refresh(self) -> Figure | None:
        """Render the current values and show the figure (or the ``ValueError`` message)."""
        self.renders += 1
        self._shown = self.values
        try:
            figure = self.render(**self._shown)
        except ValueError as err:
            self.figure = None
            self.message.value = f"<span style='color:#b00'>{html.escape(str(err))}</span>"
            return None
        self.figure = figure
        self.message.value = ""
        width, height = figure.get_size_inches() * figure.dpi
        self.image.width, self.image.height = str(math.ceil(width)), str(math.ceil(height))
        self.image.value = to_png(figure, figure.dpi * self.pixel_ratio)
        return figure


def curvature_view(
    matrix: Tensor,
    params_like: nn.Module | Mapping[str, Tensor],
    partition: Mapping[str, list[str]],
    *,
    normalize: str = "diag",
    log: bool = True,
    row_block: str | None = None,
    col_block: str | None = None,
    name: str = "G",
    title: str | None = None,
    degenerate: float = 1e-8,
) -> Figure:
    """Block norms of a dense curvature matrix beside the entries of one block pair.

    Left: ‖C_bc‖_F for every block pair (:func:`gnlib.curvature.blocks.block_norms` with ``normalize``), the
    pair (``row_block``, ``col_block``) outlined. Right: |C_bc| entry by entry
    (:func:`gnlib.curvature.blocks.block_view`). Blocks are labelled by :func:`gnlib.notebook.plots.short_name`.

    With ``normalize="diag"`` an entry is ‖C_bc‖ / sqrt(‖C_bb‖ ‖C_cc‖), meaningless when a diagonal
    block is zero up to rounding (H − G on blocks where the model is linear): the rows and columns of
    blocks with ‖C_bb‖ ≤ ``degenerate`` · max_b ‖C_bb‖ are hatched and named in the legend instead.

    Args:
        matrix: (n, n) dense matrix in the flat order of ``params_like``.
        params_like: model or params dict.
        partition: blocks (e.g. ``per_layer`` or ``per_tensor``).
        normalize: ``"none"``, ``"size"`` or ``"diag"``.
        log: logarithmic colour scales.
        row_block: row block of the pair to show (default: the first block).
        col_block: column block of the pair (default: the first block).
        name: symbol of the matrix in the panel titles (``G``, ``H``, ``H − G``).
        title: figure title.
        degenerate: relative size below which a diagonal block counts as zero for ``normalize="diag"``.

    Raises:
        ValueError: bad ``normalize``, unknown block names, or a matrix that does not match.
    """
    blocks = list(partition)
    row_block = blocks[0] if row_block is None else row_block
    col_block = blocks[0] if col_block is None else col_block
    pair = block_view(matrix, partition, params_like, row_block, col_block).abs()
    norms = block_norms(matrix, partition, params_like, normalize)
    symbol = f"({name})" if " " in name else name  # ‖(H − G)_bc‖, not ‖H − G_bc‖
    missing = "undefined (nan)"
    if normalize == "diag":
        diagonal = block_norms(matrix, partition, params_like).diagonal()
        zero = diagonal <= degenerate * diagonal.max()
        norms[zero, :] = norms[:, zero] = float("nan")
        if zero.any():
            names = ", ".join(short_name(b) for b, z in zip(blocks, zero.tolist()) if z)
            missing = f"not normalizable: ‖{symbol}_bb‖ ≈ 0 for {names}"
    left = f"‖{symbol}_bc‖ (normalize={normalize})"
    right = f"|{symbol}[{short_name(row_block)}, {short_name(col_block)}]|"
    return heatmap(
        {left: norms, right: pair},
        {left: [short_name(b) for b in blocks], right: None},
        log=log,
        shared_scale=False,
        annotate=False if len(blocks) > 12 else None,
        highlight={left: (blocks.index(row_block), blocks.index(col_block))},
        title=title,
        missing_label=missing,
    )


SYMBOLS = {"GGN": "G", "Hessian": "H", "H - G": "H − G"}  # matrix names of the explorer → symbols in titles


def _labelled(blocks: list[str]) -> list[tuple[str, str]]:
    """Dropdown options: (short label, block name) pairs."""
    return [(short_name(b), b) for b in blocks]


def curvature_explorer(
    matrices: Mapping[str, Mapping[str, Tensor]],
    params_like: nn.Module | Mapping[str, Tensor],
    partitions: Mapping[str, Mapping[str, list[str]]],
    *,
    normalize: str = "diag",
    log: bool = True,
) -> Explorer:
    """Explore dense curvature matrices across checkpoints: :func:`curvature_view` under controls.

    Controls: ``checkpoint`` and ``matrix`` (the keys of ``matrices`` and of its values, e.g.
    ``{"step 0": {"GGN": G, "Hessian": H, "H - G": H - G}}``), ``partition`` (keys of ``partitions``),
    ``normalize``, ``log`` and the block pair ``row_block``/``col_block``, whose options follow the
    partition.

    Raises:
        ValueError: empty ``matrices`` or ``partitions``, or checkpoints with different matrix names.
    """
    if not matrices or not partitions:
        raise ValueError("matrices and partitions must each name at least one entry")
    kinds = list(next(iter(matrices.values())))
    uneven = [c for c, m in matrices.items() if list(m) != kinds]
    if uneven:
        raise ValueError(f"checkpoints {uneven} do not hold the matrices {kinds} of the first one")
    first = list(next(iter(partitions.values())))
    controls = {
        "checkpoint": widgets.Dropdown(options=list(matrices), description="checkpoint"),
        "matrix": widgets.Dropdown(options=kinds, description="matrix"),
        "partition": widgets.Dropdown(options=list(partitions), description="partition"),
        "normalize": widgets.Dropdown(options=NORMALIZATIONS, value=normalize, description="normalize"),
        "log": widgets.Checkbox(value=log, description="log scale"),
        "row_block": widgets.Dropdown(options=_labelled(first), description="row block"),
        "col_block": widgets.Dropdown(options=_labelled(first), description="col block"),
    }

    def follow_partition(change: dict) -> None:
        names = list(partitions[change["new"]])
        with explorer.hold():
            for key in ("row_block", "col_block"):
                controls[key].options = _labelled(names)
                controls[key].value = names[0]

    controls["partition"].observe(follow_partition, names="value")

    def render(
        checkpoint: str, matrix: str, partition: str, normalize: str, log: bool, row_block: str, col_block: str
    ) -> Figure:
        return curvature_view(
            matrices[checkpoint][matrix],
            params_like,
            partitions[partition],
            normalize=normalize,
            log=log,
            row_block=row_block,
            col_block=col_block,
            name=SYMBOLS.get(matrix, matrix),
            title=f"{matrix} at {checkpoint}, {partition} blocks",
        )

    explorer = Explorer(render, controls)
    return explorer
