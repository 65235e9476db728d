"""The one training loop: Diffusion-DPO and SFT on preference pairs; TailorPO, TailorPO-G and the trajectory
baseline online. It reads top to bottom like nanoGPT's: config -> models -> data -> loop -> save.

    python train.py                        # the toy world (toy.py) on a CPU; --method=tailorpo: online
    torchrun --nproc_per_node=8 train.py --method=dpo --model=PATH --data=PICKAPIC @more_flags.txt --resume

Precision policy (--mixed_precision): trainable weights and AdamW state fp32; frozen weights (LoRA base, VAE,
text encoder) in the compute dtype; autocast around the UNet forwards only (Autocast), which return fp32;
latents, noise, x_t, schedule arithmetic, log-probs, losses and rewards fp32. fp16 adds loss scaling.

Deviations from the official Diffusion-DPO train.py (SalesforceAIResearch/DiffusionDPO), numbered:
1. --learning_rate is the LR used, not scaled by the batch (official --scale_lr; its SD1.5 run: 16 GPUs x
   1 pair x 128 accumulation = 2048 pairs per step at 2.048e-5).
2. bf16 by default instead of fp16; the full fine-tune's reference is an fp32 copy under the policy's
   autocast (official: fp16), so step 0 gives loss = log 2 and implicit accuracy 0 exactly.
3. Warmup counts optimizer steps and starts at lr/warmup_steps, not 0.
4. Every random draw of a training sample is a pure function of (seed, its stream position): N processes
   equal one with an N x batch, and checkpoints (checkpoint.py) hold no RNG state.
"""

import contextlib
import copy
import dataclasses
import itertools
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from functools import cache

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import checkpoint
import config
import data
import dpo
import evaluate
import lora
import plot
import rewards
import tailorpo
import toy
import weights
from config import opt
from tailorpo import TailorPOConfig

METHODS = ("dpo", "sft") + tailorpo.METHODS
LIVE_METRICS = ("loss", "implicit_accuracy", "val_implicit_accuracy", "eval_reward", "grad_norm")  # tqdm
PRECISIONS = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ANIMALS = [f"a photo of a {name}" for name in "cat dog horse rabbit fox owl turtle lion panda duck".split()]


@dataclass
class TrainConfig:  # each field is a flag --name=value; its help text is the string beside it
    method: str = opt("dpo", "dpo, sft (pairs) | tailorpo, tailorpo-g, trajectory (online)", choices=METHODS)
    model: str = opt("toy", "SD1.5 diffusers folder, .safetensors/.ckpt file, hub id, or toy (toy.py)")
    lora_rank: int = opt(4, "LoRA rank on the attention projections (lora.py); 0 = full fine-tune", low=0)
    lora_alpha: float = opt(4.0, "the LoRA update is scaled by lora_alpha / lora_rank")
    data: str = opt("", "dpo/sft: a pairs.jsonl folder, or Pick-a-Pic parquet (file or folder)")
    val_pairs: int = opt(0, "dpo/sft: pairs held out of training, scored every eval_every steps", low=0)
    resolution: int = opt(512, "dpo/sft: images are resized and cropped to this many pixels")
    random_crop: bool = opt(False, "dpo/sft: random instead of center crop (official --random_crop)")
    hflip: bool = opt(True, "dpo/sft: random horizontal flips (official default)")
    prompt_dropout: float = opt(0.2, "dpo/sft: fraction of captions replaced by '' (official)", low=0, high=1)
    prompts: str = opt("", "online: drawbench, parti, a .txt/.csv file (default: toy, or DDPO's animals)")
    reward: str = opt("", "the online reward and the --ai_feedback ranker", choices=("", *rewards.REWARDS))
    reward_paths: str = opt("", "weight files of the reward as KEY=FILE[,KEY=FILE], e.g. mlp_path=aes.pth")
    report_rewards: str = opt("", "rewards of the final base-vs-aligned report, A,B (default: --reward)")
    ai_feedback: bool = opt(False, "dpo/sft: re-rank every pair with --reward, ignoring the human label")
    beta: float = opt(5000.0, "Diffusion-DPO beta, mean-MSE convention of the official code", low=0)
    learning_rate: float = opt(1e-4, "peak AdamW LR (official SD1.5 full FT: 2.048e-5, 2048 pairs)", low=0)
    warmup_steps: int = opt(0, "linear warmup, then constant (official SD1.5: 500)", low=0)
    max_steps: int = opt(200, "optimizer steps (official: 2000)", low=1)
    batch_size: int = opt(4, "pairs (dpo/sft) or prompts (online) per micro-batch per process", low=1)
    grad_accum: int = opt(1, "micro-batches per optimizer step (batch: batch_size*grad_accum*procs)", low=1)
    grad_clip: float = opt(1.0, "max global gradient norm (official 1.0)")
    weight_decay: float = opt(1e-2, "AdamW weight decay (official 1e-2)")
    mixed_precision: str = opt("auto", "auto (bf16 on CUDA, no on CPU) | no | bf16 | fp16 (loss scaling)",
                               choices=("auto", *PRECISIONS))
    gradient_checkpointing: bool = opt(False, "recompute UNet blocks in backward: less memory, ~25% slower")
    out_dir: str = opt("out", "checkpoints, exported weights, metrics.jsonl, plots and the final report")
    save_every: int = opt(100, "steps between checkpoints and weight exports (and the last)", low=1)
    keep_checkpoints: int = opt(2, "keep the newest N checkpoints, delete older ones", low=1)
    eval_every: int = opt(50, "steps between validation (dpo/sft) or fresh-sample rewards; 0: never", low=0)
    eval_prompts: int = opt(16, "online: the first N prompts, fixed seeds, for the fresh-sample reward")
    resume: bool = opt(False, "continue from the latest checkpoint in out_dir (from scratch if none)")
    seed: int = opt(0, "every random draw derives from it and the sample's stream position")
    device: str = opt("auto", "auto = cuda if available (cuda:LOCAL_RANK under torchrun), else cpu")
    num_workers: int = opt(0, "dpo/sft: DataLoader processes decoding images (resume stays exact)", low=0)
    tailorpo: TailorPOConfig = field(default_factory=TailorPOConfig)  # online methods: --tailorpo.KEY


