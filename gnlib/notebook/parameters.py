"""A notebook's parameters, checked before any work: declared, well typed, sensible values, a fresh folder.

:func:`check_notebook_parameters`: the values papermill injected are declared parameters of the notebook and
match their annotations; :meth:`NotebookParameters.output_folder` derives a default output folder from the
parameters that were changed, so runs never share one. :func:`check_notebook_values` checks the values of
the parameters the workbook's notebooks share by name (run before the folder is made, and by the sweep
before any kernel starts); :func:`notebook_output_dir` does all of it in the derived-values cell.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from gnlib.checks import Rule, check_fields, check_writable, integer, number
from gnlib.experiment.sweep_results import read_results_table
from gnlib.runtime import invalid, is_integer, output_path

#: Python types a notebook annotation allows (``float`` also takes an ``int``).
_ANNOTATION_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "str": (str,),
    "list": (list,),
    "dict": (dict,),
}
#: papermill's first line of the cell that holds the injected parameters (Python kernels).
INJECTED_MARKER = "# Parameters"
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")


@dataclass
class NotebookParameters:
    """The parameters a notebook declares and the ones papermill injected.

    Attributes:
        declared: name → (annotation text, default value) from the ``parameters`` cell.
        injected: names set by papermill's injected cell (empty when the notebook runs interactively).
        values: name → current value in the notebook's namespace.
    """

    declared: dict[str, tuple[str, Any]]
    injected: tuple[str, ...]
    values: dict[str, Any]

    def changed(self, ignore: tuple[str, ...] = ()) -> dict[str, Any]:
        """Parameters whose value differs from the declared default, in declaration order, minus ``ignore``."""
        return {
            name: self.values[name]
            for name, (_, default) in self.declared.items()
            if name not in ignore and self.values.get(name) != default
        }

    def output_folder(
        self, parameter: str = "output_dir", ignore: tuple[str, ...] = ("checkpoint_every", "overwrite", "threads")
    ) -> str:
        """The output folder: ``parameter``'s value when it was set, else its default plus what changed.

        Two runs with different parameters that change results (all but ``ignore`` and ``parameter``)
        get different default folders: ``outputs/00_quickstart`` for the defaults,
        ``outputs/00_quickstart/steps=300,seed=1`` with ``-p steps 300 -p seed 1``.
        """
        value = self.values[parameter]
        if parameter in self.injected or value != self.declared[parameter][1]:
            return value
        changed = self.changed(ignore=(*ignore, parameter))
        if not changed:
            return value
        text = ",".join(
            f"{k}={json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v}" for k, v in changed.items()
        )
        safe = _UNSAFE.sub("_", text)
        if safe != text or len(safe) > 96:
            digest = hashlib.sha1(json.dumps(changed, sort_keys=True, default=str).encode()).hexdigest()[:8]
            safe = f"{safe[:87]}~{digest}"
        return f"{value.rstrip('/')}/{safe}"


def _cells(namespace: Mapping[str, Any]) -> list[str]:
    """Sources of the cells this kernel executed, oldest first (IPython's ``In``); empty outside IPython."""
    history = namespace.get("In")
    return [cell for cell in history if isinstance(cell, str)] if isinstance(history, list) else []


def _declarations(source: str) -> dict[str, tuple[str, Any]] | None:
    """Map name → (annotation, default) when ``source`` consists of annotated assignments only, else None."""
    try:
        body = ast.parse(source).body
    except SyntaxError:
        return None
    if not body or not all(isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name) for s in body):
        return None
    declared = {}
    for statement in body:
        try:
            default = ast.literal_eval(statement.value) if statement.value is not None else None
        except ValueError:
            default = None
        declared[statement.target.id] = (ast.unparse(statement.annotation), default)
    return declared


def _assigned(source: str) -> tuple[str, ...]:
    """Names assigned at the top level of papermill's injected cell."""
    try:
        body = ast.parse(source).body
    except SyntaxError:
        return ()
    return tuple(t.id for s in body if isinstance(s, ast.Assign) for t in s.targets if isinstance(t, ast.Name))


