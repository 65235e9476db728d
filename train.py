"""The one training loop: Diffusion-DPO and SFT on preference pairs; TailorPO, TailorPO-G and the trajectory
baseline online. It reads top to bottom like nanoGPT's: config -> models -> data -> loop -> save.

    python train.py                              # the toy world (toy.py): Diffusion-DPO on toy pairs, on a CPU
    python train.py --method=tailorpo            # the toy world, online against the toy reward model
    python train.py --method=dpo --model=PATH --data=PICKAPIC --lora_rank=0 --learning_rate=2.048e-5
    python train.py @run.txt --resume            # flags read from a file (# comments); on from the last checkpoint
    torchrun --nproc_per_node=8 train.py ...     # DistributedDataParallel; python train.py --help: every flag

The per-batch math is not here: dpo.dpo_train_step (Diffusion-DPO, Wallace et al. Eq. 14), dpo.sft_train_step
and tailorpo.train_step (Ren et al. 2025) each return (loss with graph, metrics). Every random draw of a
training sample is a pure function of (seed, the sample's global stream position), so N processes equal one
process with an N x batch, and a resume on any process count sees the same draws.

Precision policy (--mixed_precision): trainable weights and AdamW state fp32; frozen weights (the LoRA base,
VAE, text encoder) stored in the compute dtype; autocast around the UNet forwards only (Autocast), which
return fp32; latents, noise, x_t, schedule arithmetic, log-probs, losses and rewards fp32. The full
fine-tune's reference is an fp32 copy under the same autocast as the policy, so step 0 gives loss = log 2 and
implicit accuracy 0 exactly. fp16 uses loss scaling (torch.amp.GradScaler), for GPUs without bf16.

Deviations from the official Diffusion-DPO train.py (SalesforceAIResearch/DiffusionDPO), numbered:
1. --learning_rate is the LR used (no --scale_lr). The official SD1.5 run: 1e-8 x 2048 pairs = 2.048e-5 at
   2048 pairs per step (16 GPUs x 1 pair x 128 accumulation), warmup 500 of 2000 steps, beta 5000.
2. bf16 autocast by default instead of fp16 + GradScaler; the full fine-tune's reference is fp32 (official:
   fp16), for the exact step-0 identity above.
3. Warmup counts optimizer steps and starts at lr/warmup_steps, not 0.
4. A checkpoint is one safetensors file (checkpoint.py), with no RNG state: draws are keyed by position.
"""

import contextlib
import copy
import dataclasses
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

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
import weights
from tailorpo import TailorPOConfig

METHODS = ("dpo", "sft") + tailorpo.METHODS
LIVE_METRICS = ("loss", "implicit_accuracy", "val_implicit_accuracy", "eval_reward", "grad_norm")  # tqdm
PRECISIONS = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ANIMALS = [f"a photo of a {animal}" for animal in  # DDPO-style simple animals: online methods without --prompts
           ("cat", "dog", "horse", "rabbit", "fox", "owl", "turtle", "lion", "panda", "duck")]
opt = lambda default, help, **more: field(default=default, metadata={"help": help, **more})  # noqa: A002


