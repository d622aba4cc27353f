"""The data layer: the only code that touches DICOM or the store's files.

- :mod:`toolkit.data.phantom`  writes the built-in CT trauma phantom in the RSNA 2023 layout
- :mod:`toolkit.data.dicom`    reads one DICOM series into Hounsfield units, ordered along z
- :mod:`toolkit.data.prepare`  RSNA-layout folder -> slice store (labels, split, folds)
"""
