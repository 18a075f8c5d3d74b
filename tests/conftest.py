import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory) -> Path:
    """A tiny synthetic BUPT/RFW set shared by the slow tests: <dir>/train and <dir>/rfw, 32x32 images."""
    from utils.synthetic import generate_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(out, ids_per_ethnicity=6, images_per_id=4, pairs_per_ethnicity=20, image_size=32, seed=0)
    return out



@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny networks: OpenMP threads only add overhead (a lot of it on a loaded 2-core CI box)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