def parse_config(argv: list[str]) -> TrainConfig:
    """TrainConfig from the flags; with --model=toy, toy.TRAIN_DEFAULTS[method] replace the defaults."""
    def toy_defaults(given: dict) -> dict:
        return toy.TRAIN_DEFAULTS[given.get("method", "dpo")] if given.get("model", "toy") == "toy" else {}

    cfg = config.parse(TrainConfig, argv, __doc__.split("\n\n")[0], toy_defaults)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig):
    """Every option and path, checked before any model is built or pretrained."""
    def need(ok, message: str):
        if not ok:
            raise config.ConfigError(message)

    pairs, online = cfg.method in ("dpo", "sft"), cfg.method in tailorpo.METHODS
    names = ", ".join(rewards.REWARDS)
    need(pairs or not (cfg.ai_feedback or cfg.val_pairs or cfg.data),
         f"--ai_feedback, --val_pairs and --data are for --method=dpo or sft, not {cfg.method}")
    need(not pairs or cfg.data or cfg.model == "toy", f"--method={cfg.method} needs --data=FOLDER_OR_PARQUET")
    need(not cfg.data or os.path.exists(cfg.data), f"--data={cfg.data}: no such file or folder")
    need(not cfg.prompts or cfg.prompts in evaluate.PROMPT_SETS or os.path.isfile(cfg.prompts),
         f"--prompts={cfg.prompts}: no such file, nor one of {', '.join(evaluate.PROMPT_SETS)}")
    need(cfg.model == "toy" or os.path.exists(cfg.model) or not cfg.model.endswith(weights.SUFFIXES),
         f"--model={cfg.model}: no such file")
    need(cfg.reward or not (online or cfg.ai_feedback), f"--method={cfg.method}"
         f"{' --ai_feedback' * cfg.ai_feedback} needs --reward, one of {names}")
    for name in filter(None, cfg.report_rewards.split(",")):
        need(name in rewards.REWARDS, f"--report_rewards: unknown reward {name!r}; one of {names}")
    for item in filter(None, cfg.reward_paths.split(",")):
        need(os.path.exists(item.partition("=")[2]), f"--reward_paths: {item!r} is not KEY=EXISTING_FILE")


class Autocast(torch.nn.Module):
    """The precision policy's autocast region: the UNet runs in `dtype`, returns float32; as the reference
    (reference=True): no grad, LoRA adapters off."""

    def __init__(self, module, dtype: torch.dtype, reference: bool = False):
        super().__init__()
        self.module, self.dtype, self.reference = module, dtype, reference
        self.device_type = next(module.parameters()).device.type

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(getattr(self.module, "module", self.module), name)  # through DDP to the UNet

    def forward(self, *args):
        with torch.autocast(self.device_type, self.dtype, enabled=self.dtype != torch.float32):
            if not self.reference:
                return self.module(*args).float()
            with torch.no_grad(), lora.lora_disabled(self.module):
                return self.module(*args).float()


