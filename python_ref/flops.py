"""Parameter and multiply-add counts, as the paper reports them (Table 2)."""
import torch

__all__ = ["count_params", "count_macs"]


def count_params(model):
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model, resolution=224, in_chans=3):
    """Multiply-adds of one forward at ``resolution``^2: convs, linears and attention matmuls."""
    from torch.utils.flop_counter import FlopCounterMode  # imports triton: seconds, only here
    p = next(model.parameters())
    x = torch.zeros(1, in_chans, resolution, resolution, dtype=p.dtype, device=p.device)
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // 2
