"""Checkpoints for train.py: one safetensors file (no pickles), written atomically, with what a bit-exact
resume needs: the trainable weights, the AdamW state, the fp16 loss scale and the step. No RNG state: every
random draw is a pure function of (seed, stream position), and the data position is step * grad_accum.
Exports: LoRA -> lora.safetensors (PEFT names, diffusers' load_lora_weights reads it); full fine-tune -> a
diffusers UNet folder (config.json + safetensors).
"""

import dataclasses
import glob
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lora


class CheckpointMismatch(ValueError):
    """The checkpoint does not fit the model being resumed; the message names the first bad key."""


def write_atomically(tensors: dict, metadata: dict, path: str):
    """Write a temporary file, fsync it, rename it to path: a crash leaves the old file or the new one."""
    temporary = f"{path}.tmp{os.getpid()}"  # per process: toy_reward.py's cache may be written by several
    try:
        save_file(tensors, temporary, metadata=metadata)
        with open(temporary, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)  # atomic on POSIX and Windows
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def trainable(unet) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in unet.named_parameters() if p.requires_grad}


def save(cfg, unet, optimizer, scaler, step: int):
    """Write out_dir/ckpt_<step>.safetensors (keeping the last keep_checkpoints), then the export."""
    tensors = {f"model.{name}": p.detach() for name, p in trainable(unet).items()}
    optimizer_state = optimizer.state_dict()
    for index, state in optimizer_state["state"].items():  # AdamW: step, exp_avg, exp_avg_sq per param
        tensors.update({f"optim.{index}.{key}": value for key, value in state.items()})
    metadata = {"step": str(step), "param_groups": json.dumps(optimizer_state["param_groups"]),
                "scaler": json.dumps(scaler.state_dict()), "config": json.dumps(dataclasses.asdict(cfg))}
    write_atomically(tensors, metadata, os.path.join(cfg.out_dir, f"ckpt_{step:08d}.safetensors"))
    for old in sorted(glob.glob(os.path.join(cfg.out_dir, "ckpt_*.safetensors")))[:-cfg.keep_checkpoints]:
        os.remove(old)
    if cfg.lora_rank > 0:
        return write_atomically(lora.lora_state_dict(unet), {"format": "pt"},
                                os.path.join(cfg.out_dir, "lora.safetensors"))
    os.makedirs(os.path.join(cfg.out_dir, "unet"), exist_ok=True)
    with open(os.path.join(cfg.out_dir, "unet", "config.json"), "w") as f:
        json.dump({"_class_name": "UNet2DConditionModel", **unet.config.to_diffusers()}, f, indent=1)
    write_atomically({k: v.contiguous() for k, v in unet.state_dict().items()}, {"format": "pt"},
                     os.path.join(cfg.out_dir, "unet", "diffusion_pytorch_model.safetensors"))


def latest(out_dir: str) -> str | None:
    paths = sorted(glob.glob(os.path.join(out_dir, "ckpt_*.safetensors")))  # zero-padded step numbers
    return paths[-1] if paths else None


def resume(out_dir: str, unet, optimizer, scaler) -> int:
    """Restore the latest checkpoint in out_dir in place; returns its step (0: none, a fresh start)."""
    path = latest(out_dir)
    if path is None:
        return 0
    tensors, params = load_file(path), trainable(unet)
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    saved = {key[len("model."):] for key in tensors if key.startswith("model.")}
    bad = sorted(params.keys() - saved) + sorted(saved - params.keys())
    if bad:
        raise CheckpointMismatch(f"{path}: trainable tensor {bad[0]!r} is in only one of checkpoint and "
                                 "model; resume with the --method, --model, --lora_rank that wrote it")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"model.{name}"])
    state = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})
    scaler.load_state_dict(json.loads(metadata["scaler"]))
    return int(metadata["step"])


def open_log(out_dir: str, start: int):
    """out_dir/metrics.jsonl, one JSON object per step; a run resumed at `start` drops the rows after it."""
    path, kept = os.path.join(out_dir, "metrics.jsonl"), []
    if start and os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if json.loads(line)["step"] <= start]
    log = open(path, "w")
    log.writelines(kept)
    return log
