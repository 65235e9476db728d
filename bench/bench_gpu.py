"""Everything that needs a GPU, in one run of about 7 minutes on one H200/H100, written to one
table (--out).

(a) CUDA-only checks: the DDIM sampler loop under torch.cuda.set_sync_debug_mode("error") (and
    "warn": how many host syncs, where, per step or once); a bf16 Diffusion-DPO step keeps latents,
    noise and x_t in fp32 (train.py's precision policy); step 0 gives loss = log 2 and implicit
    accuracy 0 (LoRA and full fine-tune); our UNet equals diffusers' UNet in fp32 (TF32 off) and is
    as close to that fp32 output as diffusers' own in bf16 (autocast over fp32 weights, and bf16
    weights).
(b) One Diffusion-DPO optimizer step at 512 px (64x64 latents), SD1.5 configs, random weights,
    bf16, --pairs pairs: pairs/s and peak CUDA memory, ours (train.py's models and step) vs the
    official recipes on diffusers' UNet (bench_dpo.py's `dpo_step`: DiffusionDPO train.py for the
    full fine-tune, diffusers' train_diffusion_dpo.py for LoRA), LoRA and full fine-tune, gradient
    checkpointing off and on; model FLOPs utilisation = model FLOPs of the step (counted once per
    mode with torch.utils.flop_counter.FlopCounterMode on our step without checkpointing, so
    recomputation is not counted) / step time / the GPU's dense bf16 peak (H100/H200: 989 TFLOP/s).
(c) Sampling, 50 DDIM steps, CFG 7.5, 512 px, batch 1 and 8, end to end (text encoder + sampling +
    VAE decode, bf16 weights): images/s of sampler.generate vs diffusers' StableDiffusionPipeline
    made of the same random SD1.5-config components in memory (no download), eager and
    torch.compile(unet) (as sample.py --compile; dynamo reset between cases, so each compiles its
    own static graph).
(d) One TailorPO step at 512 px (train.py's method_step, tailorpo.num_steps=20,
    steps_per_rollout=4, gradient checkpointing, brightness reward, 4 prompts, LoRA and full,
    AdamW): seconds and peak memory.
Targets, printed beside the measured ratios: the LoRA DPO step >= 1.0x the pairs/s of diffusers'
LoRA recipe at <= 1.0x its peak memory (both hold one UNet and use it with adapters off as the
reference, so memory can only match); sampling >= 1.1x diffusers' images/s.

Each part (and each case inside it) catches its own failure and records it in the table; the table
is rewritten after every result, so a run cut short keeps what it measured. Timing:
CUDA-synchronised wall clock, warm-up steps first, median of --reps. Memory:
torch.cuda.max_memory_allocated after reset, minus what was allocated before the case was built,
so weights, gradients, optimizer state and activations all count. The time guard: every case
starts only if its estimated duration (ESTIMATE_S, generous for an H100) fits in what is left of
--budget_s (420 s from the start), else its row says "not run"; so a run ends near the budget, well
inside 9 minutes.

Running it on a GPU machine with torch and transformers but without diffusers and without a
package registry (the reference columns need diffusers and peft; without them every "ours" part
still runs and the table says the reference was not measured). diffusers and peft are pure Python
and their other requirements (filelock, huggingface_hub>=1.32, numpy, regex, requests,
safetensors>=0.8, Pillow, accelerate for peft) come with transformers and torch (check with
`python3 -m pip show huggingface_hub safetensors Pillow accelerate`). So: here, in the repo root
(.whl/ is git-ignored)

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 peft==0.21.2

then there, carrying .whl (a machine that returns only $OUT: --out "$OUT/bench_gpu.md"):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
        PYTHONPATH=/tmp/site python3 -m bench.bench_gpu --out "$OUT/bench_gpu.md"

    python -m bench.bench_gpu --smoke    # the same code paths on CPU, tiny configs, ~1 minute
                                         # (the tests run it); writes to a temporary file by
                                         # default: it is not a GPU result
Deviations: none (a benchmark, not a method).
"""

import argparse
import dataclasses
import gc
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import rewards
import sampler
import train
from bench.bench_dpo import (
    build_ours,
    diffusers_models,
    dpo_step,
    fill_weights,
    make_batch,
    model_configs,
    optimizer_step,
    random_sd,
)
from scheduler import NoiseSchedule
from tailorpo import TailorPOConfig
from unet import UNet2DConditionModel

