"""train.py end to end on tiny models (CPU, seconds): DPO learns a preference it was shown, resume
is exact, a crash while writing a checkpoint leaves no partial file, 2 DDP processes equal one with
the doubled batch (the real step: every draw is keyed by the sample's stream position), the
precision policy's step-0 identities, a NaN loss stops the run, validation is deterministic, and
every bad option is refused early.

The tiny SD of conftest (tiny_sd_dir) has a random VAE whose posterior std is ~1, so its latents are
mostly sampling noise and no preference survives encoding. `calibrated_sd_dir` fixes that as a
trained VAE would be: logvar = -30 (a deterministic encoder) and a scaling_factor that gives latents
about unit variance.
"""

import errno
import inspect
import io
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import checkpoint
import data
import dpo
import evaluate
import lora
import rewards
import tailorpo
import train
import weights
from bench.bench_data import write_synthetic_pick_a_pic
from config import ConfigError

ONLINE_GAP = 0.001  # brightness gap below which a TailorPO pair is masked
SIZE = 32  # pixels: 4x4 latents with the tiny VAE (downsample factor 8)


@pytest.fixture(scope="module")
def calibrated_sd_dir(tiny_sd_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibrated") / "sd"
    shutil.copytree(tiny_sd_dir, folder)
    vae_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(vae_file)
    state["quant_conv.weight"][4:] = 0  # channels 4..7 are the posterior's logvar
    state["quant_conv.bias"][4:] = -30.0
    save_file(state, vae_file)
    config = json.loads((folder / "vae" / "config.json").read_text())
    (folder / "vae" / "config.json").write_text(json.dumps({**config, "scaling_factor": 4.0}))
    return folder


def bright_dark_pairs(folder, count, seed, labels_0=None):
    """pairs.jsonl of a bright image (jpg_0) and a dark one (noisy flat colours); by default the
    bright one is preferred (label_0 = 1)."""
    generator = torch.Generator().manual_seed(seed)

    def image(level: float) -> torch.Tensor:
        colour = torch.rand(3, 1, 1, generator=generator) * 0.2 + level
        return colour + torch.rand(3, SIZE, SIZE, generator=generator) * 0.1

    captions = [f"picture {i}" for i in range(count)]
    data.write_pairs_jsonl(
        folder, captions, [image(0.65) for _ in captions], [image(0.15) for _ in captions], labels_0
    )
    return folder


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    return bright_dark_pairs(tmp_path_factory.mktemp("pairs"), 64, seed=0)


def run(model, pairs, out, *options):
    train.main(
        [
            f"--model={model}",
            "--method=dpo",
            f"--data={pairs}",
            f"--resolution={SIZE}",
            f"--out_dir={out}",
            "--batch_size=2",
            "--lora_rank=0",
            *options,
        ]
    )


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def checkpoint_weights(out, step):
    return {
        k: v
        for k, v in load_file(os.path.join(out, f"ckpt_{step:08d}.safetensors")).items()
        if k.startswith("model.")
    }


def assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, worst


def test_dpo_learns_the_shown_preference_on_held_out_pairs(calibrated_sd_dir, pairs_dir, tmp_path):
    out = tmp_path / "out"
    run(
        calibrated_sd_dir,
        pairs_dir,
        out,
        "--max_steps=120",
        "--batch_size=4",
        "--learning_rate=1e-3",
        "--beta=500",
        "--save_every=120",
        "--val_pairs=8",
        "--eval_every=40",
    )
    rows = metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 121))
    assert (out / "implicit_accuracy.png").exists() and (out / "loss.png").exists()
    val = [r["val_implicit_accuracy"] for r in rows if "val_implicit_accuracy" in r]
    # steps 0, 40, 80, 120; ties count as wrong
    assert len(val) == 4 and val[0] == 0.0 and val[-1] > 0.5

    # held-out pairs (new images and prompts): policy vs the untouched base model, 8 fresh draws
    held_out = data.PreferencePairs(
        bright_dark_pairs(tmp_path / "held_out", 32, seed=1), SIZE, hflip=False, prompt_dropout=0.0
    )
    batch = next(iter(data.PairBatches(held_out, 32)))
    policy = weights.load_stable_diffusion(calibrated_sd_dir)
    reference = policy.unet
    policy.unet = weights.load_unet(out / "unet")  # the exported diffusers-format UNet folder
    with torch.no_grad():
        draws = [dpo.dpo_train_step(policy, reference, batch, 500.0, seed)[1] for seed in range(8)]
    accuracy = sum(m["implicit_accuracy"].item() for m in draws) / len(draws)
    margin = sum(m["reward_margin"].item() for m in draws) / len(draws)
    assert accuracy > 0.75 and margin > 0, (accuracy, margin)  # 0 at the start: policy == reference


