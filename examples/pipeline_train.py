"""Decoupled stage-parallel training (fxrelay.parallel.StageParallel), launched with torchrun.

    torchrun --nproc-per-node 2 examples/pipeline_train.py --model resnet10t --mode greedy
    torchrun --nproc-per-node 4 examples/pipeline_train.py --mode relay --replicas 2 --microbatches 4

Every rank builds the same model (same seed); rank ``d * K + k`` runs stage group ``k``
of pipeline replica ``d``. The ranks of a replica read the same batches (same sampler
seed), the replicas read disjoint shards. After training every rank gathers the whole
model and rank 0 reports the validation accuracy of the main head. Data: the generated
:class:`fxrelay.Shapes` images. On CPU use gloo (default); with one GPU per rank, NCCL.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

import fxrelay
from fxrelay.cli import load_model
from fxrelay.train.parallel import StageParallel
from fxrelay.train.loop import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--mode", default="greedy", choices=["greedy", "relay"])
    parser.add_argument("--window", type=int, default=2)
    parser.add_argument("--num-stages", type=int, default=None)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64, help="per replica")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--train-size", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--backend", default="gloo")
    args = parser.parse_args()

    dist.init_process_group(args.backend)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    if args.backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.manual_seed(0)
    base = load_model(args.model, num_classes=args.num_classes).train()
    example = torch.randn(1, 3, args.image_size, args.image_size)
    model = fxrelay.transform(base, args.mode, window=args.window, num_stages=args.num_stages, example_input=example)
    if args.backend == "nccl":
        model.cuda()
    parallel = StageParallel(model, lambda params: torch.optim.SGD(params, lr=args.lr, momentum=0.9,
                                                                   weight_decay=5e-4),
                             microbatches=args.microbatches, replicas=args.replicas)
    train = fxrelay.Shapes(args.train_size, args.image_size, args.num_classes, seed=0)
    sampler = DistributedSampler(train, num_replicas=args.replicas, rank=parallel.replica, seed=0)
    loader = DataLoader(train, batch_size=args.batch, sampler=sampler, drop_last=True)
    device = next(model.parameters()).device
    last = parallel.rank_in_pipeline == parallel.pipeline - 1
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        seconds = waiting = 0.0
        for x, y in loader:
            stats = parallel.step(x.float().to(device), y.to(device))
            seconds, waiting = seconds + stats.seconds, waiting + stats.waiting
        if last and parallel.replica == 0:
            losses = ", ".join(f"head {j} {v:.3f}" for j, v in stats.losses.items())
            print(f"epoch {epoch + 1}: last batch {losses}; this rank busy {1 - waiting / seconds:.0%}", flush=True)
    model = parallel.gather_model()
    if dist.get_rank() == 0:
        val = fxrelay.Shapes(512, args.image_size, args.num_classes, seed=1)
        accuracy = evaluate(model, DataLoader(val, batch_size=128), device)
        print(f"validation accuracy (main head): {accuracy:.1%}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
