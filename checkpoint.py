"""Checkpoints for train.py: one safetensors file (no pickles), written atomically, with what a
bit-exact resume needs: the trainable weights, the AdamW state, the fp16 loss scale and the step,
and in the metadata the run's whole configuration, "samples_consumed" (the global stream position:
every sample of every process and micro-batch so far) and "data_identity" (what defines the data
order, data.py). No RNG state: every random draw is a pure function of (seed, stream position), so
a resume continues from samples_consumed on any number of processes, batch size or accumulation. A
resume refuses, in one line naming the option, a checkpoint written with another value of an option
that changes the shapes or the data stream (SAME_ON_RESUME).

Exports: LoRA -> lora.safetensors (PEFT names, diffusers' load_lora_weights reads it); a full
fine-tune -> a diffusers UNet folder (config.json + safetensors).
"""

import dataclasses
import glob
import json
import os
import shlex
import sys

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import data
import lora

# The options a resume must share with the run that wrote the checkpoint: they change the trainable
# tensors' shapes or the data stream.
SAME_ON_RESUME = ("method", "model", "lora_rank", "data", "data_columns", "seed")


class CheckpointMismatch(ValueError):
    """The checkpoint does not fit the run being resumed; the message names the option or key."""


def write_atomically(tensors: dict, metadata: dict, path: str):
    """Write a temporary file, fsync it, rename it to path: a crash leaves the old file or the new.
    A full disk or a denied write is an OSError naming the path, whatever layer noticed it."""
    temporary = f"{path}.tmp{os.getpid()}"  # per process: several may write toy_reward.py's cache
    try:
        save_file(tensors, temporary, metadata=metadata)
        with open(temporary, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)  # atomic on POSIX and Windows
    except SafetensorError as error:  # how safetensors reports a full disk or a denied write
        raise OSError(f"{path}: {error}") from error
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def trainable(unet) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in unet.named_parameters() if p.requires_grad}


def save(cfg, unet, optimizer, scaler, step: int, samples_consumed: int, data_identity: dict):
    """Write out_dir/ckpt_<step>.safetensors (keeping the newest keep_checkpoints), then export."""
    tensors = {f"model.{name}": p.detach() for name, p in trainable(unet).items()}
    optimizer_state = optimizer.state_dict()
    for index, state in optimizer_state["state"].items():  # AdamW: step, exp_avg, exp_avg_sq
        tensors.update({f"optim.{index}.{key}": value for key, value in state.items()})
    metadata = {
        "step": str(step),
        "samples_consumed": str(samples_consumed),
        "data_identity": json.dumps(data_identity),
        "config": json.dumps(dataclasses.asdict(cfg)),
        "param_groups": json.dumps(optimizer_state["param_groups"]),
        "scaler": json.dumps(scaler.state_dict()),
    }
    write_atomically(tensors, metadata, os.path.join(cfg.out_dir, f"ckpt_{step:08d}.safetensors"))
    checkpoints = sorted(glob.glob(os.path.join(cfg.out_dir, "ckpt_*.safetensors")))
    for old in checkpoints[:-cfg.keep_checkpoints]:
        os.remove(old)
    if cfg.lora_rank > 0:
        write_atomically(lora.lora_state_dict(unet), {"format": "pt"},
                         os.path.join(cfg.out_dir, "lora.safetensors"))
        return
    folder = os.path.join(cfg.out_dir, "unet")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        unet_config = {"_class_name": "UNet2DConditionModel", **unet.config.to_diffusers()}
        json.dump(unet_config, f, indent=1)
    write_atomically({k: v.contiguous() for k, v in unet.state_dict().items()}, {"format": "pt"},
                     os.path.join(folder, "diffusion_pytorch_model.safetensors"))


def latest(out_dir: str) -> str | None:
    """The newest checkpoint in out_dir (step numbers are zero-padded, so names sort by step)."""
    paths = sorted(glob.glob(os.path.join(out_dir, "ckpt_*.safetensors")))
    return paths[-1] if paths else None


def read_metadata(path: str) -> dict[str, str]:
    with safe_open(path, "pt") as f:
        return f.metadata()