RESULTS = "bench/results/bench_gpu.md"
# Dense bf16 peaks (the 1979 in data sheets is with 2:4 sparsity).
PEAK_BF16_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
}
# The time guard: a generous duration (seconds, on an H100) of the longest case of each part, and
# of one torch.compile sampling case. A smoke run scales them by SMOKE_ESTIMATE_SCALE.
ESTIMATE_S = {"a": 30.0, "b": 60.0, "c": 40.0, "c compiled": 150.0, "d": 90.0}
SMOKE_ESTIMATE_SCALE = 0.01
SECTIONS = {
    "a": "(a) CUDA-only checks",
    "b": "(b) Diffusion-DPO optimizer step",
    "c": "(c) Sampling: 50 DDIM steps, CFG 7.5",
    "d": "(d) TailorPO step",
}


@dataclasses.dataclass
class Setup:
    """What differs between the GPU run and the CPU smoke run; the code paths are the same."""

    smoke: bool
    device: torch.device
    config: str = "sd15"  # bench_dpo.model_configs
    dtype: torch.dtype = torch.bfloat16
    latent: int = 64  # 512 px
    pairs: int = 4
    reps: int = 3
    warmup: int = 2
    sample_steps: int = 50
    sample_batches: tuple = (1, 8)
    tailorpo_steps: int = 20
    prompts: int = 4
    compile_backend: str = "inductor"
    budget_s: float = 420.0
    estimate_scale: float = 1.0
    start: float = dataclasses.field(default_factory=time.perf_counter)

    @classmethod
    def make(cls, args):
        if args.smoke:
            return cls(
                smoke=True,
                device=torch.device("cpu"),
                config="tiny",
                latent=8,
                pairs=1,
                reps=1,
                warmup=1,
                sample_steps=2,
                sample_batches=(1,),
                tailorpo_steps=4,
                prompts=2,
                compile_backend="eager",
                budget_s=args.budget_s,
                estimate_scale=SMOKE_ESTIMATE_SCALE,
            )
        return cls(
            smoke=False,
            device=torch.device("cuda"),
            pairs=args.pairs,
            reps=args.reps,
            budget_s=args.budget_s,
        )

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


class Report:
    """The markdown file, rewritten whole after every added row (sections in a fixed order)."""

    def __init__(self, path: Path, header: list[str]):
        self.path, self.header = path, header
        self.sections = {key: [f"## {title}", "", "not reached"] for key, title in SECTIONS.items()}
        self.footer: list[str] = []
        self.write()

    def start(self, key: str, lines: list[str]):
        self.sections[key] = [f"## {SECTIONS[key]}", "", *lines]
        self.write()

    def add(self, key: str, *lines: str):
        self.sections[key] += lines
        for line in lines:
            print(f"[{key}] {line}", flush=True)
        self.write()

    def write(self):
        body = (
            self.header
            + [line for lines in self.sections.values() for line in (*lines, "")]
            + self.footer
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("\n".join(body) + "\n")


def short_error(error: BaseException) -> str:
    """One line for the table: type, message, and the innermost frame of this repository."""
    root = str(Path(__file__).resolve().parents[1])
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename.startswith(root)]
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    message = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
    return f"{type(error).__name__}: {message}{where}".replace("|", "/")


def free(setup: Setup):
    gc.collect()
    if setup.cuda:
        torch.cuda.empty_cache()


def guarded(setup: Setup, report: Report, key: str, label: str, fn, *args, estimate: str = ""):
    """fn(setup, *args); on failure record it in section `key`, print the traceback, return None (a
    benchmark records every failure and goes on). Frees memory either way. The time guard: when
    the case's estimate (ESTIMATE_S[estimate or key]) exceeds what is left of the budget, the row
    says "not run" and fn does not run."""
    needed = ESTIMATE_S[estimate or key] * setup.estimate_scale
    if setup.left() < needed:
        report.add(
            key,
            f"| {label} | not run: {max(setup.left(), 0):.0f} s left of --budget_s="
            f"{setup.budget_s:.0f}, the case needs about {needed:.1f} s |",
        )
        return None
    try:
        return fn(setup, *args)
    except Exception as error:
        traceback.print_exc()
        report.add(key, f"| {label} | FAILED: {short_error(error)} |")
        return None
    finally:
        free(setup)