def check_notebook_parameters(
    namespace: Mapping[str, Any], also_accept: Mapping[str, type | tuple[type, ...]] | None = None
) -> NotebookParameters:
    """Check a notebook's parameters from inside it: ``check_notebook_parameters(globals())``.

    Reads the cells the kernel executed (IPython's ``In``): the ``parameters`` cell (annotated
    assignments, ``name: type = default  # comment``) and papermill's injected cell (it starts with
    ``# Parameters``). Refuses injected names the notebook does not declare (papermill itself only
    warns) and values whose type does not match the annotation (``-p lr fast``, a string for a list).

    Args:
        namespace: the notebook's ``globals()``.
        also_accept: name → further types a parameter takes (e.g. ``{"optimizers": str}``: one name).

    Returns:
        The declared and injected parameters, with their current values.

    Raises:
        ValueError: an unknown parameter (naming the allowed ones) or a value of the wrong type.
    """
    declared: dict[str, tuple[str, Any]] = {}
    injected: list[str] = []
    for source in _cells(namespace):
        if source.lstrip().startswith(INJECTED_MARKER):
            injected.extend(_assigned(source))
        elif (found := _declarations(source)) is not None:
            declared.update(found)
    unknown = [name for name in dict.fromkeys(injected) if name not in declared]
    if unknown:
        raise ValueError(
            f"unknown notebook parameter(s) {unknown}; this notebook's parameters are {list(declared)} "
            "(papermill --help-notebook lists them with their types); check the spelling of -p NAME VALUE"
        )
    also_accept = dict(also_accept or {})
    for name, (annotation, default) in declared.items():
        value = namespace.get(name)
        allowed = _ANNOTATION_TYPES.get(annotation)
        if allowed is None:
            continue
        extra = also_accept.get(name, ())
        extra = extra if isinstance(extra, tuple) else (extra,)
        is_bool_for_number = isinstance(value, bool) and annotation != "bool"
        if not isinstance(value, allowed + extra) or (is_bool_for_number and bool not in extra):
            kinds = " or ".join(t.__name__ for t in allowed[-1:] + extra)
            raise invalid(
                "notebook parameter",
                name,
                value,
                f"a value of type {kinds} (declared `{name}: {annotation} = "
                f"{default!r}`; got a {type(value).__name__}), e.g. -p {name} {_example(default)}",
            )
    return NotebookParameters(
        declared=declared,
        injected=tuple(dict.fromkeys(injected)),
        values={name: namespace.get(name) for name in declared},
    )


def _example(default: Any) -> str:
    """How to pass ``default`` with papermill's ``-p`` (lists and dicts as YAML flow text)."""
    if isinstance(default, (list, dict)):
        return f"'{json.dumps(default)}'"
    return str(default)


def notebook_parameters(namespace: Mapping[str, Any]) -> dict[str, Any]:
    """Every parameter the notebook declares, with its value in this run, for its results: ``(globals())``.

    Read from the ``parameters`` cell (:func:`check_notebook_parameters`), so a results file records all
    of them, including ones added later, without a hand-written copy. Empty outside IPython (no cells).
    """
    return dict(check_notebook_parameters(namespace).values)


def _integer_or_list(low: int) -> Rule:
    """One integer ``>= low`` (not a bool) or a non-empty list of them."""
    return Rule(
        lambda v: bool(items := v if isinstance(v, list) else [v]) and all(is_integer(i) and i >= low for i in items),
        f"an integer >= {low}, or a non-empty list of them",
    )


#: Workbook parameters checked by name wherever a notebook declares them: name → rule.
NOTEBOOK_RULES: dict[str, Rule] = {
    **{name: integer(1) for name in ("steps", "max_steps", "batch_size", "seq_len", "warmup_steps", "data_epochs")},
    **{name: integer(0) for name in ("seed", "checkpoint_every", "eval_every", "val_batches", "warmup_batch_size")},
    "corpus_bytes": integer(0),
    "max_tokens": integer(0),
    "micro_batches": _integer_or_list(1),
    "seeds": _integer_or_list(0),
    "lr": number(0.0),
    "warmup_lr": number(0.0, strict=True),
    "target_loss": number(0.0, strict=True),
    "early_target": number(0.0),
}
#: What a workbook parameter belongs to, for messages (as the notebooks' own checks name it).
_OWNERS = {"warmup_batch_size": "the shared AdamW warm-up (0: batch_size)"}


