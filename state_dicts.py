"""Reading a weights file safely: every tensor of a .safetensors file or of a pickle.

Pickles are read with torch.load(weights_only=True), which unpickles tensors and plain containers
only: a pickle that would run code (os.system, a class constructor) is refused, and the refusal
names the callable. Every failure is a CheckpointError whose one-line message names the file and
the reason. weights.py (Stable Diffusion checkpoints), lora.py (LoRA files) and rewards.py (reward
weights) read through here, and `load_strict` fills a module with what was read, naming the
first missing, unexpected or mis-shaped key.
"""

import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


class CheckpointError(ValueError):
    """A weights file or folder that cannot be loaded; its one-line message names the file and the
    reason."""


def _reason(error: Exception) -> str:
    """The informative line of a torch.load / safetensors error (torch.load adds lines of
    boilerplate)."""
    boilerplate = ("Weights only load failed", "Check the doc", "Please file an issue")
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(boilerplate)] or [""]
    return f"{type(error).__name__}: {lines[-1]}"[:300]


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file, or of a pickle read with
    torch.load(weights_only=True)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a folder; expected a weights file ({', '.join(SUFFIXES)})"
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except Exception as error:  # safetensors has its own error types.
            raise CheckpointError(
                f"{path} is not a safetensors checkpoint ({_reason(error)})"
            ) from None
    if path.suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: unknown weights format; expected one of {', '.join(SUFFIXES)}"
        )
    # weights_only=True unpickles tensors and plain containers only, never arbitrary code.
    try:
        # The warnings are silenced so that the error is one line.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        code = re.search(r"GLOBAL (\S+)", str(error))
        # The pickle names a callable to run when unpickled (os.system, a class constructor, ...).
        if code:
            raise CheckpointError(
                f"{path}: refused: this pickle would run code ({code[1]}); pickled code, "
                "which is refused by torch.load(weights_only=True), never runs"
            ) from None
        raise CheckpointError(
            f"{path} cannot be read by torch.load(weights_only=True): corrupt or not a "
            f"PyTorch checkpoint ({_reason(error)})"
        ) from None
    if isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
        # Lightning .ckpt files (the original SD release) wrap the weights.
        content = content["state_dict"]
    content = content if isinstance(content, dict) else {}
    tensors = {key: value for key, value in content.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} is not a checkpoint: it holds no named tensors")
    return tensors


def load_strict(module: nn.Module, state_dict: dict, source: str) -> nn.Module:
    """load_state_dict(strict=True) naming `source` and the first bad key; a meta module takes the
    tensors."""
    expected = module.state_dict()
    name = type(module).__name__
    for kind, keys in (("missing", [k for k in expected if k not in state_dict]),
                       ("unexpected", [k for k in state_dict if k not in expected])):
        if keys:
            raise CheckpointError(
                f"{source}: {len(keys)} {kind} key(s) for {name}, first: '{keys[0]}'"
            )
    for key, tensor in expected.items():
        if state_dict[key].shape != tensor.shape:
            file_shape, model_shape = list(state_dict[key].shape), list(tensor.shape)
            raise CheckpointError(f"{source}: mis-shaped key '{key}' for {name}: "
                                  f"{file_shape} in the file, {model_shape} in the model")
    module.load_state_dict(
        state_dict, strict=True, assign=any(t.is_meta for t in expected.values())
    )
    return module
