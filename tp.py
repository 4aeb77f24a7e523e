"""Tensor parallel: one model over the processes torchrun starts, in the manner of gpt-fast's tp.py.

    torchrun --nproc-per-node N generate.py --ckpt DIR --prompt-file long.txt

Each process loads its share of every layer (model.load_model's rank and world: whole key-value heads with
the query heads that read them, a slice of the MLP's hidden units), and the partial sums meet in an all-reduce
after o_proj and down_proj (sum_over_processes) and after the unit scores of a lookup (each process scores
with its own heads). Every process does the same work on its share, so they all select the same units and take
the same tokens; only process 0 prints. This module joins and leaves the process group."""
import dataclasses
import gc
import math
import os

import torch


def join_processes(device_name=None) -> tuple[int, int, torch.device | None]:
    """Under torchrun (WORLD_SIZE > 1), join the other processes for tensor parallel: NCCL between GPUs
    (one per process), gloo on CPUs. Returns (rank, world size, this process's device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, None
    import torch.distributed as dist

    from reader import UsageError, pick_device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if device.type == "cuda":
        gpus = torch.cuda.device_count()
        if int(os.environ.get("LOCAL_WORLD_SIZE", world)) > gpus:
            raise UsageError(f"{world} processes need a GPU each, and this machine has {gpus}: "
                             f"use --nproc-per-node {gpus} or fewer")
        if not dist.is_nccl_available():
            raise UsageError("tensor parallel on GPUs needs NCCL, and this PyTorch build has none")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def leave_processes():
    """The end of a tensor-parallel run. The CUDA graphs that captured an all-reduce must be freed before
    the process group: NCCL waits for them when it destroys its communicator, and the process would hang
    (pytorch/pytorch#115388). The caller drops its references; collect() frees what only cycles hold."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gc.collect()
        torch.distributed.destroy_process_group()


def tensor_parallel(args, world: int):
    """One process's share of the model when it is split over world processes (Megatron-style): whole
    key-value heads, with the query heads that read them, and a slice of the MLP's hidden units."""
    from model import CheckpointError
    if world == 1:
        return args
    if args.n_kv_heads % world or args.ffn_dim % world:
        raise CheckpointError(f"this model has {args.n_kv_heads} key-value heads and {args.ffn_dim} MLP units, "
                              f"which {world} processes cannot share evenly: use a number of processes that divides "
                              f"{math.gcd(args.n_kv_heads, args.ffn_dim)}")
    return dataclasses.replace(args, n_heads=args.n_heads // world, n_kv_heads=args.n_kv_heads // world,
                               ffn_dim=args.ffn_dim // world, tp_size=world)


def sum_over_processes(x: torch.Tensor) -> torch.Tensor:
    """Tensor parallel: each process computed a partial sum (its heads' share of o_proj, its hidden units'
    share of down_proj); all of them get the whole sum."""
    torch.distributed.all_reduce(x)
    return x