def check_notebook_values(values: Mapping[str, Any]) -> None:
    """Check the values of a notebook's parameters by the workbook's names; builds, reads and writes nothing.

    Run by :func:`notebook_output_dir` before the output folder is made, and by :mod:`gnlib.tools.sweep` on every
    run of a grid before the first kernel starts. A notebook's parameters that are not named here pass:

    - optimizer names, LRs and options (:func:`gnlib.optim.registry.check_notebook_optimizers`);
    - step counts and sizes (``steps``, ``max_steps``, ``batch_size``, ``seq_len``, ...: integers ``>= 1``),
      seeds and periods (``seed``, ``eval_every``, ``corpus_bytes``, ...: ``>= 0``), ``micro_batches`` and
      ``seeds`` (one integer or a non-empty list), LRs and the target (``lr``, ``warmup_lr``, ``target_loss``);
    - ``preset`` (and ``seq_len`` within its ``max_seq_len`` under ``model_overrides``), ``data``,
      ``protocol``, ``costs``, ``tokenizer``, ``corpus`` (a ``text:`` glob must match two files or more);
    - ``sweep_results``, when given: the whole table (:func:`gnlib.experiment.sweep_results.read_results_table`);
      ``directions_results``, when given: an existing file.

    Raises:
        ValueError: naming the first bad parameter, its value and what is allowed.
    """
    from gnlib.optim.registry import check_notebook_optimizers  # optim sits above checks: imported on use

    check_notebook_optimizers(values)
    for name, rule in NOTEBOOK_RULES.items():
        if name in values:
            check_fields(_OWNERS.get(name, ""), {name: values[name]}, {name: rule})
    _check_named_choices(values)
    if values.get("sweep_results"):
        read_results_table(values["sweep_results"], parameter="sweep_results")
    if values.get("directions_results") and not Path(values["directions_results"]).is_file():
        written = "an existing results.csv written by notebook 05"
        raise invalid("notebook parameter", "directions_results", values["directions_results"], written)


def _check_named_choices(values: Mapping[str, Any]) -> None:
    """Check ``preset`` (``seq_len`` within its context), ``data``, ``protocol``, ``costs``, ``tokenizer``, corpus."""
    from gnlib.curvature.costs import COST_MODELS  # these modules sit above checks: imported on use
    from gnlib.data import check_corpus_source
    from gnlib.data.pipeline import DATA_KINDS
    from gnlib.data.tokenizers import check_tokenizer_name
    from gnlib.experiment.protocols import PROTOCOLS
    from gnlib.models import PRESETS, model_config
    from gnlib.runtime import check_choice

    for name, allowed in (("preset", PRESETS), ("data", DATA_KINDS), ("protocol", PROTOCOLS), ("costs", COST_MODELS)):
        if name in values:
            check_choice(name, values[name], allowed)
    if "preset" in values and "seq_len" in values:
        overrides = values.get("model_overrides")
        context = model_config(values["preset"], **(overrides if isinstance(overrides, dict) else {})).max_seq_len
        if values["seq_len"] > context:
            raise invalid(
                "notebook parameter",
                "seq_len",
                values["seq_len"],
                f"at most the {values['preset']} preset's "
                f"max_seq_len={context} (or raise max_seq_len in model_overrides)",
            )
    if "tokenizer" in values:
        check_tokenizer_name(values["tokenizer"])
    if "corpus" in values:
        check_corpus_source(values["corpus"])


def notebook_output_dir(
    namespace: Mapping[str, Any], also_accept: Mapping[str, type | tuple[type, ...]] | None = None
) -> Path:
    """Return the notebook's checked output folder, from the derived-values cell: ``out = ...(globals())``.

    Checks the parameters' types (:func:`check_notebook_parameters`) and the values of those that follow the
    workbook's names (:func:`check_notebook_values`: optimizers, sizes, preset, corpus, ...), derives the folder
    (:meth:`NotebookParameters.output_folder`: ``output_dir`` as given, or its default plus the changed
    parameters), resolves it like every notebook output (:func:`gnlib.runtime.output_path`) and checks that
    it can be written (:func:`check_writable`), all before any work starts; then creates it.
    """
    parameters = check_notebook_parameters(namespace, also_accept)
    check_notebook_values(parameters.values)
    # outside IPython (no cell history) the folder is output_dir as it stands
    folder = parameters.output_folder() if "output_dir" in parameters.declared else namespace["output_dir"]
    out = check_writable(output_path(folder))
    out.mkdir(parents=True, exist_ok=True)
    return out
