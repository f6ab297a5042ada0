"""`pigg` for torchrun with FSDP on CPU processes, for tests: accelerate applies FSDP only on
accelerators (it treats multi-CPU runs as DDP), while FSDP2 itself runs on gloo.

    CUDA_VISIBLE_DEVICES= python -m torch.distributed.run --standalone --nproc-per-node 2 tests/fsdp_on_cpu.py train ...
"""
import sys

from accelerate.state import DistributedType, PartialState

_init = PartialState.__init__


def _init_as_accelerator(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.MULTI_GPU


PartialState.__init__ = _init_as_accelerator

if __name__ == "__main__":
    from pigg.cli import main

    sys.exit(main())
