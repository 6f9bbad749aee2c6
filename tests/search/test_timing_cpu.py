"""Timing headers name the CPU's vector extensions (the same model name covers CPUs with and without
AVX-512 BF16 and VNNI, whose INT8 and bf16 speeds differ)."""

import os

import pytest

from dsm_export.search.timing import cpu_flags, cpu_name, isa_words


def test_isa_words_name_what_decides_the_kernels():
    assert isa_words({"avx", "avx2", "fma"}) == "AVX2, no AVX-512"
    assert isa_words({"sse4_2"}) == "no AVX2"
    assert isa_words({"avx2", "avx512f", "avx512_vnni"}) == "AVX-512, VNNI"
    assert isa_words({"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"}) == \
        "AVX-512, VNNI, BF16, AMX"


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo") or not cpu_flags(), reason="no x86 /proc/cpuinfo flags")
def test_cpu_name_carries_this_machines_extensions():
    flags = cpu_flags()
    assert "sse2" in flags  # the real flags line of an x86 CPU was read
    name = cpu_name()
    assert name.endswith(f"({isa_words(flags)})") and not name.startswith("(")
