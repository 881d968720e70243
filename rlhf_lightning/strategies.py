"""FSDP2 for transformers models: the strategy of ``conf/trainer/fsdp2*.yaml`` and the sharding
that the modules' ``configure_model`` applies.

:class:`FSDP2Strategy` is Lightning's ``ModelParallelStrategy`` with every rank in one
data-parallel group (``data_parallel_size`` = world size = ``num_nodes x devices``,
``tensor_parallel_size`` = 1): parameters, gradients and optimizer state are sharded over all
ranks, each rank trains on its own rows, and checkpoints are sharded (one file per rank plus
``meta.pt``, in a directory named like the usual ``.ckpt``). It runs on GPUs (NCCL) and on CPUs
(gloo, ``trainer=fsdp2_cpu``).

Sharding (``fully_shard``, applied bottom-up): every transformer block is one unit (one block's
full weights exist at a time in forward and backward), a ``PolicyWithValueHead``'s value head is
a unit of its own that always computes in float32, and the root takes the rest (embeddings, final
norm, LM head). A separate frozen reference is sharded the same way (its root reshards after
every forward, as it has no backward); a LoRA reference is the policy's own weights
(``AdaptersDisabled``) and needs nothing more.

Which task runs under which strategy (checked before any model loads, see ``tasks.ppo``):

- reward-model training: ddp family, fsdp2;
- PPO and its family: ddp family, fsdp2. Sampling needs full weights: :func:`gathered_weights`
  all-gathers them around ``generate`` (``rollout_gather=full``: every unit at once, held for the
  whole rollout: the full model in the all-gather dtype on every rank; ``per_layer``: the root
  unit held, each block gathered at every decoding step). The experience forwards and the update
  run sharded, one block gathered at a time.
"""

from __future__ import annotations

import os
import shutil
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

ROLLOUT_GATHER = ("full", "per_layer")


def is_transformer_block(module: nn.Module) -> bool:
    """A transformers decoder / encoder layer (they subclass ``GradientCheckpointingLayer``)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return isinstance(module, GradientCheckpointingLayer)


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 data parallelism over every rank of every node (no tensor parallelism).

    Args:
        rollout_gather: how PPO sampling gets full weights (:func:`gathered_weights`):
            ``full`` all-gathers every unit once per rollout and holds the full model for it;
            ``per_layer`` all-gathers one block at a time at every decoding step.
        kwargs: ``ModelParallelStrategy`` arguments (``save_distributed_checkpoint``,
            ``process_group_backend``, ``timeout``); the parallel sizes are set here.
    """

    def __init__(self, rollout_gather: str = "full", **kwargs) -> None:
        if rollout_gather not in ROLLOUT_GATHER:
            raise ValueError(
                f"rollout_gather must be one of {ROLLOUT_GATHER}, got {rollout_gather!r}"
            )
        super().__init__(data_parallel_size=1, tensor_parallel_size=1, **kwargs)
        self.rollout_gather = rollout_gather

    def mesh_shape(self) -> tuple[int, int]:
        """``(data_parallel_size, tensor_parallel_size)``: every process of every node in one
        data-parallel group, no tensor parallelism. Known once the Trainer has set
        ``num_nodes`` and the local devices."""
        return self.num_nodes * self.num_processes, 1

    def setup_environment(self) -> None:
        self._data_parallel_size, self._tensor_parallel_size = self.mesh_shape()
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        """A sharded checkpoint is written to a hidden directory beside ``filepath`` and renamed
        into place once every shard and ``meta.pt`` are written: a crash while saving leaves
        the previous checkpoint of that name intact (or, in the instant between two renames, no
        checkpoint of that name: ``ckpt_path=last`` then takes the newest other one)."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        staging = path.with_name(f".{path.name}.partial")
        if self.global_rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        self.barrier()
        super().save_checkpoint(checkpoint, staging, storage_options)
        self.barrier()
        if self.global_rank == 0:
            previous = path.with_name(f".{path.name}.previous")
            shutil.rmtree(previous, ignore_errors=True)
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir():
                os.replace(path, previous)
            os.replace(staging, path)
            shutil.rmtree(previous, ignore_errors=True)
        self.barrier()


def fsdp2_mixed_precision(precision: str):
    """The ``MixedPrecisionPolicy`` of a Trainer precision: ``bf16-mixed`` all-gathers and
    computes in bf16 and reduces gradients in fp32 (the sharded master weights stay fp32);
    otherwise parameters are used in their stored dtype."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def is_sharded(module) -> bool:
    """Whether ``fully_shard`` has been applied to ``module`` (an ``FSDPModule``)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard_transformer(model: nn.Module, mesh, mp_policy, frozen: bool = False) -> nn.Module:
    """``fully_shard`` every transformer block of ``model``, then ``model`` itself (the root
    unit: what no block holds, e.g. embeddings, final norm, LM head). In place; returns it.

    ``frozen``: the root reshards after every forward too. FSDP2 keeps a root's parameters
    gathered from its forward to its backward; a model without backward would hold them for
    good."""
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if is_transformer_block(module):
            fully_shard(module, mesh=mesh, mp_policy=mp_policy)
    root_reshard = True if frozen else None  # None: FSDP2's default, no reshard for a root
    return fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=root_reshard)


def shard_policy(policy: nn.Module, ref_lm, mesh, precision: str) -> None:
    """Shard a ``PolicyWithValueHead`` (LM, critic backbone, value head) and a separate frozen
    reference LM over ``mesh``. The value head is its own unit that keeps float32 parameters
    (its forward casts the hidden states to float32) whatever the precision."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp_policy = fsdp2_mixed_precision(precision)
    if policy.value_head is not None:
        fully_shard(policy.value_head, mesh=mesh, mp_policy=MixedPrecisionPolicy())
    for module in policy.modules():
        if is_transformer_block(module):
            fully_shard(module, mesh=mesh, mp_policy=mp_policy)
    fully_shard(policy, mesh=mesh, mp_policy=mp_policy)
    if isinstance(ref_lm, nn.Module):  # a separate copy (a LoRA reference is the policy itself)
        shard_transformer(ref_lm, mesh, mp_policy, frozen=True)


