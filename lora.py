"""LoRA (Hu et al., 2021, arXiv 2106.09685) on the UNet's attention projections,
diffusers/PEFT-compatible.

A frozen Linear W (out x in) gets a trainable low-rank update (LoRA Eq. 3):  h = W x + (alpha / r) *
B A x, A: r x in, B: out x r. As in diffusers' Diffusion-DPO script: B starts at zero, A is Gaussian
with std 1/r (PEFT's init_lora_weights="gaussian"); adapters go into to_q, to_k, to_v and to_out.0
of every attention; the reference eps_ref is the same UNet with adapters off (`lora_disabled`). The
switch is read when a layer runs: call backward outside `lora_disabled`, or gradient checkpointing
would recompute without LoRA.

Deviations / implementation notes:
  1. LoRALinear IS the nn.Linear it replaces (same weight/bias Parameters) plus lora_A, lora_B: base
     keys keep diffusers' names, adapter keys the PEFT names diffusers' `load_lora_weights` expects
     (`unet.` prefix).
  2. Saved files bake alpha/r into lora_B, so loaders assuming alpha == rank (diffusers without
     adapter metadata, ComfyUI) apply the right update; load_lora divides it out (exact for alpha/r
     a power of two).
  3. LoRA weights stay float32 (the diffusers script upcasts them); the update is cast to the
     layer's dtype.
  4. merge_lora folds B A into W in float32, rounded once to W's dtype (in bf16 a 1e-4 update loses
     much).
"""

from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from state_dicts import CheckpointError, read_state_dict

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class LoRALinear(nn.Linear):
    """W x + b + scale * B(A(x)); shares weight/bias with `base` (no copy)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        nn.Module.__init__(self)  # nn.Linear.__init__ would allocate a second weight.
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.scale = alpha / rank
        float32 = dict(bias=False, device=base.weight.device, dtype=torch.float32)  # Deviation 3.
        self.lora_A = nn.Linear(base.in_features, rank, **float32)
        self.lora_B = nn.Linear(rank, base.out_features, **float32)
        nn.init.normal_(self.lora_A.weight, std=1.0 / rank)
        nn.init.zeros_(self.lora_B.weight)  # A zero update: adapted == base.
        self.lora_enabled = True

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        if not self.lora_enabled:
            return out
        update = self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype)))  # LoRA Eq. 3.
        return out + (self.scale * update).to(out.dtype)


def _lora_modules(unet):
    return [(name, m) for name, m in unet.named_modules() if isinstance(m, LoRALinear)]


def inject_lora(unet: nn.Module, rank: int = 4, alpha: float | None = None):
    """Freeze `unet`, wrap the target Linears of every attention module; returns the new trainable
    params."""
    if _lora_modules(unet):
        raise ValueError("inject_lora: this UNet already has LoRA adapters")
    alpha = float(rank if alpha is None else alpha)
    unet.requires_grad_(False)
    attention_modules = [m for m in unet.modules() if hasattr(m, "to_q") and hasattr(m, "to_out")]
    params = []
    for attention in attention_modules:
        for target in TARGETS:
            wrapped = LoRALinear(attention.get_submodule(target), rank, alpha)
            attention.set_submodule(target, wrapped)  # "to_out.0" is a ModuleList index.
            params += [wrapped.lora_A.weight, wrapped.lora_B.weight]
    return params


@contextmanager
def lora_disabled(unet: nn.Module):
    """`with lora_disabled(unet): eps_ref = unet(...)` -- the base model is the DPO reference."""
    previous = [(m, m.lora_enabled) for _, m in _lora_modules(unet)]
    for module, _ in previous:
        module.lora_enabled = False
    try:
        yield unet
    finally:
        for module, enabled in previous:
            module.lora_enabled = enabled


def lora_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """{'unet.<module path>.lora_A.weight': [r, in], '...lora_B.weight': [out, r]}, alpha/r baked
    into B."""
    state = {}
    for name, module in _lora_modules(unet):
        state[f"unet.{name}.lora_A.weight"] = module.lora_A.weight.detach().float().contiguous()
        baked_B = module.scale * module.lora_B.weight.detach().float()  # Deviation 2.
        state[f"unet.{name}.lora_B.weight"] = baked_B.contiguous()
    return state


def save_lora(unet: nn.Module, path: str):
    save_file(lora_state_dict(unet), str(path), metadata={"format": "pt"})


def load_lora(unet: nn.Module, path_or_state_dict):
    """Load a lora_state_dict (or its file) into the UNet, injecting adapters of its rank if it has
    none. A mismatch raises CheckpointError, one line naming the file and the first bad key."""
    from_file = not isinstance(path_or_state_dict, dict)
    state = read_state_dict(path_or_state_dict) if from_file else path_or_state_dict
    source = str(path_or_state_dict) if from_file else "state dict"
    if not _lora_modules(unet):  # Adapters of the file's rank.
        ranks = {v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight")}
        if len(ranks) != 1:
            raise CheckpointError(
                f"{source}: not a LoRA file: expected one LoRA rank, found {sorted(ranks)}"
            )
        inject_lora(unet, rank=ranks.pop())
    modules = dict(_lora_modules(unet))
    expected = {f"unet.{name}.lora_{ab}.weight" for name in modules for ab in "AB"}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        first = f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}"
        raise CheckpointError(
            f"{source}: not a LoRA of this model: {first} ({len(missing)} missing, "
            f"{len(unexpected)} unexpected)"
        )
    with torch.no_grad():
        for name, module in modules.items():
            for ab, scale in (("A", 1.0), ("B", module.scale)):
                key = f"unet.{name}.lora_{ab}.weight"
                target = getattr(module, f"lora_{ab}").weight
                if state[key].shape != target.shape:
                    raise CheckpointError(
                        f"{source}: {key} has shape {tuple(state[key].shape)}, the model "
                        f"expects {tuple(target.shape)} (rank mismatch?)"
                    )
                # Undo the alpha/r baked in by lora_state_dict.
                target.copy_(state[key].float() / scale)


@torch.no_grad()
def merge_lora(unet: nn.Module) -> nn.Module:
    """W <- W + scale * B A, then replace each LoRALinear by a plain nn.Linear (deviation 4). In
    place."""
    for name, module in _lora_modules(unet):
        delta = module.scale * (module.lora_B.weight.float() @ module.lora_A.weight.float())
        # Deviation 4: rounded once to the weight's dtype.
        module.weight.copy_(module.weight.float() + delta)
        plain = nn.Linear(
            module.in_features, module.out_features, module.bias is not None, device="meta"
        )
        plain.weight = module.weight
        plain.bias = module.bias  # The same Parameters, no copy.
        unet.set_submodule(name, plain)
    return unet
