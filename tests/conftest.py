import logging
import os
import sys
from collections import Counter
from pathlib import Path

# One thread per test process (and per subprocess a test starts): tiny networks only pay for thread
# start-up, and on a shared 2-core machine oversubscription makes the suite several times slower.
for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from utils.core.logs import LOGGER_NAME  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs of the pipeline (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "float_sensitive: asserts on what trained networks compute; `make "
                            "test-float-paths` runs these under other thread counts and an older instruction set")


@pytest.fixture(autouse=True)
def project_logger_as_a_fresh_process_has_it():
    """After each test, the project's logger as a new process has it: a stage a test runs sets it up with a handler
    on that test's captured stdout (closed afterwards) and without propagation, which later tests in the same worker
    would inherit (logging errors on a closed stream, log lines in the output they parse, caplog seeing nothing)."""
    yield
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.NOTSET)
    logger.propagate = True


def pytest_collection_modifyitems(items):
    """Files with the most slow tests first. ``make test`` hands whole files to its pytest-xdist workers in this
    order (``--dist loadfile --no-loadscope-reorder``), so the longest file starts at once, not last on a worker."""
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path])  # stable: a file's tests keep their order


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory) -> Path:
    """A tiny synthetic BUPT/RFW set shared by the slow tests: <dir>/train and <dir>/rfw, 32x32 images."""
    from utils.data.synthetic import generate_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(out, ids_per_ethnicity=6, images_per_id=4, pairs_per_ethnicity=20, image_size=32, seed=0)
    return out