@dataclass
class TrainConfig:  # each field is a flag --name=value; its help text is the string beside it
    method: str = opt("dpo", "dpo | sft (pairs) | tailorpo | tailorpo-g | trajectory (online)", choices=METHODS)
    model: str = opt("toy", "SD1.5 diffusers folder, .safetensors/.ckpt file, hub id, or toy (toy.py)")
    lora_rank: int = opt(4, "LoRA rank on the attention projections (lora.py); 0 = full fine-tune")
    lora_alpha: float = opt(4.0, "the LoRA update is scaled by lora_alpha / lora_rank")
    data: str = opt("", "dpo/sft: a pairs.jsonl folder, or Pick-a-Pic parquet (file or folder)")
    val_pairs: int = opt(0, "dpo/sft: pairs held out of training, scored every eval_every steps")
    resolution: int = opt(512, "dpo/sft: images are resized and cropped to this many pixels")
    random_crop: bool = opt(False, "dpo/sft: random instead of center crop (official --random_crop)")
    hflip: bool = opt(True, "dpo/sft: random horizontal flips (official default)")
    prompt_dropout: float = opt(0.2, "dpo/sft: fraction of captions replaced by '' (official 0.2)")
    prompts: str = opt("", "online: text file, one prompt per line (default: toy prompts, or animals)")
    reward: str = opt("", "the online reward and the --ai_feedback ranker", choices=("", *rewards.REWARDS))
    reward_paths: str = opt("", "weight files of the reward as KEY=FILE[,KEY=FILE], e.g. mlp_path=aes.pth")
    report_rewards: str = opt("", "rewards of the final base-vs-aligned report, A,B (default: --reward)")
    ai_feedback: bool = opt(False, "dpo/sft: re-rank every pair with --reward, ignoring the human label")
    beta: float = opt(5000.0, "Diffusion-DPO beta, mean-MSE convention of the official code")
    learning_rate: float = opt(1e-4, "peak AdamW LR (official full-FT SD1.5: 2.048e-5, 2048 pairs/step)")
    warmup_steps: int = opt(0, "linear warmup, then constant (official SD1.5: 500)")
    max_steps: int = opt(200, "optimizer steps (official: 2000)")
    batch_size: int = opt(4, "pairs (dpo/sft) or prompts (online) per micro-batch per process")
    grad_accum: int = opt(1, "micro-batches per optimizer step (effective batch: batch_size*grad_accum*procs)")
    grad_clip: float = opt(1.0, "max global gradient norm (official 1.0)")
    weight_decay: float = opt(1e-2, "AdamW weight decay (official 1e-2)")
    mixed_precision: str = opt("auto", "auto (bf16 on CUDA, no on CPU) | no | bf16 | fp16 (loss scaling)",
                               choices=("auto", *PRECISIONS))
    gradient_checkpointing: bool = opt(False, "recompute UNet blocks in backward: less memory, ~25% slower")
    out_dir: str = opt("out", "checkpoints, exported weights, metrics.jsonl, plots and the final report")
    save_every: int = opt(100, "steps between checkpoints and weight exports; the last step always saves")
    keep_checkpoints: int = opt(2, "keep the newest N checkpoints, delete older ones")
    eval_every: int = opt(50, "steps between validation (dpo/sft) or fresh-sample rewards (online); 0: never")
    eval_prompts: int = opt(16, "online: the first N prompts, fixed seeds, for the fresh-sample reward")
    resume: bool = opt(False, "continue from the latest checkpoint in out_dir (from scratch if none)")
    seed: int = opt(0, "every random draw derives from it and the sample's stream position")
    device: str = opt("auto", "auto = cuda if available (cuda:LOCAL_RANK under torchrun), else cpu")
    num_workers: int = opt(0, "dpo/sft: DataLoader processes decoding images (resume stays exact)")
    tailorpo: TailorPOConfig = field(default_factory=TailorPOConfig)  # online methods: --tailorpo.KEY


