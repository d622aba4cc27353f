"""``toolkit study``: many runs planned together, so a claim about synthetic data can be trusted.

How the gain changes with the synthetic share (:mod:`study.plan`: arms over ratios, real-data
fractions, generator modes and backends), how much of it is retraining noise (several seeds per
arm, :mod:`study.stats`), and verdicts that stay honest over organs x arms (Holm,
:mod:`eval.multiplicity`), for the primary comparison declared before anything runs.

Modules: :mod:`study.plan` (arms, nested subsets, jobs, shards, layout), :mod:`study.run`
(running jobs), :mod:`study.stats` (intervals over seeds), :mod:`study.collect` (figures and
verdicts), :mod:`study.report` (curves and report), :mod:`study.cli`.
"""
