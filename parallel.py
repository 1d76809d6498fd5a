"""
Sharded training with PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`): each of N ranks keeps 1/N of the
weights, their gradients and AdamW's two moments; a block's weights are all-gathered just before it runs and freed
after, its gradients reduce-scattered after its backward. train.py uses it under `--fsdp=True` (torchrun):

    torchrun --standalone --nproc_per_node=8 train.py config/train_small.py --fsdp=True

Three jobs, each a few calls of PyTorch's own API (FSDP2 and distributed checkpoints:
https://docs.pytorch.org/docs/stable/distributed.fsdp.fully_shard.html,
https://docs.pytorch.org/docs/stable/distributed.checkpoint.html):
  sharded_model  the model on the meta device, sharded, then each rank's shard filled from rank 0's full state dict
  full_state     the model's and optimizer's state gathered to rank 0's host memory, for the one ckpt.pt format
  load_optimizer that ckpt.pt's optimizer state spread back over the ranks
The expert biases are buffers: FSDP leaves them whole on every rank, and train.py moves them by the all-reduced
token counts exactly as under DDP (README, "Sharded training").
"""
import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from model import Model

FROM_RANK0 = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)  # rank 0 holds it, the rest get shards
TO_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on rank 0's host only


def sharded_model(cfg, state, device, param_dtype=None):
    """cfg's Model sharded over the process group: built on the meta device (no memory), fully_shard on every block
    (the MTP modules' blocks too), then on the whole model (embedding, head, norms, the MTP projections), then each
    rank's shard allocated on device and filled from state, the full state dict on rank 0 and {} on the others.
    So only rank 0 ever holds the whole model, and only on the host. param_dtype: the dtype the weights are
    all-gathered and computed in (bfloat16 on a GPU), the shards and the reduced gradients staying float32;
    None: float32 throughout."""
    with torch.device("meta"):
        model = Model(cfg)
    # cast_forward_inputs=False: a block's RoPE tables stay float32 (torch.complex has no bfloat16); its input x is
    # bfloat16 already, from the bfloat16 embedding
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    # an MTP module's norm is called outside its forward (by Model.mtp_losses): only its block is a unit of its own
    for block in list(model.layers) + [m.block for m in model.mtp]:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    model.to_empty(device=device)
    model.fill_buffers()  # the RoPE tables and token counts: no state dict holds them
    set_model_state_dict(model, state, options=FROM_RANK0)  # expert_bias included: a persistent buffer
    return model


def param_names(model, optimizer):
    """The optimizer's parameters' names, in the order optimizer.state_dict() numbers them."""
    name = {p: n for n, p in model.named_parameters()}
    return [name[p] for group in optimizer.param_groups for p in group["params"]]


def renamed(optimizer_state, key):
    """An optimizer state dict with its parameters renamed by key (names <-> numbers)."""
    return {"state": {key[k]: v for k, v in optimizer_state["state"].items()},
            "param_groups": [{**g, "params": [key[k] for k in g["params"]]} for g in optimizer_state["param_groups"]]}


def full_state(model, optimizer):
    """(model state dict, optimizer state dict), whole and on the host of rank 0, ({}, {}) on the others; a
    collective: every rank calls it. The optimizer's is in optimizer.state_dict()'s format (parameters by number,
    where get_optimizer_state_dict names them), so ckpt.pt is the same file however many ranks wrote it."""
    model_state = get_model_state_dict(model, options=TO_RANK0)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=TO_RANK0)
    if not optimizer_state:
        return model_state, {}
    return model_state, renamed(optimizer_state, {n: i for i, n in enumerate(param_names(model, optimizer))})


def load_optimizer(model, optimizer, state):
    """ckpt.pt's optimizer state (optimizer.state_dict()'s format) into the sharded optimizer: state on rank 0, {}
    on the others; each rank keeps its shard of the moments. A collective."""
    if state:
        state = renamed(state, dict(enumerate(param_names(model, optimizer))))
    set_optimizer_state_dict(model, optimizer, state, options=FROM_RANK0)
    for group in optimizer.param_groups:  # its broadcast turns the tuple betas into a list: back, as AdamW makes it
        group.update({k: tuple(v) for k, v in group.items() if k != "params" and isinstance(v, list)})
