"""Shared fixtures: the real DeiT-Tiny weights and ImageNet photos from ``$DSM_SHARED`` (../shared)."""

import os
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("DSM_SHARED", os.path.join(ROOT, "..", "shared"))
WEIGHTS = os.path.join(SHARED, "models", "deit_tiny_patch16_224.pth")
IMAGES = os.path.join(SHARED, "data", "imagenet-sample")
DEIT = "deit_tiny_patch16_224"

# The schedule the README recommends for DeiT-Tiny at >= 1.7x fewer FLOPs.
DSM_17 = "r=34,r_end=0,delay=3,local=1"

warnings.filterwarnings("ignore", category=UserWarning, module=r"timm\..*")


def _need(path):
    """The shared file or folder; missing, it fails the test in CI (``CI`` set, as every CI service
    and ``.ci/run`` set it) so that a CI run without data is red, and skips elsewhere (a checkout
    without the shared folder can still run the data-free tests)."""
    if not os.path.exists(path):
        message = f"shared material not found at {path} (set DSM_SHARED)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def weights():
    return _need(WEIGHTS)


@pytest.fixture(scope="session")
def images_dir():
    return _need(IMAGES)


@pytest.fixture(scope="session")
def dsm_onnx(tmp_path_factory, weights):
    """DeiT-Tiny exported with :data:`DSM_17` (dynamic batch), shared by the serving tests."""
    from dsm_export.graph.export import export_onnx

    path = str(tmp_path_factory.mktemp("dsm_onnx") / "deit_dsm.onnx")
    export_onnx(DEIT, path, DSM_17, weights)
    return path


@pytest.fixture(scope="session")
def deit(weights):
    from dsm_export.core.models import create_model

    return create_model(DEIT, weights)


@pytest.fixture(scope="session")
def pixels(deit, images_dir):
    """The first 16 shared photos through DeiT-Tiny's eval transform: [16, 3, 224, 224]."""
    from dsm_export.data import list_images
    from dsm_export.check.evaluate import load_pixels

    return load_pixels(list_images(images_dir, limit=16), deit)


@pytest.fixture(scope="session")
def tensorrt():
    """The installed TensorRT (full TensorRT first, else TensorRT-RTX, which builds with no GPU).
    Missing, it fails the test in CI (``.ci/run`` installs the ``tensorrt-rtx`` extra) and skips elsewhere."""
    from trt_checks import installed_tensorrt

    trt = installed_tensorrt()
    if trt is None:
        pytest.skip("TensorRT is not installed: pip install -e '.[tensorrt-rtx]'")
    return trt


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance with 2 CPUs for a test module (dsm-export's Ray pipelines use it and leave
    it open), shut down after it: no idle Ray process stays beside the timing tests that follow. Missing, the ``ray`` extra fails the test in CI and skips elsewhere."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("the ray extra is not installed: pip install -e '.[ray]'")
        pytest.skip("the ray extra is not installed: pip install -e '.[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 2**20)
    yield ray
    ray.shutdown()


# ------------------------------------------------------------------ test tiers
# Fixtures (requested directly or through other fixtures) that mean a test needs the shared data, an
# engine toolkit or a server. A test with none of them and no explicit tier marker is ``fast``:
# ``pytest -m fast`` runs the pure logic (schedules, merge maths, FLOPs, choice rules, TensorRT
# settings) without data, in well under two minutes on 2 cores.
DATA_FIXTURES = {"weights", "images_dir", "dsm_onnx", "deit", "pixels"}
TIER_MARKERS = {"data", "server", "tensorrt", "openvino", "heavy", "ray"}
SERVER_MODULES = {"test_serving", "test_faults"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        names = set(item.fixturenames)
        if names & DATA_FIXTURES:
            item.add_marker(pytest.mark.data)
        if item.module.__name__.rsplit(".", 1)[-1] in SERVER_MODULES:
            item.add_marker(pytest.mark.server)
        if "tensorrt" in names:
            item.add_marker(pytest.mark.tensorrt)
        if "ray_local" in names:
            item.add_marker(pytest.mark.ray)
        if not {m.name for m in item.iter_markers()} & TIER_MARKERS:
            item.add_marker(pytest.mark.fast)