def parse_config(argv: list[str]) -> TrainConfig:
    """TrainConfig from the flags; with --model=toy, toy.TRAIN_DEFAULTS[method] replace the defaults."""
    import toy

    toy_defaults = lambda given: getattr(toy, "TRAIN_DEFAULTS", {}).get(given.get("method", "dpo"), {}) \
        if given.get("model", "toy") == "toy" else {}
    cfg = config.parse(TrainConfig, argv, __doc__.split("\n\n")[0], toy_defaults)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig):
    """Every option and path, checked before any model is built or pretrained."""
    def need(ok, message: str):
        if not ok:
            raise config.ConfigError(message)

    pairs, online, names = cfg.method in ("dpo", "sft"), cfg.method in tailorpo.METHODS, ", ".join(rewards.REWARDS)
    need(min(cfg.batch_size, cfg.grad_accum, cfg.max_steps, cfg.save_every, cfg.keep_checkpoints) >= 1,
         "--batch_size, --grad_accum, --max_steps, --save_every and --keep_checkpoints must be >= 1")
    need(min(cfg.lora_rank, cfg.val_pairs, cfg.eval_every, cfg.warmup_steps, cfg.num_workers) >= 0,
         "--lora_rank, --val_pairs, --eval_every, --warmup_steps and --num_workers must be >= 0")
    need(0 <= cfg.prompt_dropout <= 1, f"--prompt_dropout must be in [0, 1], got {cfg.prompt_dropout}")
    need(cfg.beta > 0 and cfg.learning_rate >= 0, "--beta must be > 0 and --learning_rate >= 0")
    need(pairs or not (cfg.ai_feedback or cfg.val_pairs or cfg.data),
         f"--ai_feedback, --val_pairs and --data are for --method=dpo or sft, not {cfg.method}")
    need(not pairs or cfg.data or cfg.model == "toy", f"--method={cfg.method} needs --data=FOLDER_OR_PARQUET")
    need(not cfg.data or os.path.exists(cfg.data), f"--data={cfg.data}: no such file or folder")
    need(not cfg.prompts or os.path.isfile(cfg.prompts), f"--prompts={cfg.prompts}: no such file")
    need(cfg.model == "toy" or os.path.exists(cfg.model) or not cfg.model.endswith(weights.SUFFIXES),
         f"--model={cfg.model}: no such file")
    need(cfg.reward or not (online or cfg.ai_feedback), f"--method={cfg.method}"
         f"{' --ai_feedback' * cfg.ai_feedback} needs --reward, one of {names}")
    for name in filter(None, cfg.report_rewards.split(",")):
        need(name in rewards.REWARDS, f"--report_rewards: unknown reward {name!r}; one of {names}")
    for item in filter(None, cfg.reward_paths.split(",")):
        need(os.path.exists(item.partition("=")[2]), f"--reward_paths: {item!r} is not KEY=EXISTING_FILE")
    try:
        cfg.tailorpo.validate()
    except ValueError as error:
        raise config.ConfigError(f"--tailorpo.{error}") from None


# ----------------------------------------------------------------------------------------------------------
# Models


