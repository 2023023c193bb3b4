"""Experiments: a run's settings and its training, the study's protocols, the study itself, probes that train.

Modules: ``protocols`` (the reference code's settings and gnlib's), ``train`` (the loop: any optimizer, a
batch source, evaluation, early stop, History, checkpoint and resume), ``runs`` (RunSpec -> data, model,
optimizer -> History), ``study`` (warm-up, LR tuning, the batch-size study, critical batch size),
``sweep_results`` (a sweep's results table, checked whole) and ``probes`` (direction probes along a run).
"""