def test_validation_is_deterministic(calibrated_sd_dir, pairs_dir, tmp_path):
    for name in ("a", "b"):
        run(
            calibrated_sd_dir,
            pairs_dir,
            tmp_path / name,
            "--max_steps=2",
            "--val_pairs=6",
            "--eval_every=1",
        )
    a, b = (
        [r["val_loss"] for r in metrics(tmp_path / name) if "val_loss" in r] for name in ("a", "b")
    )
    assert len(a) == 3 and a == b  # steps 0, 1, 2; the same numbers on a rerun
    assert a[0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 0


def test_exported_unet_loads_in_diffusers(calibrated_sd_dir, pairs_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    run(calibrated_sd_dir, pairs_dir, tmp_path, "--max_steps=1")
    ours = weights.load_unet(tmp_path / "unet")
    theirs = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    x, context = torch.randn(2, 4, 4, 4), torch.randn(2, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(x, 10, context), theirs(x, 10, context).sample, atol=1e-5, rtol=1e-4
        )


class Crash(Exception):
    pass


def crash_at_call(monkeypatch, call_number, function_owner, name):
    """Make function_owner.name raise Crash on its call_number-th call (1-based)."""
    original, calls = getattr(function_owner, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == call_number:
            raise Crash(f"simulated crash in {name}")
        return original(*args, **kwargs)

    monkeypatch.setattr(function_owner, name, wrapper)


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory):
    """Pick-a-Pic-like parquet shards (bench_data's generator): 80 rows in row groups of 10, ties
    included."""
    folder = tmp_path_factory.mktemp("parquet")
    write_synthetic_pick_a_pic(folder, 80, rows_per_group=10, sizes=(SIZE, 40), distinct_images=8)
    return folder


@pytest.mark.parametrize("lora_rank, kind", [(0, "jsonl"), (2, "jsonl"), (2, "parquet")])
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(
    calibrated_sd_dir, pairs_dir, parquet_dir, tmp_path, monkeypatch, lora_rank, kind
):
    pairs_dir = parquet_dir if kind == "parquet" else pairs_dir
    options = ["--max_steps=6", "--save_every=3", "--grad_accum=2", f"--lora_rank={lora_rank}"]
    run(calibrated_sd_dir, pairs_dir, tmp_path / "straight", *options)
    with monkeypatch.context() as patch:
        # inside step 5, after the step-3 checkpoint
        crash_at_call(patch, 2 * 4 + 1, dpo, "dpo_train_step")
        with pytest.raises(Crash):
            run(calibrated_sd_dir, pairs_dir, tmp_path / "resumed", *options)
    assert checkpoint.latest(tmp_path / "resumed").endswith("ckpt_00000003.safetensors")
    run(calibrated_sd_dir, pairs_dir, tmp_path / "resumed", *options, "--resume")
    straight, resumed = (checkpoint_weights(tmp_path / name, 6) for name in ("straight", "resumed"))
    assert_same_weights(straight, resumed, atol=0.0)  # bit-exact
    rows = [metrics(tmp_path / name) for name in ("straight", "resumed")]
    assert [r["step"] for r in rows[1]] == list(range(1, 7))
    assert [r["loss"] for r in rows[0]] == [r["loss"] for r in rows[1]]
    # the exported weights are the checkpoint's
    exported = weights.load_unet(calibrated_sd_dir / "unet")
    if lora_rank:
        lora.inject_lora(exported, lora_rank, alpha=4.0)  # train.py's default lora_alpha
        lora.load_lora(exported, tmp_path / "resumed" / "lora.safetensors")
    else:
        exported = weights.load_unet(tmp_path / "resumed" / "unet")
    assert_same_weights(
        {f"model.{k}": v for k, v in checkpoint.trainable(exported).items()}, resumed, 1e-6
    )


def trained_positions(monkeypatch) -> list[list[int]]:
    """The stream positions of every training micro-batch dpo_train_step sees from now on."""
    original, seen = dpo.dpo_train_step, []

    def recording(sd, reference_unet, batch, *args):
        seen.append(list(batch["positions"]))
        return original(sd, reference_unet, batch, *args)

    monkeypatch.setattr(dpo, "dpo_train_step", recording)
    return seen


def test_resume_with_a_smaller_batch_continues_after_the_samples_consumed(
    calibrated_sd_dir, pairs_dir, tmp_path, monkeypatch
):
    run(calibrated_sd_dir, pairs_dir, tmp_path, "--max_steps=2", "--batch_size=4")  # positions 0-7
    seen = trained_positions(monkeypatch)
    run(calibrated_sd_dir, pairs_dir, tmp_path, "--max_steps=4", "--batch_size=2", "--resume")
    assert seen == [[8, 9], [10, 11]]


def test_checkpoint_records_the_samples_consumed_and_the_configuration(
    calibrated_sd_dir, pairs_dir, tmp_path
):
    run(calibrated_sd_dir, pairs_dir, tmp_path, "--max_steps=3", "--batch_size=2", "--grad_accum=2")
    metadata = checkpoint.read_metadata(checkpoint.latest(tmp_path))
    # steps x batch x accumulation (one process)
    assert int(metadata["samples_consumed"]) == 3 * 2 * 2
    assert json.loads(metadata["config"])["batch_size"] == 2
    assert json.loads(metadata["data_identity"])


@pytest.mark.parametrize(
    "option, saved", [("--method=sft", "dpo"), ("--lora_rank=4", "2"), ("--seed=1", "0")]
)
def test_resume_refuses_a_checkpoint_of_another_run_in_one_line(
    calibrated_sd_dir, pairs_dir, tmp_path, monkeypatch, option, saved
):
    run(calibrated_sd_dir, pairs_dir, tmp_path, "--max_steps=1", "--lora_rank=2")

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the refusal")

    monkeypatch.setattr(weights, "load_stable_diffusion", no_model)
    with pytest.raises(checkpoint.CheckpointMismatch) as refusal:
        run(
            calibrated_sd_dir,
            pairs_dir,
            tmp_path,
            "--max_steps=2",
            "--lora_rank=2",
            option,
            "--resume",
        )
    name = option.split("=")[0]
    assert f"{name}={saved}" in str(refusal.value) and len(str(refusal.value).splitlines()) == 1


def test_resume_says_where_it_continues_from_or_that_it_starts_fresh(
    calibrated_sd_dir, pairs_dir, tmp_path, capsys
):
    run(calibrated_sd_dir, pairs_dir, tmp_path / "missing", "--max_steps=1", "--resume")
    assert f"no folder {tmp_path / 'missing'}" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    run(calibrated_sd_dir, pairs_dir, tmp_path / "empty", "--max_steps=1", "--resume")
    assert f"no checkpoint in {tmp_path / 'empty'}" in capsys.readouterr().err
    run(calibrated_sd_dir, pairs_dir, tmp_path / "empty", "--max_steps=2", "--resume")
    expected = f"resuming from {tmp_path / 'empty' / 'ckpt_00000001.safetensors'} (step 1)"
    assert expected in capsys.readouterr().err


def test_crash_while_writing_a_checkpoint_leaves_no_partial_file(
    calibrated_sd_dir, pairs_dir, tmp_path, monkeypatch
):
    original, calls = checkpoint.save_file, []

    def dies_on_third_write(
        tensors, path, metadata=None
    ):  # writes: ckpt_2, its UNet export, ckpt_4
        calls.append(path)
        if len(calls) < 3:
            return original(tensors, path, metadata=metadata)
        with open(path, "wb") as f:
            f.write(b"\x00" * 100)  # a partial file...
        raise Crash("killed while writing")  # ...and the process dies

    monkeypatch.setattr(checkpoint, "save_file", dies_on_third_write)
    with pytest.raises(Crash):
        run(calibrated_sd_dir, pairs_dir, tmp_path, "--max_steps=4", "--save_every=2")
    assert calls[-1].endswith(f"ckpt_00000004.safetensors.tmp{os.getpid()}")
    assert sorted(os.listdir(tmp_path)) == ["ckpt_00000002.safetensors", "metrics.jsonl", "unet"]
    monkeypatch.setattr(checkpoint, "save_file", original)
    # it loads
    run(calibrated_sd_dir, pairs_dir, tmp_path, "--max_steps=4", "--save_every=2", "--resume")
    assert [row["step"] for row in metrics(tmp_path)] == [1, 2, 3, 4]


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(
    calibrated_sd_dir, pairs_dir, tmp_path, monkeypatch
):
    original = dpo.dpo_train_step

    def nan_at_step_4(*args):
        loss, metrics = original(*args)
        nan_at_step_4.calls += 1
        return loss * (float("nan") if nan_at_step_4.calls == 4 else 1.0), metrics

    nan_at_step_4.calls = 0
    monkeypatch.setattr(dpo, "dpo_train_step", nan_at_step_4)
    with pytest.raises(
        SystemExit, match=r"step 4: loss nan.*the last good checkpoint is .*ckpt_00000002"
    ):
        run(calibrated_sd_dir, pairs_dir, tmp_path, "--max_steps=6", "--save_every=2")
    assert checkpoint.latest(tmp_path).endswith("ckpt_00000002.safetensors")
    assert all(v.isfinite().all() for v in checkpoint_weights(tmp_path, 2).values())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("lora_rank", [0, 2])
def test_step_zero_is_log_2_under_mixed_precision(
    calibrated_sd_dir, pairs_dir, tmp_path, precision, lora_rank
):
    """The policy equals its reference at step 0 under the same autocast: loss log 2, implicit
    accuracy 0."""
    run(
        calibrated_sd_dir,
        pairs_dir,
        tmp_path,
        "--max_steps=2",
        f"--lora_rank={lora_rank}",
        f"--mixed_precision={precision}",
        "--learning_rate=1e-3",
    )
    first = metrics(tmp_path)[0]
    assert (
        first["loss"] == pytest.approx(math.log(2), abs=1e-7) and first["implicit_accuracy"] == 0.0
    )
    # fp32 trainables
    assert all(v.dtype == torch.float32 for v in checkpoint_weights(tmp_path, 2).values())


def ddp_worker(rank, port, argv):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
    )
    torch.set_num_threads(1)
    train.main(argv)


def run_two_processes(argv, timeout=600):
    """train.main(argv) in 2 gloo processes; fails (rather than hangs) if they do not finish in
    time."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = torch.multiprocessing.start_processes(
        ddp_worker, args=(port, argv), nprocs=2, join=False, start_method="fork"
    )
    deadline = time.time() + timeout
    while not context.join(timeout=1):
        if time.time() > deadline:  # a hang guard, not a speed claim
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"the DDP processes did not finish within {timeout} s: a hang")


def record_first_gradients(monkeypatch, folder):
    """Each process saves its gradients at its first clip_grad_norm_ (after DDP's all-reduce, before
    any optimizer step) to folder/grads_<world size>_<rank>.pt. The fork of run_two_processes
    inherits the patch."""
    original = torch.nn.utils.clip_grad_norm_
    done = set()

    def recording(params, *args, **kwargs):
        params = list(params)
        key = (os.getpid(), os.environ.get("WORLD_SIZE", "1"))
        if key not in done:
            done.add(key)
            name = f"grads_{os.environ.get('WORLD_SIZE', '1')}_{os.environ.get('RANK', '0')}.pt"
            torch.save([p.grad.detach().clone() for p in params], os.path.join(folder, name))
        return original(params, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)


def gradient_gap(folder) -> float:
    """max |g_one - g_two| / max |g_one| over the first step's gradients of the two runs."""
    one = torch.load(os.path.join(folder, "grads_1_0.pt"), weights_only=True)
    two = torch.load(os.path.join(folder, "grads_2_0.pt"), weights_only=True)
    scale = max(g.abs().max().item() for g in one)
    assert scale > 0
    return max((a - b).abs().max().item() for a, b in zip(one, two)) / scale


# The first step's gradients of 1 process x batch 4 and of 2 processes x batch 2 are the same sums
# of the same per-sample terms in another order (DDP averages two half-batch means; convolutions run
# at another batch size). Each layer's gradient entry sums n <= 4 * 16 * 64 = 4096 products (batch,
# 4x4 latent positions, 64 channels); rounding errors of such sums grow like sqrt(n) * eps = 64 eps,
# and through ~10 layers of the tiny UNet (and TailorPO's 3 sampler steps) about 10x that: 1e3 * eps
# (1.2e-4) of the largest gradient. A wrong normalisation or a repeated sample changes gradients by
# tens of percent.
GRADIENT_GAP = 1e3 * torch.finfo(torch.float32).eps


def assert_updates_agree(one: dict, two: dict, start: dict):
    """Adam's first steps are lr * m / (sqrt(v) + eps), nearly lr * sign(g): where |g| is at
    rounding level the sign is a coin, and any CPU may flip a few weights by a whole step. What
    holds on every CPU: the updates agree as vectors, ||u_one - u_two|| <= 5% of ||u_one|| (a
    flipped weight adds
    2 lr to the gap; 5% allows flipping ~0.06% of the weights; a wrong gradient moves most)."""
    update_one = torch.cat([(one[k] - start[k]).flatten() for k in one])
    update_two = torch.cat([(two[k] - start[k]).flatten() for k in one])
    assert update_one.norm() > 0
    assert (update_one - update_two).norm() <= 0.05 * update_one.norm()


def test_two_ddp_processes_equal_one_process_with_the_doubled_batch(
    calibrated_sd_dir, pairs_dir, tmp_path, monkeypatch
):
    common = [
        f"--model={calibrated_sd_dir}",
        "--method=dpo",
        f"--data={pairs_dir}",
        f"--resolution={SIZE}",
        "--lora_rank=0",
        "--max_steps=2",
        "--learning_rate=1e-4",
        "--beta=500",
    ]
    record_first_gradients(monkeypatch, tmp_path)
    train.main(common + ["--batch_size=4", f"--out_dir={tmp_path / 'one'}"])
    run_two_processes(common + ["--batch_size=2", f"--out_dir={tmp_path / 'two'}"])
    assert gradient_gap(tmp_path) <= GRADIENT_GAP
    one, two = checkpoint_weights(tmp_path / "one", 2), checkpoint_weights(tmp_path / "two", 2)
    start = {
        f"model.{k}": v
        for k, v in weights.load_unet(calibrated_sd_dir / "unet").state_dict().items()
    }
    assert_updates_agree(one, two, start)
    first = [metrics(tmp_path / name)[0] for name in ("one", "two")]  # averaged over the ranks
    assert first[0]["loss"] == pytest.approx(first[1]["loss"], rel=GRADIENT_GAP)


def record_kept_pairs(monkeypatch, folder):
    """Each process appends the number of pairs its loss kept at every call to
    folder/kept_<rank>."""
    original = tailorpo.dpo_loss

    def recording(*args, mask=None, **kwargs):
        name = f"kept_{os.environ.get('WORLD_SIZE', '1')}_{os.environ.get('RANK', '0')}"
        with open(os.path.join(folder, name), "a") as f:
            f.write(f"{int(mask.sum().item()) if mask is not None else -1}\n")
        return original(*args, mask=mask, **kwargs)

    monkeypatch.setattr(tailorpo, "dpo_loss", recording)


def test_ddp_online_run_with_unequal_kept_pairs_equals_one_process(
    calibrated_sd_dir, tmp_path, monkeypatch
):
    """--tailorpo.min_reward_gap masks pairs; with ranks keeping different numbers of them, 2
    processes x 2 prompts still equal 1 process x 4 prompts (the loss divides by a count that does
    not depend on how the batch is split)."""
    common = [
        f"--model={calibrated_sd_dir}",
        "--method=tailorpo",
        "--reward=brightness",
        "--max_steps=1",
        "--tailorpo.num_steps=3",
        f"--tailorpo.min_reward_gap={ONLINE_GAP}",
        "--eval_every=0",
        "--learning_rate=1e-2",
        "--lora_rank=2",
    ]
    record_first_gradients(monkeypatch, tmp_path)
    record_kept_pairs(monkeypatch, tmp_path)
    train.main(common + ["--batch_size=4", f"--out_dir={tmp_path / 'one'}"])
    run_two_processes(common + ["--batch_size=2", f"--out_dir={tmp_path / 'two'}"])
    kept = [int((tmp_path / f"kept_2_{rank}").read_text().split()[0]) for rank in (0, 1)]
    assert kept[0] != kept[1] and max(kept) > 0, kept  # the case under test
    assert gradient_gap(tmp_path) <= GRADIENT_GAP
    one = {k: v for k, v in checkpoint_weights(tmp_path / "one", 1).items() if "lora_B" in k}
    two = {k: v for k, v in checkpoint_weights(tmp_path / "two", 1).items() if "lora_B" in k}
    # LoRA's B starts at 0
    assert_updates_agree(one, two, {k: torch.zeros_like(v) for k, v in one.items()})


def test_online_method_logs_fresh_sample_rewards_and_the_relabel_count(
    calibrated_sd_dir, pairs_dir, tmp_path
):
    train.main(
        [
            f"--model={calibrated_sd_dir}",
            "--method=tailorpo",
            "--reward=brightness",
            "--max_steps=2",
            "--batch_size=2",
            "--tailorpo.num_steps=2",
            "--eval_every=1",
            "--eval_prompts=2",
            f"--out_dir={tmp_path / 'online'}",
        ]
    )
    rows = metrics(tmp_path / "online")
    assert [r["step"] for r in rows if "eval_reward" in r] == [0, 1, 2]
    assert all((tmp_path / "online" / name).exists() for name in ("reward.png", "lora.safetensors"))
    dark_preferred = bright_dark_pairs(tmp_path / "dark", 8, seed=2, labels_0=[0.0] * 8)
    run(
        calibrated_sd_dir,
        dark_preferred,
        tmp_path / "ai",
        "--max_steps=2",
        "--ai_feedback",
        "--reward=brightness",
    )
    # brightness flips every label
    assert all(r["pairs_relabelled"] == 2 for r in metrics(tmp_path / "ai"))


def test_final_report_scores_with_the_reward_weights_it_was_given(calibrated_sd_dir, tmp_path):
    """--reward_paths reach the report: its aesthetic means are those of the reward built from the
    given CLIP folder and MLP file, rescored here on the images it saved."""
    from testkit import L14, hf_clip, write_aesthetic_pth

    hf_clip(*L14).save_pretrained(tmp_path / "clip")
    write_aesthetic_pth(tmp_path / "mlp.pth", L14[0].projection_dim)
    paths = {"clip_path": tmp_path / "clip", "mlp_path": tmp_path / "mlp.pth"}
    folder = bright_dark_pairs(tmp_path / "pairs", 4, seed=4)
    reward_paths = ",".join(f"{key}={path}" for key, path in paths.items())
    run(calibrated_sd_dir, folder, tmp_path / "out", "--max_steps=1", "--ai_feedback",
        "--reward=aesthetic", f"--reward_paths={reward_paths}")
    report = json.loads((tmp_path / "out" / "eval" / "report.json").read_text())
    reward = rewards.get_reward("aesthetic", **paths)
    for kind in ("base", "aligned"):
        files = sorted((tmp_path / "out" / "eval" / "images" / kind).glob("p*_s*.png"))
        images = torch.stack([rewards.read_image(path) for path in files])
        captions = [f"picture {int(path.name[1:4])}" for path in files]
        expected = reward(images, captions).double().mean().item()
        # float32 scores of batches of another size: rounding, 100 float32 eps
        assert report["rewards"]["aesthetic"][kind]["mean"] == pytest.approx(expected, rel=1e-5)


def test_final_report_samples_as_evaluate_py_on_non_empty_captions(
    calibrated_sd_dir, tmp_path, monkeypatch
):
    """Diffusion-DPO's report on a real model: DDIM 50 steps, CFG 7.5, eta 0 (evaluate.py's
    defaults, not TailorPO's 20 steps and CFG 5), and never the empty caption."""
    folder = bright_dark_pairs(tmp_path / "pairs", 8, seed=3)
    rows = (folder / "pairs.jsonl").read_text().splitlines()
    rows[0] = json.dumps({**json.loads(rows[0]), "caption": ""})
    (folder / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    calls = []
    signature = inspect.signature(evaluate.compare)

    def recording(*args, **kwargs):
        call = signature.bind(*args, **kwargs)
        call.apply_defaults()
        calls.append(call.arguments)
        raise Crash("report recorded")

    monkeypatch.setattr(evaluate, "compare", recording)
    with pytest.raises(Crash):
        run(
            calibrated_sd_dir,
            folder,
            tmp_path / "out",
            "--max_steps=1",
            "--report_rewards=brightness",
        )
    sampling = {key: calls[0][key] for key in ("num_steps", "guidance", "eta")}
    assert sampling == {"num_steps": 50, "guidance": 7.5, "eta": 0.0}
    assert "" not in calls[0]["prompts"] and len(calls[0]["prompts"]) == 7


@pytest.fixture
def tf32_flags():
    """torch's two TF32 switches, restored by assignment after the test: they are attributes that
    torch's backend modules compute on access, which monkeypatch (pytest >= 9.2) cannot undo."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("precision, tf32", [("no", False), ("bf16", True)])
def test_tf32_only_under_mixed_precision(monkeypatch, tf32_flags, precision, tf32):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    torch.backends.cuda.matmul.allow_tf32 = not tf32
    torch.backends.cudnn.allow_tf32 = not tf32
    cfg = train.TrainConfig(device="cuda", mixed_precision=precision)
    train.setup_device(cfg)
    assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32


def test_a_redirected_run_writes_little_progress_and_lists_its_files(
    calibrated_sd_dir, pairs_dir, tmp_path
):
    """stderr to a file: about 20 progress lines whatever the number of steps (issue 21: one run
    wrote 178 KB); stdout ends with one line per file written, each of which exists."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
    argv = [
        f"--model={calibrated_sd_dir}",
        "--method=dpo",
        f"--data={pairs_dir}",
        f"--resolution={SIZE}",
        "--batch_size=1",
        "--lora_rank=2",
        "--max_steps=60",
        "--save_every=60",
        "--learning_rate=1e-4",
        f"--out_dir={tmp_path / 'out'}",
    ]
    with open(tmp_path / "stderr", "w") as stderr:
        result = subprocess.run(
            [sys.executable, script, *argv],
            cwd=tmp_path,
            stderr=stderr,
            stdout=subprocess.PIPE,
            text=True,
        )
    assert result.returncode == 0
    progress_log = (tmp_path / "stderr").read_text()
    assert len(progress_log.encode()) < 20_000
    assert len(re.split("[\r\n]+", progress_log.strip())) <= 25  # 60 steps, a line every ~5%
    listed = result.stdout.split("files:\n")[1].splitlines()
    paths = [line.split()[0] for line in listed]
    assert all(os.path.exists(path) for path in paths), listed
    names = {os.path.basename(path) for path in paths}
    assert {"lora.safetensors", "metrics.jsonl", "loss.png", "ckpt_00000060.safetensors"} <= names
    assert "wrote" not in result.stdout.split() and "data: prompts" not in result.stdout


def test_config_flags_files_and_help(pairs_dir, tmp_path, capsys):
    cfg = train.parse_config(
        [
            "--method",
            "sft",
            f"--data={pairs_dir}",
            "--val_pairs=8",
            "--tailorpo.beta=10",
            "--ai-feedback",
            "--reward=brightness",
            "--hflip=0",
        ]
    )
    assert (cfg.method, cfg.tailorpo.beta, cfg.ai_feedback, cfg.hflip) == ("sft", 10.0, True, False)
    (tmp_path / "run.txt").write_text(
        f"# comment\n--method=sft --data={pairs_dir}  # trailing comment"
        "\n--beta=100 --val_pairs=8\n"
    )
    cfg = train.parse_config([f"@{tmp_path / 'run.txt'}", "--beta=7"])  # the command line wins
    assert (cfg.method, cfg.data, cfg.beta) == ("sft", str(pairs_dir), 7.0)
    with pytest.raises(SystemExit):
        train.parse_config(["--help"])
    listed = capsys.readouterr().out
    assert all(f"--{key}" in listed for key in train.config.flat_fields(train.TrainConfig))
    assert "--tailorpo.guidance_scale" in listed and "Diffusion-DPO beta" in listed


BAD_OPTIONS = {  # argv -> what the one-line error must say
    ("--bta=1",): "unknown option '--bta=1' (did you mean --beta?)",
    ("--tailorpo.num_steps=2.5",): "--tailorpo.num_steps: invalid int value: '2.5'",
    ("--hflip=maybe",): "--hflip: invalid boolean value: 'maybe'",
    ("--method=ppo",): "--method: invalid choice: 'ppo'",
    ("--method=dpo", "--model=sd15"): "--method=dpo needs --data",
    ("--method=dpo", "--data=/nonexistent"): "--data=/nonexistent: no such file or folder",
    ("--method=tailorpo", "--model=sd15"): "--method=tailorpo needs --reward",
    ("--tailorpo.log_prob_reduction=Mean",): "log_prob_reduction",
    ("--tailorpo.next_state=Random",): "next_state",
    ("--tailorpo.eta=0",): "eta",
    ("--tailorpo.num_steps=10", "--tailorpo.train_start_step=50"): "train_start_step",
    ("--model=missing.safetensors", "--data=."): "--model=missing.safetensors: no such file",
    ("--mixed_precision=fp8",): "--mixed_precision: invalid choice: 'fp8'",
}


@pytest.mark.parametrize("argv", list(BAD_OPTIONS))
def test_bad_options_are_refused_before_any_model_is_built(argv):
    with pytest.raises(ConfigError, match=re.escape(BAD_OPTIONS[argv])):
        train.parse_config(list(argv))


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> dict:
    """Paths a user may give --data that hold no pairs."""
    folder = tmp_path_factory.mktemp("bad_data")
    (folder / "empty").mkdir()
    (folder / "notes.txt").write_text("not pairs\n")
    (folder / "fake.parquet").write_bytes(b"PAR1 this is not parquet")
    return {name: folder / name for name in ("empty", "notes.txt", "fake.parquet")}


@pytest.mark.parametrize("name", ["empty", "notes.txt", "fake.parquet"])
def test_data_without_pairs_is_refused_in_one_line_naming_it(bad_data, name):
    with pytest.raises(ConfigError) as refusal:
        train.parse_config(["--method=dpo", f"--data={bad_data[name]}"])
    assert name in str(refusal.value) and len(str(refusal.value).splitlines()) == 1


def test_data_columns_naming_a_missing_column_is_refused_before_any_model(parquet_dir):
    with pytest.raises(ConfigError, match="jpg_0"):  # the message lists the file's columns
        train.parse_config(["--method=dpo", f"--data={parquet_dir}", "--data_columns=jpg_0=chosen"])


BAD_DATA_OPTIONS = {  # options after --method=dpo --data=PAIRS --model=TINY_SD -> the error
    ("--resolution=0",): "--resolution must be >= 1",
    ("--resolution=24",): "--resolution=24: must be a multiple of 16",  # 8x VAE, UNet halves once
    ("--val_pairs=64",): "--val_pairs=64: must be below the 64 usable pairs",
    ("--device=cuda",): "--device=cuda: no CUDA device here",
}


def jpeg(level: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), (level, level, level)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def chosen_rejected_parquet(tmp_path_factory):
    """A binarized preference set as the hub's `datasets` writes it (issue 22): prompt, chosen,
    rejected (the winner first, no label), images as {bytes, path} structs, one image null."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("chosen_rejected")
    cell = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    chosen = [{"bytes": jpeg(220), "path": None}] * 7 + [None]
    rejected = [{"bytes": jpeg(30), "path": None}] * 8
    table = pa.table({"prompt": [f"picture {i}" for i in range(8)],
                      "chosen": pa.array(chosen, cell), "rejected": pa.array(rejected, cell)})
    pq.write_table(table, folder / "train-0.parquet", row_group_size=4)
    return folder


def test_a_chosen_rejected_parquet_trains_with_data_columns(calibrated_sd_dir,
                                                            chosen_rejected_parquet, tmp_path):
    run(calibrated_sd_dir, chosen_rejected_parquet, tmp_path, "--max_steps=2",
        "--data_columns=caption=prompt,jpg_0=chosen,jpg_1=rejected")
    assert [row["step"] for row in metrics(tmp_path)] == [1, 2]
    saved = json.loads(checkpoint.read_metadata(checkpoint.latest(tmp_path))["config"])
    assert saved["data_columns"] == "caption=prompt,jpg_0=chosen,jpg_1=rejected"


@pytest.mark.parametrize("options", list(BAD_DATA_OPTIONS))
def test_options_that_do_not_fit_the_data_or_the_model_are_refused(
    calibrated_sd_dir, pairs_dir, monkeypatch, options
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["--method=dpo", f"--data={pairs_dir}", f"--model={calibrated_sd_dir}", *options]
    with pytest.raises(ConfigError, match=re.escape(BAD_DATA_OPTIONS[options])):
        train.parse_config(argv)


def test_out_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("")
    with pytest.raises(ConfigError, match="--out_dir=.* is a file"):
        train.parse_config([f"--out_dir={tmp_path / 'out'}"])


def test_each_method_writes_to_its_own_default_folder():
    """The README's two toy commands: `python train.py` and `python train.py --method=tailorpo`."""
    dpo_run = train.parse_config([])
    tailorpo_run = train.parse_config(["--method=tailorpo"])
    assert dpo_run.out_dir == os.path.join("out", "dpo")
    assert tailorpo_run.out_dir == os.path.join("out", "tailorpo")


def test_a_failing_checkpoint_write_ends_in_one_line_and_resume_continues(
    calibrated_sd_dir, pairs_dir, tmp_path, monkeypatch
):
    original, calls = checkpoint.save_file, []

    def disk_full_on_third_write(tensors, path, metadata=None):  # ckpt_2, its UNet export, ckpt_4
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", disk_full_on_third_write)
    with pytest.raises(SystemExit) as stop:
        run(calibrated_sd_dir, pairs_dir, tmp_path, "--max_steps=4", "--save_every=2")
    message = str(stop.value)
    assert len(message.splitlines()) == 1 and "No space left on device" in message
    assert "ckpt_00000002.safetensors" in message and message.endswith("--resume")
    assert sorted(os.listdir(tmp_path)) == ["ckpt_00000002.safetensors", "metrics.jsonl", "unet"]
    monkeypatch.setattr(checkpoint, "save_file", original)
    run(calibrated_sd_dir, pairs_dir, tmp_path, "--max_steps=4", "--save_every=2", "--resume")
    assert [row["step"] for row in metrics(tmp_path)] == [1, 2, 3, 4]


def test_ctrl_c_ends_in_one_line_naming_the_checkpoint_and_the_resume_command(
    calibrated_sd_dir, pairs_dir, tmp_path, monkeypatch
):
    original = dpo.dpo_train_step
    calls = []

    def interrupted_in_step_3(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(dpo, "dpo_train_step", interrupted_in_step_3)
    with pytest.raises(SystemExit) as stop:
        run(calibrated_sd_dir, pairs_dir, tmp_path, "--max_steps=4", "--save_every=2")
    message = str(stop.value)
    assert len(message.splitlines()) == 1 and "interrupted" in message
    assert "ckpt_00000002.safetensors" in message and message.endswith("--resume")


def test_validation_pairs_are_built_on_rank_0_only(
    calibrated_sd_dir, pairs_dir, tmp_path, monkeypatch
):
    original = data.PreferencePairs.batches

    def recording(self, *args):
        with open(tmp_path / "built", "a") as f:
            f.write(os.environ.get("RANK", "0") + "\n")
        return original(self, *args)

    monkeypatch.setattr(data.PreferencePairs, "batches", recording)
    run_two_processes(
        [
            f"--model={calibrated_sd_dir}",
            "--method=dpo",
            f"--data={pairs_dir}",
            f"--resolution={SIZE}",
            "--lora_rank=0",
            "--batch_size=2",
            "--max_steps=1",
            "--val_pairs=4",
            "--eval_every=1",
            f"--out_dir={tmp_path / 'two'}",
        ]
    )
    assert (tmp_path / "built").read_text().split() == ["0"]


def test_bad_input_fails_before_any_model_from_the_command_line(pairs_dir, tmp_path):
    """A fresh folder has no toy cache, so a late check would pretrain for minutes first (a .cache
    folder would appear); a pickle that runs code is refused in one line."""

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"state_dict": Evil()}, tmp_path / "evil.ckpt")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
    for argv in (
        ["--method=dpo", "--data=/nonexistent"],
        ["--tailorpo.log_prob_reduction=Mean"],
        ["--tailorpo.next_state=Random"],
        ["--tailorpo.eta=0"],
        ["--tailorpo.train_start_step=50"],
        ["--method=tailorpo", f"--model={tmp_path}"],
        [f"--model={tmp_path / 'evil.ckpt'}", f"--data={pairs_dir}"],
        ["--data=/tmp"],
        ["--resolution=0"],
    ):
        result = subprocess.run(
            [sys.executable, script, *argv], cwd=tmp_path, capture_output=True, text=True
        )
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
        assert (
            result.stderr.startswith("train.py: ") and len(result.stderr.strip().splitlines()) == 1
        )
    assert not (tmp_path / ".cache").exists() and not (tmp_path / "pwned").exists()
