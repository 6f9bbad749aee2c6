"""Serving: a Triton model repository for an engine (:mod:`.triton_repo`) and a live Triton server
on this machine through PyTriton (:mod:`.serve`), whose process lifecycle (signals, child
processes, the bounded shutdown) is :mod:`.lifecycle`."""
