"""Loading official (microsoft/Cream) and timm (``efficientvit_m*``) checkpoints."""
import os
import re

import torch

from .model import MODEL_CONFIGS

__all__ = ["load_checkpoint", "timm_to_official"]


def _unwrap(checkpoint):
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict):
        raise TypeError(f"expected a path or a state dict, got {type(checkpoint).__name__}")
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError("checkpoint is not a state dict: expected {name: tensor} "
                         "(or {'model': state_dict} as the official checkpoints are saved)")
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


def timm_to_official(state_dict):
    """Renames the keys of a timm ``efficientvit_m*`` state dict to the official layout.

    timm: ``patch_embed.convJ.conv``, ``stages.S.downsample.{res1,patchmerge,res2}``,
    ``stages.S.blocks.B``, ``head.linear``; official: ``patch_embed.{0,2,4,6}.c``,
    ``blocks{S+1}.{0,1,2}``, ``blocks{S+1}.{B+3 if the stage subsamples else B}``, ``head.l``.
    """
    subsampling = {int(m.group(1)) for k in state_dict if (m := re.match(r"stages\.(\d+)\.downsample\.", k))}
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "patch_embed" and parts[1].startswith("conv"):
            parts[1] = str(2 * (int(parts[1][4:]) - 1))
        elif parts[0] == "stages":
            stage = int(parts[1])
            if parts[2] == "downsample":
                index = {"res1": 0, "patchmerge": 1, "res2": 2}[parts[3]]
            else:
                index = int(parts[3]) + (3 if stage in subsampling else 0)
            parts = [f"blocks{stage + 1}", str(index)] + parts[4:]
        parts = ["c" if p == "conv" else "l" if p == "linear" else p for p in parts]
        out[".".join(parts)] = value
    return out


def _is_timm_layout(state_dict):
    return any(k.startswith(("stages.", "patch_embed.conv1.")) for k in state_dict)


def _guess_config(state_dict):
    """Names the model size a state dict (official layout) was saved from, if it is one of M0-M5."""
    dims, depths, heads = [], [], []
    for stage in (1, 2, 3):
        blocks = {int(m.group(1)) for k in state_dict
                  if (m := re.match(rf"blocks{stage}\.(\d+)\.mixer\.", k))}
        qkvs = {int(m.group(1)) for k in state_dict
                if (m := re.match(rf"blocks{stage}\.\d+\.mixer\.m\.attn\.qkvs\.(\d+)\.", k))}
        dw = [v for k, v in state_dict.items() if re.match(rf"blocks{stage}\.\d+\.dw0\.m\.c\.weight$", k)]
        if not dw:
            return "an unknown model"
        dims.append(dw[0].shape[0])
        depths.append(len(blocks))
        heads.append(len(qkvs))
    config = dict(embed_dim=tuple(dims), depth=tuple(depths), num_heads=tuple(heads))
    for name, c in MODEL_CONFIGS.items():
        if all(c[k] == v for k, v in config.items()):
            return f"EfficientViT-{name.upper()}"
    return f"a model with {config}"


def _fit_error(model, state_dict, problem):
    own = _guess_config(model.state_dict())
    theirs = _guess_config(state_dict)
    hint = f" The checkpoint is for {theirs}, the model is {own}." if theirs != own else ""
    return ValueError(f"checkpoint does not fit the model: {problem}.{hint}")


def load_checkpoint(model, checkpoint, strict=True):
    """Loads an official or timm checkpoint into a ``python_ref`` EfficientViT.

    ``checkpoint``: a path to a ``.pth`` file or a state dict, in the official layout
    (``{'model': state_dict}`` as released, or the bare state dict) or in timm's
    ``efficientvit_m*`` layout. Raises ``ValueError`` naming the keys that are missing,
    unexpected or of the wrong shape. Returns ``model``.
    """
    state_dict = _unwrap(checkpoint)
    if _is_timm_layout(state_dict):
        state_dict = timm_to_official(state_dict)
    own = model.state_dict()
    for key, value in own.items():
        # timm does not save the attention bias index (a non-persistent buffer there)
        if key.endswith("attention_bias_idxs") and key not in state_dict:
            state_dict[key] = value
    for key, value in list(state_dict.items()):
        # the released checkpoints keep some 1x1 conv weights as 2-D matrices
        if key in own and value.dim() == 2 and own[key].dim() == 4 and own[key].shape[2:] == (1, 1):
            state_dict[key] = value[:, :, None, None]
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if strict and (missing or unexpected):
        problem = []
        if missing:
            problem.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            problem.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        raise _fit_error(model, state_dict, "; ".join(problem))
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state_dict.items()
             if k in own and v.shape != own[k].shape]
    if wrong:
        k, theirs, ours = wrong[0]
        raise _fit_error(model, state_dict, f"{len(wrong)} tensors have the wrong shape "
                         f"(e.g. {k}: checkpoint {theirs}, model {ours})")
    model.load_state_dict(state_dict, strict=strict)
    return model