def build_models(cfg, device, dtype):
    """(sd, trainable params, reference): sd.unet is the policy with fp32 trainable weights; the reference
    is the same UNet with LoRA off, or (full fine-tune) a frozen fp32 copy; frozen weights in `dtype`."""
    torch.manual_seed(cfg.seed)  # the LoRA initialisation: the same on every rank
    sd = (toy.load_base_model(device=device) if cfg.model == "toy"
          else weights.load_stable_diffusion(cfg.model, device))
    sd.vae.requires_grad_(False).eval().to(dtype)
    sd.text_encoder.requires_grad_(False).eval().to(dtype)
    unet = sd.unet
    if cfg.lora_rank > 0:
        params, reference = lora.inject_lora(unet.to(dtype), cfg.lora_rank, cfg.lora_alpha), unet  # fp32 A, B
    else:
        reference = copy.deepcopy(unet).requires_grad_(False).eval()
        params = list(unet.requires_grad_(True).parameters())
    unet.train().gradient_checkpointing = cfg.gradient_checkpointing
    return sd, params, Autocast(reference, dtype, reference=True)


def load_data(cfg, rank: int, world: int, start: int):
    """(items, val_batches, batches): pairs or prompts, validation batches, this rank's endless batches."""
    if cfg.method in ("dpo", "sft"):
        folder = cfg.data or toy.make_pairs()
        pairs = data.PreferencePairs(folder, cfg.resolution, cfg.random_crop, cfg.hflip, cfg.prompt_dropout,
                                     cfg.seed)
        pairs, val = pairs.split_validation(cfg.val_pairs) if cfg.val_pairs else (pairs, None)
        val_batches = val.batches(cfg.batch_size) if val else []
        return pairs, val_batches, iter(data.PairBatches(pairs, cfg.batch_size, start, rank, world,
                                                         cfg.num_workers))
    default = list(toy.TRAIN_PROMPTS) if cfg.model == "toy" else ANIMALS
    prompts = evaluate.read_prompts(cfg.prompts).prompts if cfg.prompts else default
    return prompts, [], prompt_batches(prompts, cfg.batch_size, rank, world, cfg.seed, start)