def start_peak_memory(setup: Setup) -> int:
    """Free what earlier cases left and reset the CUDA peak; returns the bytes still allocated."""
    free(setup)
    if not setup.cuda:
        return 0
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak_memory_gib(setup: Setup, memory_before: int) -> float | None:
    """The case's peak CUDA memory (GiB) since start_peak_memory; None on CPU (the smoke run)."""
    return (torch.cuda.max_memory_allocated() - memory_before) / 2**30 if setup.cuda else None


def diffusers_status() -> str | None:
    """None if diffusers imports, else why not (the reference columns then say they were not
    measured)."""
    try:
        import diffusers  # noqa: F401
        import peft  # noqa: F401 (the official LoRA recipe's adapters)
        import transformers  # noqa: F401
    except Exception as error:
        name = type(error).__name__
        return f"not measured: diffusers/peft/transformers not importable ({name}: {error})"
    return None


# --------------------------------------------------------------------------------------------------
# (a) CUDA-only checks


def check_sampler_sync_free(setup: Setup):
    """The sampler loop (eta = 1, trajectory recorded, CUDA generator) never synchronises with
    the host."""
    unet_config = model_configs("tiny")[0]
    with torch.device(setup.device):
        unet = UNet2DConditionModel(unet_config).eval()
    fill_weights(unet)
    generator = torch.Generator(setup.device).manual_seed(0)
    cond, uncond = torch.randn(
        2, 2, 77, unet_config.cross_attention_dim, generator=generator, device=setup.device
    )
    latents = torch.randn(2, 4, 8, 8, generator=generator, device=setup.device)
    schedule = NoiseSchedule.sd15()

    def run(steps):
        sampler.sample(
            unet,
            schedule,
            cond,
            uncond,
            latents,
            num_steps=steps,
            eta=1.0,
            generator=generator,
            record=True,
            progress=False,
        )

    run(2)  # warm-up: per-device tables, kernels
    if not setup.cuda:
        run(4)
        return None, "CPU smoke: set_sync_debug_mode is CUDA-only; the same calls ran"
    counts = {}
    places = set()
    for steps in (2, 4):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run(steps)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        counts[steps] = len(syncs)
        places |= {f"{Path(w.filename).name}:{w.lineno}" for w in syncs}
    torch.cuda.set_sync_debug_mode("error")
    try:
        run(4)
        strict = "no sync"
    except RuntimeError as error:
        strict = f"raised {short_error(error)}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    per_step = (counts[4] - counts[2]) / 2
    where = ""
    if places:
        where = " at " + ", ".join(sorted(places))
    detail = (
        f"'error' mode over sample(): {strict}; 'warn' mode: {counts[2]} syncs in 2 steps, "
        f"{counts[4]} in 4 ({per_step:g} per step){where}"
    )
    return strict == "no sync", detail