class Wrapper(torch.nn.Module):
    """Passes attribute lookups (config, conv_in, ...) on to the wrapped UNet."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


class DDP(Wrapper, DistributedDataParallel):
    pass


class Autocast(Wrapper):
    """The precision policy's one autocast region: the UNet forward runs in `dtype` and returns float32. As
    the reference: no grad, LoRA adapters off (a LoRA policy's base, or a frozen copy that has none)."""

    def __init__(self, module, dtype: torch.dtype, reference: bool = False):
        super().__init__()
        self.module, self.dtype, self.reference = module, dtype, reference
        self.device_type = next(module.parameters()).device.type

    def forward(self, *args):
        with (torch.autocast(self.device_type, self.dtype, enabled=self.dtype != torch.float32),
              torch.no_grad() if self.reference else contextlib.nullcontext(),
              lora.lora_disabled(self.module) if self.reference else contextlib.nullcontext()):
            return self.module(*args).float()


def build_models(cfg, device, dtype):
    """(sd, trainable params, reference): sd.unet is the policy with fp32 trainable weights; the reference
    is the same UNet with LoRA off, or (full fine-tune) a frozen fp32 copy; frozen weights in `dtype`."""
    import toy

    torch.manual_seed(cfg.seed)  # the LoRA initialisation: the same on every rank
    sd = toy.load_base_model(device=device) if cfg.model == "toy" else weights.load_stable_diffusion(cfg.model,
                                                                                                     device)
    sd.vae.requires_grad_(False).eval().to(dtype)
    sd.text_encoder.requires_grad_(False).eval().to(dtype)
    unet = sd.unet
    if cfg.lora_rank > 0:
        params, reference = lora.inject_lora(unet.to(dtype), cfg.lora_rank, cfg.lora_alpha), unet  # fp32 A, B
    else:
        reference = copy.deepcopy(unet).requires_grad_(False).eval()
        params = list(unet.requires_grad_(True).parameters())
    unet.train().set_gradient_checkpointing(cfg.gradient_checkpointing)
    return sd, params, Autocast(reference, dtype, reference=True)


# ----------------------------------------------------------------------------------------------------------
# Data


def load_data(cfg, rank: int, world: int, start: int):
    """(items, val_batches, batches): pairs (dpo/sft) or prompts (online), the validation batches, and this
    rank's endless micro-batches from micro-batch `start` on; batch["positions"] keys every random draw."""
    import toy

    if cfg.method in ("dpo", "sft"):
        folder = cfg.data or toy.make_pairs()
        pairs = data.PreferencePairs(folder, cfg.resolution, cfg.random_crop, cfg.hflip, cfg.prompt_dropout,
                                     cfg.seed)
        pairs, val = pairs.split_validation(cfg.val_pairs) if cfg.val_pairs else (pairs, None)
        val_batches = val.batches(cfg.batch_size) if val else []
        return pairs, val_batches, iter(data.PairBatches(pairs, cfg.batch_size, start, rank, world,
                                                         cfg.num_workers))
    if cfg.prompts:
        with open(cfg.prompts) as f:
            prompts = [line.strip() for line in f if line.strip()]
    else:
        prompts = list(toy.PROMPTS) if cfg.model == "toy" else ANIMALS
    return prompts, [], prompt_batches(prompts, cfg.batch_size, rank, world, cfg.seed, start)


def prompt_batches(prompts: list[str], batch_size: int, rank: int, world: int, seed: int, start: int):
    """Endless {"prompts", "positions"} positioned like data.PairBatches: position p holds prompt
    perm_e[p % N], e = p // N, perm_e seeded by seed + e: a pure function of (seed, position)."""
    order = lambda epoch: torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed + epoch))
    for step in itertools.count(start):
        positions = data.batch_positions(step, batch_size, rank, world)
        yield {"prompts": [prompts[order(p // len(prompts))[p % len(prompts)]] for p in positions],
               "positions": positions}


# ----------------------------------------------------------------------------------------------------------
# The loop


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
    """{name: float} averaged over the ranks, with ONE device-to-host copy for all metrics."""
    values = torch.stack([torch.as_tensor(v).detach().float().reshape(()).cpu() for v in metrics.values()])
    if world > 1:
        dist.all_reduce(values)  # a sum: gloo has no ReduceOp.AVG
    return dict(zip(metrics, (values / world).tolist()))


@torch.no_grad()
def evaluation(cfg, sd, base_unet, items, val_batches, reward_fn) -> dict:
    """dpo/sft: the mean metrics of the held-out pairs (their positions fix every draw: a smooth curve);
    online: the mean reward of fresh samples from fixed seeds."""
    if val_batches:
        rows = [to_floats(method_step(cfg, sd, base_unet, batch, reward_fn)[1], 1) for batch in val_batches]
        return {f"val_{key}": sum(row[key] for row in rows) / len(rows) for key in rows[0]}
    prompts, online = items[:cfg.eval_prompts], cfg.tailorpo
    images = evaluate.generate(sd, prompts, [cfg.seed + 12345], online.num_steps, online.guidance_scale,
                               online.eta, progress=False)
    return {"eval_reward": reward_fn(images, prompts).mean().item()}


def open_log(cfg, start: int):
    """out_dir/metrics.jsonl, one JSON object per step; a resumed run drops the rows after its checkpoint."""
    path, kept = os.path.join(cfg.out_dir, "metrics.jsonl"), []
    if start and os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if json.loads(line)["step"] <= start]
    log = open(path, "w")
    log.writelines(kept)
    return log


def final_report(cfg, aligned_sd, base_sd, items, reward_fn, device):
    """Base vs aligned on held-out seeds (evaluate.py): each reward's mean +- stderr, the paired difference,
    the win rate, per prompt category; the images, report.md/json and the base | aligned grid."""
    names = (cfg.report_rewards or cfg.reward).split(",")
    paths = dict(item.split("=", 1) for item in cfg.reward_paths.split(",") if item)
    reward_fns = {**evaluate.load_rewards([n for n in names if n != cfg.reward], device, paths),
                  **({cfg.reward: reward_fn} if cfg.reward in names else {})}
    prompts = evaluate.read_prompts("toy") if cfg.model == "toy" else evaluate.PromptSet(
        "train", items if isinstance(items, list) else sorted({row[0] for row in items.rows})[:64], None)
    report = evaluate.compare(aligned_sd, prompts.prompts, reward_fns, list(range(1000, 1004)),
                              os.path.join(cfg.out_dir, "eval"), base_sd=base_sd, categories=prompts.categories,
                              num_steps=cfg.tailorpo.num_steps, guidance=cfg.tailorpo.guidance_scale)
    print(evaluate.format_markdown(report))


def main(argv: list[str] | None = None):
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", device.index or int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    precision = cfg.mixed_precision if cfg.mixed_precision != "auto" else "bf16" if device.type == "cuda" else "no"
    dtype = PRECISIONS[precision]
    os.makedirs(cfg.out_dir, exist_ok=True)

    # models: the policy (DDP-wrapped across processes), its frozen reference, the reward
    sd, params, base_unet = build_models(cfg, device, dtype)
    policy = Autocast(DDP(sd.unet, broadcast_buffers=False) if world > 1 else sd.unet, dtype)
    train_sd, eval_sd = (dataclasses.replace(sd, unet=unet) for unet in (policy, Autocast(sd.unet, dtype)))
    paths = dict(item.split("=", 1) for item in cfg.reward_paths.split(",") if item)
    reward_fn = rewards.get_reward(cfg.reward, device, **paths) if cfg.reward else None
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    path = checkpoint.latest(cfg.out_dir) if cfg.resume else None
    start = checkpoint.load(path, sd.unet, optimizer, scaler) if path else 0

    # data: pairs or prompts, from this run's position on
    items, val_batches, batches = load_data(cfg, rank, world, start * cfg.grad_accum)
    log = open_log(cfg, start) if rank == 0 else None
    evaluates = rank == 0 and cfg.eval_every > 0 and (bool(val_batches) or cfg.method in tailorpo.METHODS)
    evaluate_now = lambda step: evaluates and (step % cfg.eval_every == 0 or step == cfg.max_steps)
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
            raise SystemExit(f"step {step + 1}: loss {row['loss']}, gradient norm {row['grad_norm']}: stop before "
                             f"the update. The last good checkpoint is {checkpoint.latest(cfg.out_dir)}; lower "
                             "--learning_rate (or --beta) and --resume.")
        scaler.step(optimizer)  # skipped by fp16 loss scaling when the gradients overflowed
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if rank == 0 and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps):
            checkpoint.save(cfg, sd.unet, optimizer, scaler, step + 1)
        if world > 1:
            dist.barrier()
        if evaluate_now(step + 1):
            row.update(evaluation(cfg, eval_sd, base_unet, items, val_batches, reward_fn))
        if log:
            log.write(json.dumps({**row, "seconds": time.time() - started}) + "\n")
            log.flush()
            progress.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k in LIVE_METRICS})

    # save: plots, data counts and the base-vs-aligned report (rank 0)
    if log:
        log.close()
        print(*([items.stats.summary()] if hasattr(items, "stats") else []), "wrote", *plot.plot_metrics(log.name), cfg.out_dir, sep="\n  ")
        if cfg.report_rewards or cfg.reward:
            final_report(cfg, eval_sd, dataclasses.replace(sd, unet=base_unet), items, reward_fn, device)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (config.ConfigError, weights.CheckpointError, checkpoint.CheckpointMismatch) as error:
        raise SystemExit(f"train.py: {error}") from None