def find_resume(cfg) -> dict | None:
    """The metadata (and "path") of the checkpoint --resume continues from, after checking that this
    run's options fit it; None, said on stderr, when there is none: a fresh start. It reads no
    tensor, so it runs before any model is built."""
    if not os.path.isdir(cfg.out_dir):
        print(f"--resume: no folder {cfg.out_dir}; starting from scratch", file=sys.stderr)
        return None
    path = latest(cfg.out_dir)
    if path is None:
        print(f"--resume: no checkpoint in {cfg.out_dir}; starting from scratch", file=sys.stderr)
        return None
    metadata = read_metadata(path)
    saved = json.loads(metadata["config"])
    for key in SAME_ON_RESUME:
        value = getattr(cfg, key)
        if saved.get(key, value) != value:
            raise CheckpointMismatch(f"--resume: {path} was written with --{key}={saved[key]}, "
                                     f"not --{key}={value}; pass --{key}={saved[key]} or another "
                                     "--out_dir")
    if "samples_consumed" not in metadata:
        raise CheckpointMismatch(f"--resume: {path} predates samples_consumed; use a new --out_dir")
    return {**metadata, "path": path}


def restore(resumed: dict, cfg, items, world_size: int, unet, optimizer, scaler, says: bool):
    """Continue the checkpoint find_resume found: check that this run's data continue its stream,
    load its trainable weights, AdamW state and loss scale in place, and (says) say so on stderr."""
    path = resumed["path"]
    problem = resume_problem(cfg, items, json.loads(resumed["data_identity"]), world_size)
    if problem:
        raise CheckpointMismatch(f"--resume: {path}: {problem}")
    tensors = load_file(path)
    params = trainable(unet)
    saved = {key[len("model."):] for key in tensors if key.startswith("model.")}
    bad = sorted(params.keys() - saved) + sorted(saved - params.keys())
    if bad:
        raise CheckpointMismatch(f"{path}: trainable tensor {bad[0]!r} is in only one of checkpoint"
                                 " and model; resume with the --method, --model, --lora_rank that "
                                 "wrote it")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"model.{name}"])
    state = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    param_groups = json.loads(resumed["param_groups"])
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
    scaler.load_state_dict(json.loads(resumed["scaler"]))
    if says:
        print(f"resuming from {path} (step {resumed['step']})", file=sys.stderr)


def data_identity(cfg, items, world_size: int) -> dict:
    """What defines the order of the training stream: the pairs' (data.py), or the prompts'."""
    if isinstance(items, list):
        return {"prompts": cfg.prompts or "default", "count": len(items), "seed": cfg.seed}
    return items.identity(world_size)


def resume_problem(cfg, items, saved_identity: dict, world_size: int) -> str | None:
    """Why this run cannot continue the checkpoint's data stream, in one line; None if it can."""
    if isinstance(items, list):
        identity = data_identity(cfg, items, world_size)
        return None if identity == saved_identity else (
            f"the checkpoint trained on prompts {saved_identity}, this run on {identity}")
    return data.resume_problem(saved_identity, items, world_size)


def resume_command(argv: list[str]) -> str:
    """The command line that continues a run started with argv."""
    flags = [arg for arg in argv if arg != "--resume"]
    return shlex.join(["python", "train.py", *flags, "--resume"])


def stop_line(out_dir: str, argv: list[str], what: str) -> str:
    """The one line a run ends with when it cannot go on: what happened, the last good checkpoint,
    the command that continues from it."""
    last = latest(out_dir) or "none (a rerun starts from step 0)"
    return f"train.py: {what}; the last good checkpoint is {last}; continue: {resume_command(argv)}"


def open_log(out_dir: str, start: int):
    """out_dir/metrics.jsonl, one JSON object per step; a resume at `start` drops later rows."""
    path = os.path.join(out_dir, "metrics.jsonl")
    kept = []
    if start and os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if json.loads(line)["step"] <= start]
    log = open(path, "w")  # noqa: SIM115 (train.py closes it after the loop)
    log.writelines(kept)
    return log