def check_metrics_one_copy(setup: Setup):
    """train.to_floats: a step's metrics (tensors on the device) reach the host in ONE copy."""
    metrics = {f"metric_{i}": torch.rand((), device=setup.device) for i in range(8)}
    train.to_floats(metrics, 1)  # warm-up
    if not setup.cuda:
        return None, "CPU smoke: set_sync_debug_mode is CUDA-only; the same call ran"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train.to_floats(metrics, 1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    return (
        syncs == 1,
        f"{syncs} host sync(s) for {len(metrics)} metrics (a .cpu() per metric made one each)",
    )


def check_dpo_dtypes(setup: Setup, mode: str):
    """train.py's bf16 DPO step: latents, noise, x_t and the UNet inputs are float32; step 0 is
    log 2 / 0."""
    cfg, sd, params, reference = build_ours(
        "tiny", setup.device, setup.dtype, 8 if mode == "lora" else 0, False, random_lora=False
    )
    seen = {}
    add_noise = sd.schedule.add_noise

    def recording_add_noise(x0, noise, t):
        x_t = add_noise(x0, noise, t)
        seen.update(latents=x0.dtype, noise=noise.dtype, x_t=x_t.dtype)
        return x_t

    sd.schedule.add_noise = recording_add_noise
    inputs = []
    hooks = [
        module.register_forward_pre_hook(lambda _, args: inputs.append(args[0].dtype))
        for module in {id(m): m for m in (sd.unet.unet, reference.unet)}.values()
    ]
    try:
        batch = make_batch(2, 8 * model_configs("tiny")[0].sample_size, setup.device)
        loss, metrics = train.method_step(cfg, sd, reference, batch, None)
        loss.backward()
    finally:
        del sd.schedule.add_noise
        for hook in hooks:
            hook.remove()
    # Policy and reference
    seen["UNet inputs"] = inputs[0] if len(set(inputs)) == 1 else set(inputs)
    dtypes_ok = all(v == torch.float32 for v in seen.values())
    log2 = -F.logsigmoid(torch.zeros(())).item()
    step0_ok = loss.item() == log2 and metrics["implicit_accuracy"].item() == 0
    names = ", ".join(
        f"{k} {dtype_name(v) if isinstance(v, torch.dtype) else v}" for k, v in seen.items()
    )
    return (
        (dtypes_ok, f"{mode}, autocast {dtype_name(setup.dtype)}: {names}"),
        (
            step0_ok,
            f"{mode}: loss {loss.item():.9f} (log 2 = {log2:.9f}), implicit accuracy "
            f"{metrics['implicit_accuracy'].item():g}",
        ),
    )


def check_unet_parity(setup: Setup):
    """Our UNet vs diffusers' on the same weights: fp32 (TF32 off) equal; bf16 as close to fp32
    as theirs."""
    from diffusers import UNet2DConditionModel as DiffusersUNet

    unet_config = model_configs(setup.config)[0]
    with torch.device(setup.device):
        ours = UNet2DConditionModel(unet_config).eval()
        theirs = DiffusersUNet(**unet_config.to_diffusers()).eval()
    fill_weights(ours)
    fill_weights(theirs)
    generator = torch.Generator(setup.device).manual_seed(0)
    size = unet_config.sample_size
    x = torch.randn(2, 4, size, size, generator=generator, device=setup.device)
    t = torch.tensor([981, 21], device=setup.device)
    context = torch.randn(
        2, 77, unet_config.cross_attention_dim, generator=generator, device=setup.device
    )
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            reference = theirs(x, t, context).sample.float()
            errors = {"fp32": ours(x, t, context)}
            with torch.autocast(setup.device.type, setup.dtype):
                errors["autocast ours"] = ours(x, t, context)
                errors["autocast diffusers"] = theirs(x, t, context).sample
            ours.to(setup.dtype)
            theirs.to(setup.dtype)
            errors["bf16 weights ours"] = ours(x.to(setup.dtype), t, context.to(setup.dtype))
            errors["bf16 weights diffusers"] = theirs(
                x.to(setup.dtype), t, context.to(setup.dtype)
            ).sample
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    errors = {
        k: ((v.float() - reference).norm() / reference.norm()).item() for k, v in errors.items()
    }
    ok = errors["fp32"] <= 1e-4 and all(
        errors[f"{kind} ours"] <= 1.5 * errors[f"{kind} diffusers"] + 1e-3
        for kind in ("autocast", "bf16 weights")
    )
    detail = (
        f"{setup.config} config, 2x4x{size}x{size}; relative L2 error vs diffusers fp32: "
        + ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
        + " (pass: fp32 <= 1e-4, ours <= 1.5x diffusers' + 1e-3 in bf16)"
    )
    return ok, detail


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("pass" if ok else "FAIL")


def part_a(setup: Setup, report: Report, reference_missing: str | None):
    report.start("a", ["| check | result | detail |", "|---|---|---|"])
    result = guarded(setup, report, "a", "sampler loop: no host sync", check_sampler_sync_free)
    if result:
        report.add("a", f"| sampler loop: no host sync | {verdict(result[0])} | {result[1]} |")
    result = guarded(setup, report, "a", "training metrics: one host copy", check_metrics_one_copy)
    if result:
        report.add("a", f"| training metrics: one host copy | {verdict(result[0])} | {result[1]} |")
    for mode in ("lora", "full"):
        result = guarded(setup, report, "a", f"bf16 DPO step ({mode})", check_dpo_dtypes, mode)
        if result:
            (dtypes_ok, dtypes), (step0_ok, step0) = result
            report.add(
                "a",
                f"| bf16 DPO step: latents/noise/x_t fp32 | {verdict(dtypes_ok)} | {dtypes} |",
                f"| bf16 DPO step 0: loss log 2, accuracy 0 | {verdict(step0_ok)} | {step0} |",
            )
    if reference_missing:
        report.add("a", f"| UNet parity with diffusers | not run | {reference_missing} |")
    else:
        result = guarded(setup, report, "a", "UNet parity with diffusers", check_unet_parity)
        if result:
            report.add("a", f"| UNet parity with diffusers | {verdict(result[0])} | {result[1]} |")


# --------------------------------------------------------------------------------------------------
# (b) Diffusion-DPO optimizer step


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def peak_tflops(setup: Setup) -> float | None:
    if not setup.cuda:
        return None
    name = torch.cuda.get_device_name()
    return next((value for key, value in PEAK_BF16_TFLOPS.items() if key in name), None)


def measure_dpo(
    setup: Setup, implementation: str, mode: str, checkpointing: bool, count_flops: bool
) -> dict:
    """Build one side, warm up (the first warm-up step under FlopCounterMode if asked), time
    --reps steps."""
    memory_before = start_peak_memory(setup)
    step, models = dpo_step(
        implementation, setup.config, mode, setup.device, setup.dtype, checkpointing
    )
    batch = make_batch(setup.pairs, 8 * setup.latent, setup.device)
    flops = None
    for i in range(setup.warmup):
        if i == 0 and count_flops:
            with FlopCounterMode(display=False) as counter:
                step(batch)
            flops = counter.get_total_flops()
        else:
            step(batch)
    seconds = []
    for _ in range(setup.reps):
        setup.sync()
        start = time.perf_counter()
        loss = step(batch)
        setup.sync()
        seconds.append(time.perf_counter() - start)
    peak = peak_memory_gib(setup, memory_before)
    del step, models
    return {
        "seconds": statistics.median(seconds),
        "peak_gib": peak,
        "flops": flops,
        "loss": loss.item(),
        "pairs": setup.pairs,
    }


def part_b(setup: Setup, report: Report, reference_missing: str | None):
    peak = peak_tflops(setup)
    peak_text = "n/a (no known peak for this device)"
    if peak:
        peak_text = f"{peak:.0f} TFLOP/s dense bf16"
    report.start(
        "b",
        [
            f"{setup.config} configs, random weights, {setup.pairs} pair(s) per step, "
            f"{8 * setup.latent} px ({setup.latent}x{setup.latent} latents), "
            f"{dtype_name(setup.dtype)} autocast, AdamW (ours fused as train.py, official torch's "
            f"default) + clipping; {setup.warmup} warm-up step(s), median of {setup.reps}. Ours: "
            "train.build_models + train.method_step; official (bench_dpo.py): full fine-tune, "
            "DiffusionDPO train.py (fp32 policy, separate bf16 ref_unet); LoRA, diffusers' "
            "train_diffusion_dpo.py (bf16 base UNet, peft adapters, the reference = the same UNet "
            f"with its adapters disabled). MFU against {peak_text}.",
            "Target (LoRA): pairs/s ratio >= 1.0x at peak memory ratio <= 1.0x.",
            "",
            "| mode | grad. ckpt | pairs/s ours / official | ratio | peak GiB ours / official | "
            "ratio | MFU ours / official | loss ours / official | target |",
            "|---|---|---|---|---|---|---|---|---|",
        ],
    )
    flops = {}
    for mode in ("lora", "full"):
        for checkpointing in (False, True):
            label = f"{mode} | {'on' if checkpointing else 'off'}"
            results = {}
            for implementation in ("ours", "official"):
                if implementation == "official" and reference_missing:
                    continue
                count = mode not in flops and not checkpointing
                result = guarded(
                    setup,
                    report,
                    "b",
                    f"{label} ({implementation})",
                    measure_dpo,
                    implementation,
                    mode,
                    checkpointing,
                    count,
                )
                if result:
                    results[implementation] = result
                    if result["flops"]:
                        flops[mode] = result["flops"]
                print(f"[b] {label} {implementation}: {result}", flush=True)
            report.add("b", dpo_row(label, mode, results, flops.get(mode), peak, reference_missing))
    notes = [
        "- Model FLOPs per step, counted by FlopCounterMode on our step without checkpointing: "
        + ", ".join(
            f"{mode} {value / 1e9:.4g} GFLOP ({value / 1e9 / setup.pairs:.4g} per pair)"
            for mode, value in flops.items()
        )
        + " (expected at 512 px from the UNet's 803 GFLOP forward: full 8 x 803 + VAE encode "
        "2 x 1117 = 8658 GFLOP per pair; LoRA about 2 UNet forwards less: ~7050). The same model "
        "FLOPs are used for both sides and for checkpointing on (recomputation is not model FLOPs)."
    ]
    if reference_missing:
        notes.append(f"- Official recipe: {reference_missing}.")
    report.add("b", "", *notes)


def cell(value, spec: str, unit: str = "") -> str:
    return "-" if value is None else format(value, spec) + unit


def ratio(a, b):
    return a / b if a is not None and b else None


def dpo_row(label, mode, results, flops, peak, reference_missing) -> str:
    """One table row of part (b) from {implementation: measure_dpo result} (either may be
    missing)."""
    rows = {name: results.get(name) or {} for name in ("ours", "official")}
    rate = {name: r["pairs"] / r["seconds"] if r else None for name, r in rows.items()}
    memory = {name: r.get("peak_gib") for name, r in rows.items()}
    mfu = {
        name: f"{100 * flops / r['seconds'] / (peak * 1e12):.1f}%" if r and flops and peak else None
        for name, r in rows.items()
    }
    loss = {name: r.get("loss") for name, r in rows.items()}
    speed, memory_ratio = (
        ratio(rate["ours"], rate["official"]),
        ratio(memory["ours"], memory["official"]),
    )
    target = "-"
    if mode == "lora" and speed is not None and memory_ratio is not None:
        target = f"{'met' if speed >= 1.0 and memory_ratio <= 1.0 else 'MISSED'} (>= 1.0x, <= 1.0x)"

    def pair(values, spec):
        theirs = "not measured" if reference_missing else cell(values["official"], spec)
        return f"{cell(values['ours'], spec)} / {theirs}"

    return (
        f"| {label} | {pair(rate, '.2f')} | {cell(speed, '.2f', 'x')} | {pair(memory, '.2f')} | "
        f"{cell(memory_ratio, '.2f', 'x')} | {pair(mfu, '')} | {pair(loss, '.6f')} | {target} |"
    )


# --------------------------------------------------------------------------------------------------
# (c) Sampling


def our_pipeline(setup: Setup):
    """bench_dpo.random_sd's Stable Diffusion in the compute dtype on the device."""
    return random_sd(setup.config, setup.device).to(setup.device, setup.dtype)


def diffusers_pipeline(setup: Setup):
    """StableDiffusionPipeline of bench_dpo.diffusers_models' components (our weights), the SD1.5
    DDIM scheduler and transformers' tokenizer on our vocabulary files; in the compute dtype on the
    device."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    # Test-only helpers: diffusers' side
    from testkit import (
        SD15_SCHEDULER_CONFIG,
        hf_clip_tokenizer,
    )

    unet, vae, text_encoder = diffusers_models(setup.config, setup.device)
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        unet=unet.eval(),
        tokenizer=hf_clip_tokenizer(),
        scheduler=DDIMScheduler(**SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(setup.device, setup.dtype)


def time_sampling(setup: Setup, generate, batch: int, reps: int) -> tuple[float, float]:
    """(seconds of a first 2-step call: warm-up and compilation, best seconds of `reps` full
    calls)."""
    prompts = [f"a photo of an astronaut riding a horse {i}" for i in range(batch)]
    setup.sync()
    start = time.perf_counter()
    generate(prompts, 2)
    setup.sync()
    first = time.perf_counter() - start
    seconds = []
    for _ in range(reps):
        start = time.perf_counter()
        generate(prompts, setup.sample_steps)
        setup.sync()
        seconds.append(time.perf_counter() - start)
    return first, min(seconds)


def part_c(
    setup: Setup, report: Report, reference_missing: str | None, compiled: bool, models: dict
):
    """Eager (compiled=False) builds the two pipelines into `models`; the compiled pass reuses
    them."""
    if not compiled:
        report.start(
            "c",
            [
                f"{8 * setup.latent} px, {setup.sample_steps} steps, guidance 7.5, eta 0, "
                f"{dtype_name(setup.dtype)} weights, images/s end to end (prompts -> images in "
                "[0, 1]); first call (2 steps: warm-up, compilation) separately. Ours: "
                "sampler.generate; diffusers: "
                "StableDiffusionPipeline(output_type='pt'); the same random weights. Best of "
                f"{min(setup.reps, 2) if setup.cuda else 1} timed call(s). torch.compile: "
                f"`torch.compile(unet, dynamic=False)` (backend {setup.compile_backend}), "
                "torch._dynamo.reset() before each case. Target: ours >= 1.1x diffusers' images/s.",
                "",
                "| mode | batch | images/s ours / diffusers | ratio | "
                "first call s ours / diffusers | target |",
                "|---|---|---|---|---|---|",
            ],
        )
        builders = {
            "ours": our_pipeline,
            **({} if reference_missing else {"diffusers": diffusers_pipeline}),
        }
        for name, build in builders.items():
            model = guarded(setup, report, "c", f"building {name}", build)
            if model is not None:
                models[name] = model
    height = 8 * setup.latent
    for batch in setup.sample_batches:
        label = f"{'torch.compile' if compiled else 'eager'} | {batch}"
        results = {}
        for name in ("ours", "diffusers"):
            if name not in models:
                continue
            results[name] = guarded(
                setup,
                report,
                "c",
                f"{label} ({name})",
                sample_case,
                models,
                name,
                batch,
                height,
                compiled,
                estimate="c compiled" if compiled else "",
            )
        report.add("c", sampling_row(label, batch, results, reference_missing))


def sample_case(setup: Setup, models: dict, name: str, batch: int, height: int, compiled: bool):
    """(first call s, best s) of `batch` images with ours (sampler.generate) or diffusers'
    pipeline."""
    if compiled:
        torch._dynamo.reset()
    reps = min(setup.reps, 2) if setup.cuda else 1  # a 50-step batch of 8 takes seconds: best of 2
    if name == "ours":
        sd = models["ours"]
        if compiled:  # as sample.py --compile
            unet = torch.compile(sd.unet, dynamic=False, backend=setup.compile_backend)
            sd = dataclasses.replace(sd, unet=unet)

        def generate(prompts, steps):
            return sampler.generate(
                sd,
                prompts,
                num_steps=steps,
                guidance=7.5,
                height=height,
                width=height,
                progress=False,
            )

        return time_sampling(setup, generate, batch, reps)
    pipe = models["diffusers"]
    original = pipe.unet
    if compiled:
        pipe.unet = torch.compile(original, dynamic=False, backend=setup.compile_backend)

    def generate(prompts, steps):
        return pipe(
            prompts,
            num_inference_steps=steps,
            guidance_scale=7.5,
            height=height,
            width=height,
            output_type="pt",
        ).images

    try:
        return time_sampling(setup, generate, batch, reps)
    finally:
        pipe.unet = original


def sampling_row(label, batch, results, reference_missing) -> str:
    """One table row of part (c) from {name: (first call s, best s) or None}."""
    rate = {name: batch / r[1] if r else None for name, r in results.items()}
    first = {name: r[0] if r else None for name, r in results.items()}
    speed = ratio(rate.get("ours"), rate.get("diffusers"))
    target = "-" if speed is None else f"{'met' if speed >= 1.1 else 'MISSED'} (>= 1.1x)"

    def pair(values, spec):
        theirs = "not measured" if reference_missing else cell(values.get("diffusers"), spec)
        return f"{cell(values.get('ours'), spec)} / {theirs}"

    return (
        f"| {label} | {pair(rate, '.3f')} | {cell(speed, '.2f', 'x')} | {pair(first, '.1f')} | "
        f"{target} |"
    )


# --------------------------------------------------------------------------------------------------
# (d) TailorPO step


def measure_tailorpo(setup: Setup, mode: str) -> dict:
    memory_before = start_peak_memory(setup)
    online = TailorPOConfig(num_steps=setup.tailorpo_steps, steps_per_rollout=4)
    lora_rank = 8 if mode == "lora" else 0
    cfg, sd, params, reference = build_ours(
        setup.config, setup.device, setup.dtype, lora_rank, True, method="tailorpo", tailorpo=online
    )
    adamw = torch.optim.AdamW(params, lr=1e-6, fused=setup.cuda)
    reward_fn = rewards.get_reward("brightness", setup.device)
    batch = {
        "prompts": [f"a photo of a cat {i}" for i in range(setup.prompts)],
        "positions": list(range(setup.prompts)),
    }

    def step():
        loss, metrics = train.method_step(cfg, sd, reference, batch, reward_fn)
        optimizer_step(loss, params, adamw)
        return metrics

    step()  # warm-up (also creates the AdamW state)
    setup.sync()
    start = time.perf_counter()
    metrics = step()
    setup.sync()
    seconds = time.perf_counter() - start
    peak = peak_memory_gib(setup, memory_before)
    return {"seconds": seconds, "peak_gib": peak, "loss": float(metrics["loss"])}


def part_d(setup: Setup, report: Report):
    report.start(
        "d",
        [
            f"train.method_step('tailorpo') + AdamW, {setup.config} configs, random weights, "
            f"{setup.prompts} prompts, {8 * setup.latent} px, "
            f"tailorpo.num_steps={setup.tailorpo_steps}, steps_per_rollout=4, guidance 5, gradient "
            "checkpointing on, brightness reward (decodes every candidate), bf16 autocast; the "
            "second step is timed.",
            "",
            "| mode | seconds per step | peak GiB | loss |",
            "|---|---|---|---|",
        ],
    )
    for mode in ("lora", "full"):
        result = guarded(setup, report, "d", mode, measure_tailorpo, mode)
        if result:
            peak = "-" if result["peak_gib"] is None else f"{result['peak_gib']:.2f}"
            report.add("d", f"| {mode} | {result['seconds']:.2f} | {peak} | {result['loss']:.6f} |")


# --------------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, tiny configs, 1-2 steps: the code paths"
    )
    parser.add_argument(
        "--out",
        default=None,
        help=f"markdown output (default {RESULTS}; with --smoke a "
        "temporary file: a smoke run is not a GPU result)",
    )
    parser.add_argument("--pairs", type=int, default=4, help="(b) preference pairs per DPO step")
    parser.add_argument(
        "--reps", type=int, default=3, help="timed repetitions (median; sampling: best)"
    )
    parser.add_argument(
        "--budget_s",
        type=float,
        default=420.0,
        help="seconds from the start; a case whose estimate no longer fits is not run",
    )
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit(
            "bench_gpu: no CUDA device; on a CPU run `python -m bench.bench_gpu --smoke`"
        )
    out = Path(
        args.out or (Path(tempfile.gettempdir()) / "bench_gpu_smoke.md" if args.smoke else RESULTS)
    )
    if args.smoke and out.resolve() == Path(RESULTS).resolve():
        raise SystemExit(
            f"bench_gpu: --smoke output is not a GPU result; do not write it to {RESULTS}"
        )
    setup = Setup.make(args)
    if setup.cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = (
            True  # as train.py
        )
    reference_missing = diffusers_status()
    versions = f"torch {torch.__version__}"
    if not reference_missing:
        import diffusers
        import transformers

        versions += f", diffusers {diffusers.__version__}, transformers {transformers.__version__}"
    device = torch.cuda.get_device_name() if setup.cuda else "CPU"
    title = (
        "# bench_gpu: SMOKE RUN on CPU with tiny configs -- NOT A GPU RESULT"
        if setup.smoke
        else f"# bench_gpu: {device}"
    )
    command = "python -m bench.bench_gpu " + " ".join(sys.argv[1:] if argv is None else argv)
    report = Report(
        out,
        [
            title,
            "",
            f"{versions}; {device}; command: `{command.strip()}`; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Method and how to read it: "
            "the docstring of bench/bench_gpu.py.",
            "",
        ],
    )
    print(f"bench_gpu: writing {out}", flush=True)
    # (c)'s pipelines, built by the eager pass, reused by the compiled one (last: the slowest)
    models = {}
    steps = [
        ("a", lambda: part_a(setup, report, reference_missing)),
        ("b", lambda: part_b(setup, report, reference_missing)),
        ("d", lambda: part_d(setup, report)),
        ("c", lambda: part_c(setup, report, reference_missing, False, models)),
        ("c", lambda: part_c(setup, report, reference_missing, True, models)),
    ]
    for key, run in steps:
        started = time.perf_counter()
        try:
            run()
        except Exception as error:
            traceback.print_exc()
            report.add(key, f"part FAILED: {short_error(error)}")
        print(
            f"[{key}] done in {time.perf_counter() - started:.1f} s ({setup.left():.0f} s left of "
            "the budget)",
            flush=True,
        )
    report.footer = [f"Total: {time.perf_counter() - setup.start:.0f} s."]
    report.write()
    print(out.read_text())


if __name__ == "__main__":
    main()
