"""Command-line tools, each ``python -m gnlib.tools.<name>`` and a ``gnlib-<name>`` script.

``train_cli`` (one run, also under torchrun), ``sweep`` (papermill over a grid), ``report`` (the results
tables of a sweep into the docs), ``bench`` (curvature products against a gradient step), ``throughput``
(tokens/s and memory at the study's shape), ``gpu_check`` (the study's scale on a GPU in one capped run) and
``nbtools`` (stored notebooks kept stripped and checked).
"""
