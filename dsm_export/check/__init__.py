"""Checks of an engine or schedule against the unmerged model: parity and accuracy reports
(:mod:`.validate`), PyTorch-level scoring of schedules (:mod:`.evaluate`), per-block analysis
(:mod:`.analyze`), the report ``inspect`` prints (:mod:`.inspection`) and merge-group pictures
(:mod:`.visualize`). The metrics themselves are :mod:`dsm_export.metrics`."""
