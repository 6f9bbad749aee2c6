"""Search for the schedule (and precision) to ship: the PyTorch schedule search at a FLOP target
(:mod:`.schedule_search`), schedule x precision timed in a runtime at a speed-up target
(:mod:`.engine_search`, :mod:`.runtimes`), the speed check (:mod:`.speed_check`), alternating
timing (:mod:`.timing`), and the whole tune pipeline (:mod:`.tuning`, :func:`dsm_export.tune`)."""
