"""Every stage's output as a type with one writer and one reader.

=====================  =================================  ==========================
artifact               module                             written by / read by
=====================  =================================  ==========================
slice set (the store)  :mod:`toolkit.sliceset`            prepare / gen, train, eval
synthetic set          :mod:`toolkit.artifacts.synthetic` gen / train, eval
run folder             :mod:`toolkit.artifacts.run`       train / eval, predict, demo
comparison result      :mod:`toolkit.artifacts.comparison` compare / report
=====================  =================================  ==========================
"""