def prompt_batches(prompts: list[str], batch_size: int, rank: int, world: int, seed: int, start: int):
    """Endless {"prompts", "positions"} like data.PairBatches: p holds prompts[order(p // N)[p % N]]."""
    order = cache(lambda e: torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed + e)))
    for step in itertools.count(start):
        positions = data.batch_positions(step, batch_size, rank, world)
        yield {"prompts": [prompts[order(p // len(prompts))[p % len(prompts)]] for p in positions],
               "positions": positions}


def method_step(cfg, sd, reference_unet, batch, reward_fn):
    """One micro-batch of the configured method -> (loss with graph, metrics)."""
    if cfg.ai_feedback:  # the paper's AI-feedback variant: the reward re-ranks every pair, online (official)
        batch, relabelled = data.relabel_with_reward(batch, reward_fn)
    if cfg.method == "dpo":
        loss, metrics = dpo.dpo_train_step(sd, reference_unet, batch, cfg.beta, cfg.seed)
    elif cfg.method == "sft":
        loss, metrics = dpo.sft_train_step(sd, batch, cfg.seed)
    else:
        loss, metrics = tailorpo.train_step(sd, reference_unet, batch, reward_fn, cfg.tailorpo, cfg.seed,
                                            cfg.method)
    return loss, {**metrics, **({"pairs_relabelled": float(relabelled)} if cfg.ai_feedback else {})}


def to_floats(metrics: dict, world: int) -> dict[str, float]:
    """{name: float} averaged over the ranks: stacked and all-reduced where the tensors are (NCCL reduces CUDA
    tensors only), then ONE device-to-host copy for all metrics."""
    device = next(v.device for v in metrics.values() if torch.is_tensor(v))
    values = torch.stack([torch.as_tensor(v, device=device).detach().float().reshape(())
                          for v in metrics.values()])
    if world > 1:
        dist.all_reduce(values)  # a sum: gloo has no ReduceOp.AVG
    return dict(zip(metrics, (values / world).tolist()))


@torch.no_grad()
def evaluation(cfg, sd, base_unet, items, val_batches, reward_fn) -> dict:
    """dpo/sft: held-out pairs' mean metrics (fixed draws); online: mean reward of fixed-seed samples."""
    if val_batches:
        rows = [to_floats(method_step(cfg, sd, base_unet, batch, reward_fn)[1], 1) for batch in val_batches]
        return {f"val_{key}": sum(row[key] for row in rows) / len(rows) for key in rows[0]}
    prompts, online = items[:cfg.eval_prompts], cfg.tailorpo
    images = evaluate.generate(sd, prompts, cfg.seed + 12345, online.num_steps, online.guidance_scale,
                               online.eta)
    return {"eval_reward": reward_fn(images, prompts).mean().item()}


def final_report(cfg, aligned_sd, base_sd, items, reward_fns):
    """Base vs aligned on held-out seeds (evaluate.py): each reward's and the toy judge's statistics."""
    captions = items if isinstance(items, list) else sorted({row[0] for row in items.rows})[:64]
    prompts = evaluate.read_prompts("toy") if cfg.model == "toy" else evaluate.PromptSet("", captions, None)
    reward_fns = {**(toy.JUDGES if cfg.model == "toy" else {}), **reward_fns}
    shutil.rmtree(out := os.path.join(cfg.out_dir, "eval"), ignore_errors=True)  # this run's images only
    report = evaluate.compare(aligned_sd, prompts.prompts, reward_fns, list(range(1000, 1004)), out, base_sd,
                              prompts.categories, prompts.name, num_steps=cfg.tailorpo.num_steps,
                              guidance=cfg.tailorpo.guidance_scale)
    print(evaluate.format_markdown(report))


def main(argv: list[str] | None = None):
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(cfg.device.replace("auto", "cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", device.index or int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    dtype = PRECISIONS[cfg.mixed_precision.replace("auto", "bf16" if device.type == "cuda" else "no")]
    os.makedirs(cfg.out_dir, exist_ok=True)

    # models: the policy (DDP-wrapped across processes), its frozen reference, the reward
    sd, params, base_unet = build_models(cfg, device, dtype)
    policy = Autocast(DistributedDataParallel(sd.unet) if world > 1 else sd.unet, dtype)
    train_sd, eval_sd = (dataclasses.replace(sd, unet=unet) for unet in (policy, Autocast(sd.unet, dtype)))
    report_names = [name for name in (cfg.report_rewards or cfg.reward).split(",") if name]
    paths = dict(item.split("=", 1) for item in cfg.reward_paths.split(",") if item)
    reward_fns = evaluate.load_rewards(sorted({cfg.reward, *report_names} - {""}), device, paths)
    reward_fn = reward_fns.get(cfg.reward)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start = checkpoint.resume(cfg.out_dir, sd.unet, optimizer, scaler) if cfg.resume else 0

    # data: pairs or prompts, from this run's position on
    items, val_batches, batches = load_data(cfg, rank, world, start * cfg.grad_accum)
    log = checkpoint.open_log(cfg.out_dir, start) if rank == 0 else None
    evaluates = rank == 0 and cfg.eval_every > 0 and (bool(val_batches) or cfg.method in tailorpo.METHODS)
    if evaluates and start == 0:
        log.write(json.dumps({"step": start, **evaluation(cfg, eval_sd, base_unet, items, val_batches,
                                                            reward_fn)}) + "\n")

    progress = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, disable=rank != 0)
    for step in progress:
        started, sums = time.time(), {}
        lr = cfg.learning_rate * min(1.0, (step + 1) / max(cfg.warmup_steps, 1))  # warmup, then constant
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(cfg.grad_accum):  # DDP all-reduces the gradients in the last backward only
            sync = world == 1 or micro == cfg.grad_accum - 1
            with contextlib.nullcontext() if sync else policy.module.no_sync():
                loss, metrics = method_step(cfg, train_sd, base_unet, next(batches), reward_fn)
                scaler.scale(loss / cfg.grad_accum).backward()
            for key, value in {**metrics, "loss": loss.detach()}.items():
                sums[key] = sums.get(key, 0.0) + value / cfg.grad_accum
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)  # the same on every rank
        row = {"step": step + 1, "lr": lr, **to_floats({**sums, "grad_norm": grad_norm}, world)}
        if not math.isfinite(row["loss"]) or not (scaler.is_enabled() or math.isfinite(row["grad_norm"])):
            last = checkpoint.latest(cfg.out_dir)
            raise SystemExit(f"step {step + 1}: loss {row['loss']}, gradient norm {row['grad_norm']}: no "
                             f"update. The last good checkpoint is {last}: lower --learning_rate, --resume.")
        scaler.step(optimizer)  # skipped by fp16 loss scaling when the gradients overflowed
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if rank == 0 and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps):
            checkpoint.save(cfg, sd.unet, optimizer, scaler, step + 1)
        if evaluates and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps):
            row.update(evaluation(cfg, eval_sd, base_unet, items, val_batches, reward_fn))
        if log:
            log.write(json.dumps({**row, "seconds": time.time() - started}) + "\n")
            log.flush()
            progress.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k in LIVE_METRICS})

    # save: plots, data counts and the base-vs-aligned report (rank 0)
    if log:
        log.close()
        print(getattr(items, "stats", "data: prompts"), "wrote", *plot.plot_metrics(log.name), sep="\n  ")
        if report_names:
            final_report(cfg, eval_sd, dataclasses.replace(sd, unet=base_unet), items,
                         {name: reward_fns[name] for name in report_names})
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (config.ConfigError, weights.CheckpointError, checkpoint.CheckpointMismatch) as error:
        raise SystemExit(f"train.py: {error}") from None
