"""Experiments: a run's settings and its training, the study's protocols, the study itself, probes that train.

Modules: ``protocols`` (the reference code's settings and gnlib's), ``history`` and ``run_folder`` (a run's
rows and files), ``train`` (the loop: any optimizer, a batch source, evaluation, early stop, checkpoint and
resume), ``runs`` (RunSpec -> data, model, optimizer -> History), ``lr_choice`` (LR tuning), ``study``
(warm-up, the batch-size study, critical batch size), ``method_comparison`` (ratios, gain shares),
``sweep_results`` (a sweep's results table, checked whole) and ``probes`` (direction probes along a run).
"""
