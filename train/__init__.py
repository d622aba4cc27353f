"""Balancer and per-organ classifier fine-tuning under patient-grouped K-fold CV.

Modules, in pipeline order:

- :mod:`train.balancer`  ``Balancer``: each epoch's class-balanced real/synthetic sample list (defines r)
- :mod:`train.data`      in-memory resizing, batch-indexed datasets, windowing + augmentation on the device
- :mod:`train.model`     ``create_classifier(cfg)`` (timm), local ImageNet weights, ``load_classifier(dir)``
- :mod:`train.engine`    ``train_one_epoch`` / ``evaluate`` / ``train_fold`` on accelerate, resumable
- :mod:`train.run`       ``train_run(ws, cfg, ...)``: every organ and fold, the run folder contract
- :mod:`train.inference` ``load_fold_models``, ``predict_probs``, ``aggregate_patient``
- :mod:`train.cli`       ``toolkit train``
"""
