"""DistributedDataParallel around a transformed model (gloo, one process)."""

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel

import fxrelay


def test_ddp_matches_single_process(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
        model = fxrelay.transform(torchvision.models.resnet18(num_classes=10), example_input=x[:1])
        twin = copy.deepcopy(model)
        ddp = DistributedDataParallel(model)
        F.cross_entropy(ddp(x), y).backward()
        F.cross_entropy(twin(x), y).backward()
        for (name, a), b in zip(model.named_parameters(), twin.parameters()):
            assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), name
    finally:
        dist.destroy_process_group()
