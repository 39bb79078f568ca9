import os
import sys

import pytest
import torch

import moe_ext

# CI runs the suite against the installed wheel: make sure that is what was imported.
if os.environ.get("MOE_EXT_TEST_INSTALLED") == "1":
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert not os.path.abspath(moe_ext.__file__).startswith(here + os.sep), (
        f"tests imported moe_ext from the source tree ({moe_ext.__file__}), not the installed package")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def seed(request):
    """A fresh seed per test (printed on failure), unless MOE_EXT_SEED pins one."""
    s = int(os.environ.get("MOE_EXT_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(s)
    sys.stdout.write(f"[seed={s}] ")
    return s


@pytest.fixture
def group1(tmp_path):
    """The default process group as a gloo world of one rank in this process (FileStore in
    tmp_path); the cached nccl communicators are closed before it is destroyed."""
    import torch.distributed as dist

    from moe_ext import _nccl

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(tmp_path, "store"), 1), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        _nccl.close_all()
        dist.destroy_process_group()
