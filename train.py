"""The one training loop: Diffusion-DPO and SFT on preference pairs; TailorPO, TailorPO-G and the
trajectory baseline online; it reads top to bottom: config -> models -> data -> loop -> save.

    python train.py                    # the toy world (toy.py) on a CPU; --method=tailorpo: online
    torchrun --nproc_per_node=8 train.py --method=dpo --model=PATH --data=PICKAPIC @flags.txt

Precision policy (--mixed_precision): trainable weights and AdamW state fp32; frozen weights (LoRA
base, VAE, text encoder) in the compute dtype; autocast around the UNet forwards only (Precision),
which return fp32; latents, noise, x_t, schedule arithmetic, log-probs, losses and rewards fp32.
fp16 adds loss scaling. TF32 matmuls only under mixed precision: --mixed_precision=no is fp32.

Deviations from the official Diffusion-DPO train.py (SalesforceAIResearch/DiffusionDPO), numbered:
1. --learning_rate is the LR used, not scaled by the batch (official --scale_lr; its SD1.5 run:
   16 GPUs x 1 pair x 128 accumulation = 2048 pairs per step at 2.048e-5).
2. bf16 by default instead of fp16; the full fine-tune's reference is an fp32 copy under the
   policy's autocast (official: fp16), so step 0 gives loss = log 2 and implicit accuracy 0 exactly.
3. Warmup counts optimizer steps and starts at lr/warmup_steps, not 0.
4. Every draw of a training sample is a pure function of (seed, stream position): N processes
   equal one with an N x batch; a checkpoint holds the samples consumed, not RNG states.
5. The end-of-run report samples as evaluate.py does (DDIM 50 steps, CFG 7.5; the toy: its own).
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
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import checkpoint
import config
import data
import dpo
import evaluate
import lora
import plot
import progress
import rewards
import tailorpo
import toy
import weights
from config import opt
from tailorpo import TailorPOConfig

PAIRS = ("dpo", "sft")
METHODS = PAIRS + tailorpo.METHODS
LIVE_METRICS = {"loss": "loss", "implicit_accuracy": "acc", "val_implicit_accuracy": "val_acc",
                "eval_reward": "reward", "grad_norm": "grad"}  # the bar's short names
PRECISIONS = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ANIMALS = [f"a photo of a {name}" for name in
           "cat dog horse rabbit fox owl turtle lion panda duck".split()]
REPORT_SEEDS = [1000, 1001, 1002, 1003]  # held-out seeds: training never samples them


@dataclass
class TrainConfig:  # each field is a flag --name=value; its help text is the string beside it
    method: str = opt("dpo", "dpo, sft (pairs) | tailorpo, tailorpo-g, trajectory", choices=METHODS)
    model: str = opt("toy", "SD1.5 diffusers folder, .safetensors/.ckpt file, hub id, or toy")
    lora_rank: int = opt(4, "LoRA rank on the attention projections; 0: full fine-tune", low=0)
    lora_alpha: float = opt(4.0, "the LoRA update is scaled by lora_alpha / lora_rank")
    data: str = opt("", "dpo/sft: a pairs.jsonl folder, or Pick-a-Pic parquet (file or folder)")
    data_columns: str = opt("", "parquet: FIELD=COLUMN,... e.g. caption=prompt,jpg_0=chosen")
    val_pairs: int = opt(0, "dpo/sft: pairs held out of training, scored every eval_every", low=0)
    resolution: int = opt(512, "dpo/sft: images are resized and cropped to this size", low=1)
    random_crop: bool = opt(False, "dpo/sft: random instead of center crop (official)")
    hflip: bool = opt(True, "dpo/sft: random horizontal flips (official default)")
    prompt_dropout: float = opt(0.2, "dpo/sft: share of captions made ''", low=0, high=1)
    prompts: str = opt("", "online: drawbench, parti, a .txt/.csv (default: toy or animals)")
    reward: str = opt("", "the online reward and --ai_feedback ranker (REWARDS in rewards.py)")
    reward_paths: str = opt("", "the reward's weight files, KEY=FILE[,KEY=FILE]")
    report_rewards: str = opt("", "rewards of the final report, A,B (default: --reward)")
    ai_feedback: bool = opt(False, "dpo/sft: re-rank every pair with --reward, not the label")
    beta: float = opt(5000.0, "Diffusion-DPO beta, the official code's mean-MSE convention", low=0)
    learning_rate: float = opt(1e-4, "peak AdamW LR (official SD1.5 full FT: 2.048e-5)", low=0)
    warmup_steps: int = opt(0, "linear warmup, then constant (official SD1.5: 500)", low=0)
    max_steps: int = opt(200, "optimizer steps (official: 2000)", low=1)
    batch_size: int = opt(4, "pairs or prompts per micro-batch per process", low=1)
    grad_accum: int = opt(1, "micro-batches per optimizer step", low=1)
    grad_clip: float = opt(1.0, "max global gradient norm (official 1.0)")
    weight_decay: float = opt(1e-2, "AdamW weight decay (official 1e-2)")
    mixed_precision: str = opt("auto", "auto: bf16 on CUDA, else no", choices=("auto", *PRECISIONS))
    gradient_checkpointing: bool = opt(False, "recompute UNet blocks: less memory, ~25% slower")
    out_dir: str = opt("", "checkpoints, exports, metrics, plots, report (default: out/METHOD)")
    save_every: int = opt(100, "steps between checkpoints and exports (and the last)", low=1)
    keep_checkpoints: int = opt(2, "keep the newest N checkpoints", low=1)
    eval_every: int = opt(50, "steps between validations or fresh-sample rewards; 0: none", low=0)
    eval_prompts: int = opt(16, "online: the first N prompts, fixed seeds, for eval_reward")
    resume: bool = opt(False, "continue from the latest checkpoint in out_dir (fresh if none)")
    seed: int = opt(0, "every random draw derives from it and the sample's stream position")
    device: str = opt("auto", "auto: cuda (cuda:LOCAL_RANK under torchrun) if available, else cpu")
    num_workers: int = opt(0, "dpo/sft: DataLoader processes decoding images", low=0)
    tailorpo: TailorPOConfig = field(default_factory=TailorPOConfig)  # online: --tailorpo.KEY


def toy_world(model: str) -> toy.World | None:  # the one place train.py asks about the toy
    return toy.world() if model == toy.MODEL else None


def parse_config(argv: list[str]) -> TrainConfig:
    """TrainConfig from the flags (--model=toy: the toy world's defaults), checked by validate."""
    def toy_defaults(given: dict) -> dict:
        world = toy_world(given.get("model", TrainConfig.model))
        return world.defaults[given.get("method", TrainConfig.method)] if world else {}

    cfg = config.parse(TrainConfig, argv, __doc__.split("\n\n")[0], toy_defaults)
    if not cfg.out_dir:  # a folder per method: no run resumes another method's checkpoint
        cfg.out_dir = os.path.join("out", cfg.method)
    validate(cfg, toy_world(cfg.model))
    return cfg


def resolution_multiple(model: str) -> int:
    """The VAE's downsampling x 2 per UNet halving (SD1.5: 8 x 2^3 = 64), from the config files."""
    files = [Path(model) / part / "config.json" for part in ("vae", "unet")]
    if not all(file.is_file() for file in files):
        return 64  # a single SD1.5 file or a hub id
    levels = [len(json.loads(file.read_text())["block_out_channels"]) for file in files]
    return 2 ** (levels[0] - 1) * 2 ** (levels[1] - 1)


def validate(cfg: TrainConfig, world):
    """Every option and path, checked before any model is built or pretrained."""
    def need(ok, message: str):
        if not ok:
            raise config.ConfigError(message)

    pairs = cfg.method in PAIRS
    known = [*rewards.REWARDS, *([world.reward_name] if world else [])]  # the toy's own reward
    names = ", ".join(dict.fromkeys(known))
    need(pairs or not (cfg.ai_feedback or cfg.val_pairs or cfg.data or cfg.data_columns),
         f"--ai_feedback, --val_pairs, --data, --data_columns are for dpo or sft, not {cfg.method}")
    need(not pairs or cfg.data or world, f"--method={cfg.method} needs --data=FOLDER_OR_PARQUET")
    need(not cfg.data or os.path.exists(cfg.data), f"--data={cfg.data}: no such file or folder")
    need(not cfg.prompts or cfg.prompts in evaluate.PROMPT_SETS or os.path.isfile(cfg.prompts),
         f"--prompts={cfg.prompts}: no such file, nor one of {', '.join(evaluate.PROMPT_SETS)}")
    need(world or os.path.exists(cfg.model) or not cfg.model.endswith(weights.SUFFIXES),
         f"--model={cfg.model}: no such file")
    need(cfg.reward or (pairs and not cfg.ai_feedback), f"--method={cfg.method}"
         f"{' --ai_feedback' * cfg.ai_feedback} needs --reward, one of {names}")
    need(cfg.reward in ("", *known), f"--reward: unknown reward {cfg.reward!r}; one of {names}")
    for name in filter(None, cfg.report_rewards.split(",")):
        need(name in known, f"--report_rewards: unknown reward {name!r}; one of {names}")
    for item in filter(None, cfg.reward_paths.split(",")):
        need(os.path.exists(item.partition("=")[2]), f"--reward_paths: {item!r} is not KEY=FILE")
    need(not os.path.isfile(cfg.out_dir), f"--out_dir={cfg.out_dir} is a file; give a folder")
    need(not cfg.device.startswith("cuda") or torch.cuda.is_available(),
         f"--device={cfg.device}: no CUDA device here (or in this torch build); use cpu or auto")
    multiple = 1 if world or not pairs else resolution_multiple(cfg.model)
    need(cfg.resolution % multiple == 0, f"--resolution={cfg.resolution}: must be a multiple of "
         f"{multiple} for {cfg.model} (its VAE and UNet halve the image that often)")
    if cfg.data:
        try:
            columns = data.parse_columns(cfg.data_columns)
            count = data.check_data(cfg.data, columns, int(os.environ.get("WORLD_SIZE", 1)))
        except data.DataError as error:
            raise config.ConfigError(str(error)) from None
        need(cfg.val_pairs < count, f"--val_pairs={cfg.val_pairs}: must be below the {count} "
             f"usable pairs of --data={cfg.data}")


class Precision(torch.nn.Module):
    """The precision policy's autocast around a UNet (or DDP): runs in `dtype`, returns float32."""

    def __init__(self, unet: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.unet = unet
        self.dtype = dtype
        self.device_type = next(unet.parameters()).device.type
        self.config = getattr(unet, "module", unet).config  # the architecture the samplers read

    @property
    def conv_in(self) -> torch.nn.Conv2d:  # where the samplers read the device and dtype
        return getattr(self.unet, "module", self.unet).conv_in

    def forward(self, *args):
        with torch.autocast(self.device_type, self.dtype, enabled=self.dtype != torch.float32):
            return self.unet(*args).float()


class ReferenceModel(Precision):
    """The frozen reference p_ref of DPO: no gradient, under the same autocast as the policy; the
    policy's own UNet with its LoRA adapters off, or (a full fine-tune) a frozen copy of it."""

    def forward(self, *args):
        with torch.no_grad(), lora.lora_disabled(self.unet):
            return super().forward(*args)


def build_models(cfg, world, device, dtype):
    """(sd, trainable params, reference): sd.unet, the policy, trains fp32 weights."""
    torch.manual_seed(cfg.seed)  # the LoRA initialisation: the same on every rank
    sd = world.load_model(device) if world else weights.load_stable_diffusion(cfg.model, device)
    sd.vae.requires_grad_(False).eval().to(dtype)
    sd.text_encoder.requires_grad_(False).eval().to(dtype)
    unet = sd.unet
    if cfg.lora_rank > 0:
        params = lora.inject_lora(unet.to(dtype), cfg.lora_rank, cfg.lora_alpha)  # fp32 A and B
        reference = unet
    else:
        reference = copy.deepcopy(unet).requires_grad_(False).eval()
        params = list(unet.requires_grad_(True).parameters())
    unet.train()
    unet.gradient_checkpointing = cfg.gradient_checkpointing
    return sd, params, ReferenceModel(reference, dtype)


def load_data(cfg, world, rank: int, world_size: int, start_sample: int):
    """(items, val_batches, batches): the pairs or prompts; the validation batches (rank 0 only: it
    alone scores them); this rank's endless training batches from stream position start_sample."""
    if cfg.method in PAIRS:
        folder = cfg.data or world.pairs_folder()
        columns = data.parse_columns(cfg.data_columns)
        pairs = data.PreferencePairs(folder, cfg.resolution, cfg.random_crop, cfg.hflip,
                                     cfg.prompt_dropout, cfg.seed, columns=columns)
        pairs, val = pairs.split_validation(cfg.val_pairs) if cfg.val_pairs else (pairs, None)
        val_batches = val.batches(cfg.batch_size) if val is not None and rank == 0 else []
        batches = data.PairBatches(pairs, cfg.batch_size, start_sample, rank, world_size,
                                   cfg.num_workers)
        return pairs, val_batches, iter(batches)
    default = list(world.prompts) if world else ANIMALS
    prompts = evaluate.read_prompts(cfg.prompts).prompts if cfg.prompts else default
    batches = prompt_batches(prompts, cfg.batch_size, rank, world_size, cfg.seed, start_sample)
    return prompts, [], batches


def prompt_batches(prompts: list[str], batch_size: int, rank: int, world_size: int, seed: int,
                   start_sample: int):
    """Endless {"prompts", "positions"} like data.PairBatches: position p holds
    prompts[order(p // N)[p % N]], order(e) a permutation drawn from seed + e."""
    count = len(prompts)
    orders = {}  # epoch -> its permutation of the prompts
    for step in itertools.count():
        positions = data.batch_positions(step, batch_size, rank, world_size, start_sample)
        for epoch in {p // count for p in positions} - orders.keys():
            generator = torch.Generator().manual_seed(seed + epoch)
            orders[epoch] = torch.randperm(count, generator=generator)
        chosen = [prompts[orders[p // count][p % count]] for p in positions]
        yield {"prompts": chosen, "positions": positions}


def method_step(cfg, sd, reference_unet, batch, reward_fn):
    """One micro-batch of the configured method -> (loss with graph, metrics)."""
    more = {}
    if cfg.ai_feedback:  # the paper's AI feedback: the reward re-ranks every pair (official)
        batch, relabelled = data.relabel_with_reward(batch, reward_fn)
        more["pairs_relabelled"] = float(relabelled)
    if cfg.method == "dpo":
        loss, metrics = dpo.dpo_train_step(sd, reference_unet, batch, cfg.beta, cfg.seed)
    elif cfg.method == "sft":
        loss, metrics = dpo.sft_train_step(sd, batch, cfg.seed)
    else:
        loss, metrics = tailorpo.train_step(sd, reference_unet, batch, reward_fn, cfg.tailorpo,
                                            cfg.seed, cfg.method)
    return loss, {**metrics, **more}


def to_floats(metrics: dict, world_size: int) -> dict[str, float]:
    """{name: float} averaged over ranks: one all-reduce on the device (NCCL), ONE host copy."""
    device = next(v.device for v in metrics.values() if torch.is_tensor(v))
    values = torch.stack([torch.as_tensor(v, device=device).detach().float().reshape(())
                          for v in metrics.values()])
    if world_size > 1:
        dist.all_reduce(values)  # a sum: gloo has no ReduceOp.AVG
    return dict(zip(metrics, (values / world_size).tolist()))


@torch.no_grad()
def evaluation(cfg, sd, reference, items, val_batches, reward_fn) -> dict:
    """dpo/sft: held-out pairs' mean metrics (fixed draws); online: fixed-seed samples' reward."""
    if val_batches:
        rows = [to_floats(method_step(cfg, sd, reference, batch, reward_fn)[1], 1)
                for batch in val_batches]
        return {f"val_{key}": sum(row[key] for row in rows) / len(rows) for key in rows[0]}
    prompts = items[:cfg.eval_prompts]
    online = cfg.tailorpo
    images = evaluate.generate(sd, prompts, cfg.seed + 12345, online.num_steps,
                               online.guidance_scale, online.eta)
    return {"eval_reward": reward_fn(images, prompts).mean().item()}


def final_report(cfg, world, aligned_sd, base_sd, items, reward_fns) -> str:
    """Base vs aligned on held-out seeds, sampled as evaluate.py samples (deviation 5); the toy
    world adds its hidden judge. Returns the report folder."""
    out = os.path.join(cfg.out_dir, "eval")
    if world:
        prompts = evaluate.PromptSet(toy.MODEL, world.report_prompts, world.report_categories)
        reward_fns = {**world.judges, **reward_fns}
        sampling = world.sampling
    else:
        captions = items if isinstance(items, list) else sorted({row[0] for row in items.rows})
        captions = [caption for caption in captions if caption][:64]  # "" is no test of alignment
        prompts = evaluate.PromptSet("", captions, None)
        sampling = {}  # evaluate.compare's defaults: evaluate.py's
    shutil.rmtree(out, ignore_errors=True)  # the report shows this run's images only
    report = evaluate.compare(aligned_sd, prompts.prompts, reward_fns, REPORT_SEEDS, out, base_sd,
                              prompts.categories, prompts.name, **sampling)
    print(evaluate.format_markdown(report))
    return out


def files_written(cfg, plots: list[str], report_folder: str | None) -> list[str]:
    """One line per file the run leaves for its user: where it is and what it is."""
    weights_file = "lora.safetensors" if cfg.lora_rank else "unet"
    weights_use = "the LoRA (evaluate.py --lora)" if cfg.lora_rank else "the UNet (--unet)"
    files = {checkpoint.latest(cfg.out_dir): "the last checkpoint (--resume continues from it)",
             os.path.join(cfg.out_dir, weights_file): weights_use,
             os.path.join(cfg.out_dir, "metrics.jsonl"): "a JSON row per step (plot.py redraws)",
             **{path: "a plot of the metrics" for path in plots}}
    if report_folder:
        files[os.path.join(report_folder, "grid.png")] = "base | aligned on the same seeds"
        files[os.path.join(report_folder, "report.md")] = "the report above"
    return [f"  {path}  {what}" for path, what in files.items()]


def setup_device(cfg) -> tuple[torch.device, torch.dtype]:
    """The device of this process (cuda:LOCAL_RANK under torchrun) and the compute dtype."""
    automatic = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(cfg.device.replace("auto", automatic))
    precision = cfg.mixed_precision.replace("auto", "bf16" if device.type == "cuda" else "no")
    dtype = PRECISIONS[precision]
    if device.type == "cuda":
        device = torch.device("cuda", device.index or int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        tf32 = dtype != torch.float32  # --mixed_precision=no means float32 matmuls, not TF32's
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    return device, dtype


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_config(argv)
    world = toy_world(cfg.model)
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    resumed = checkpoint.find_resume(cfg) if cfg.resume else None  # refuses before any model
    device, dtype = setup_device(cfg)
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    os.makedirs(cfg.out_dir, exist_ok=True)

    # models: the policy (DDP-wrapped across processes), its frozen reference, the reward
    sd, params, reference = build_models(cfg, world, device, dtype)
    ddp_unet = DistributedDataParallel(sd.unet) if world_size > 1 else sd.unet
    train_sd = dataclasses.replace(sd, unet=Precision(ddp_unet, dtype))
    eval_sd = dataclasses.replace(sd, unet=Precision(sd.unet, dtype))
    report_names = [name for name in (cfg.report_rewards or cfg.reward).split(",") if name]
    paths = dict(item.split("=", 1) for item in cfg.reward_paths.split(",") if item)
    reward_names = sorted({cfg.reward, *report_names} - {""})
    reward_fns = evaluate.load_rewards(reward_names, device, paths, world)
    reward_fn = reward_fns.get(cfg.reward)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start = int(resumed["step"]) if resumed else 0
    start_sample = int(resumed["samples_consumed"]) if resumed else 0

    # data: pairs or prompts, from the checkpoint's stream position on
    items, val_batches, batches = load_data(cfg, world, rank, world_size, start_sample)
    identity = checkpoint.data_identity(cfg, items, world_size)
    if resumed:
        checkpoint.restore(resumed, cfg, items, world_size, sd.unet, optimizer, scaler, rank == 0)
    samples_per_step = world_size * cfg.batch_size * cfg.grad_accum  # global: summed over ranks
    log = checkpoint.open_log(cfg.out_dir, start) if rank == 0 else None
    evaluates = rank == 0 and cfg.eval_every > 0 and (bool(val_batches) or cfg.method not in PAIRS)
    if evaluates and start == 0:
        row = evaluation(cfg, eval_sd, reference, items, val_batches, reward_fn)
        log.write(json.dumps({"step": start, **row}) + "\n")

    bar = progress.bar(range(start, cfg.max_steps), desc=f"train {cfg.method}", total=cfg.max_steps,
                       unit="step", disable=rank != 0, initial=start)
    try:
        for step in bar:
            started = time.time()
            sums = {}
            lr = cfg.learning_rate * min(1.0, (step + 1) / max(cfg.warmup_steps, 1))  # deviation 3
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro in range(cfg.grad_accum):  # DDP all-reduces in the last backward only
                sync = world_size == 1 or micro == cfg.grad_accum - 1
                with contextlib.nullcontext() if sync else ddp_unet.no_sync():
                    loss, metrics = method_step(cfg, train_sd, reference, next(batches), reward_fn)
                    scaler.scale(loss / cfg.grad_accum).backward()
                for key, value in {**metrics, "loss": loss.detach()}.items():
                    sums[key] = sums.get(key, 0.0) + value / cfg.grad_accum
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)  # equal on every rank
            row = {"step": step + 1, "lr": lr, **to_floats({**sums, "grad_norm": grad_norm},
                                                           world_size)}
            diverged = not math.isfinite(row["loss"])
            overflow = not math.isfinite(row["grad_norm"])  # fp16 loss scaling skips such a step
            if diverged or (overflow and dtype != torch.float16):
                what = (f"step {step + 1}: loss {row['loss']}, gradient norm {row['grad_norm']}: "
                        "no update (lower --learning_rate)")
                raise SystemExit(checkpoint.stop_line(cfg.out_dir, argv, what))
            scaler.step(optimizer)  # skipped by fp16 loss scaling when the gradients overflowed
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            if rank == 0 and (done % cfg.save_every == 0 or done == cfg.max_steps):
                samples = start_sample + (done - start) * samples_per_step
                try:
                    checkpoint.save(cfg, sd.unet, optimizer, scaler, done, samples, identity)
                except OSError as error:
                    reason = " ".join(str(error).split())
                    what = f"writing the step-{done} checkpoint failed ({reason})"
                    raise SystemExit(checkpoint.stop_line(cfg.out_dir, argv, what)) from None
            if evaluates and (done % cfg.eval_every == 0 or done == cfg.max_steps):
                row.update(evaluation(cfg, eval_sd, reference, items, val_batches, reward_fn))
            if log:
                log.write(json.dumps({**row, "seconds": time.time() - started}) + "\n")
                log.flush()
                bar.set_postfix({LIVE_METRICS[k]: f"{v:.3g}" for k, v in row.items()
                                 if k in LIVE_METRICS})
    except KeyboardInterrupt:
        message = checkpoint.stop_line(cfg.out_dir, argv, "interrupted") if rank == 0 else 130
        raise SystemExit(message) from None

    # save: plots, data counts and the base-vs-aligned report (rank 0)
    if log:
        log.close()
        if cfg.method in PAIRS:
            print(f"data: {items.stats}")
        plots = plot.plot_metrics(log.name)
        report_folder = None
        if report_names:
            base_sd = dataclasses.replace(sd, unet=reference)
            chosen = {name: reward_fns[name] for name in report_names}
            report_folder = final_report(cfg, world, eval_sd, base_sd, items, chosen)
        print("files:", *files_written(cfg, plots, report_folder), sep="\n")
    if world_size > 1:
        del train_sd, ddp_unet  # DDP's reducer holds the group: freed after it, gloo hangs
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (config.ConfigError, weights.CheckpointError, checkpoint.CheckpointMismatch) as error:
        raise SystemExit(f"train.py: {error}") from None