def shard_reward_model(model: nn.Module, mesh, precision: str) -> None:
    """Shard a ``ScalarRewardModel``: its backbone's blocks, its float32 head, then the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    fully_shard(model.head, mesh=mesh, mp_policy=MixedPrecisionPolicy())
    shard_transformer(model, mesh, fsdp2_mixed_precision(precision))


@contextmanager
def gathered_weights(root: nn.Module, every_unit: bool) -> Iterator[None]:
    """Inside the block, the submodules of a sharded ``root`` can be called on their own (e.g.
    ``policy.lm.generate``, a LoRA reference ``AdaptersDisabled(policy.lm)``), not only through
    ``root.forward``: the root unit's parameters are all-gathered and held.

    ``every_unit``: every block is all-gathered too, once, and held until the block ends (for
    ``generate``, which runs one forward per new token: no all-gathers per decoding step). This
    holds the full model on every rank for the block's duration, in the all-gather dtype.
    Otherwise each block is gathered per forward as in training. A no-op when ``root`` is not
    sharded.
    """
    if not is_sharded(root):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    # The root must be the first unit to initialise: FSDP2 makes whichever unit runs forward first
    # its root, and a block running first (inside lm.generate) would break the root's forward.
    root._get_fsdp_state()._lazy_init()
    blocks = [m for m in root.modules() if isinstance(m, FSDPModule) and m is not root]
    if root not in _UNSHARDED_ALLOCATED:
        # FSDP2 allocates a unit's unsharded parameters at its first all-gather and reuses them.
        # Allocated inside ``torch.inference_mode`` (generate), they would be inference tensors
        # that the all-gathers of training cannot write into: allocate them here, once.
        for unit in (root, *blocks):
            unit.unshard()
            unit.reshard()
        _UNSHARDED_ALLOCATED.add(root)
    held = [root, *blocks] if every_unit else [root]
    for unit in held[1:]:
        unit.set_reshard_after_forward(False, recurse=False)
    for unit in held:
        unit.unshard()
    try:
        yield
    finally:
        for unit in held:
            unit.reshard()
        for unit in held[1:]:
            unit.set_reshard_after_forward(True, recurse=False)


_UNSHARDED_ALLOCATED: weakref.WeakSet = weakref.WeakSet()


def gather_full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of a sharded ``module`` on CPU, on global rank 0 (an empty
    dict on the other ranks). A collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(module, options=options)


def global_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all ``grads`` together, over every rank's shard when they are sharded
    (``DTensor``): a 0-dim plain tensor, the same on every rank."""
    from torch.distributed.tensor import DTensor

    if not grads:
        return torch.zeros(())
    total = torch.nn.utils.get_total_norm(grads)
    return total.full_tensor() if isinstance(total, DTensor) else total
