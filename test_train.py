"""train.py end to end on tiny models (CPU, seconds): DPO learns a preference it was shown, resume is exact,
a crash while writing a checkpoint leaves no partial file, 2 DDP processes equal one with the doubled batch
(the real step: every draw is keyed by the sample's stream position), the precision policy's step-0
identities, a NaN loss stops the run, validation is deterministic, and every bad option is refused early.

The tiny SD of conftest (tiny_sd_dir) has a random VAE whose posterior std is ~1, so its latents are mostly
sampling noise and no preference survives encoding. `calibrated_sd_dir` fixes that as a trained VAE would be:
logvar = -30 (a deterministic encoder) and a scaling_factor that gives latents about unit variance.
"""

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
from safetensors.torch import load_file, save_file

import checkpoint
import data
import dpo
import lora
import train
import weights
from bench.bench_data import write_synthetic_pick_a_pic
from config import ConfigError

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
    """pairs.jsonl of a bright image (jpg_0) and a dark one (noisy flat colours); by default the bright one is
    preferred (label_0 = 1)."""
    generator = torch.Generator().manual_seed(seed)
    image = lambda level: (torch.rand(3, 1, 1, generator=generator) * 0.2 + level
                           + torch.rand(3, SIZE, SIZE, generator=generator) * 0.1)
    captions = [f"picture {i}" for i in range(count)]
    data.write_pairs_jsonl(folder, captions, [image(0.65) for _ in captions], [image(0.15) for _ in captions],
                           labels_0)
    return folder


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    return bright_dark_pairs(tmp_path_factory.mktemp("pairs"), 64, seed=0)


def run(model, pairs, out, *options):
    train.main([f"--model={model}", "--method=dpo", f"--data={pairs}", f"--resolution={SIZE}",
                f"--out_dir={out}", "--batch_size=2", "--lora_rank=0", *options])


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def checkpoint_weights(out, step):
    return {k: v for k, v in load_file(os.path.join(out, f"ckpt_{step:08d}.safetensors")).items()
            if k.startswith("model.")}


def assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, worst


def test_dpo_learns_the_shown_preference_on_held_out_pairs(calibrated_sd_dir, pairs_dir, tmp_path):
    out = tmp_path / "out"
    run(calibrated_sd_dir, pairs_dir, out, "--max_steps=120", "--batch_size=4", "--learning_rate=1e-3",
        "--beta=500", "--save_every=120", "--val_pairs=8", "--eval_every=40")
    rows = metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 121))
    assert (out / "implicit_accuracy.png").exists() and (out / "loss.png").exists()
    val = [r["val_implicit_accuracy"] for r in rows if "val_implicit_accuracy" in r]
    assert len(val) == 4 and val[0] == 0.0 and val[-1] > 0.5  # steps 0, 40, 80, 120; ties count as wrong

    # held-out pairs (new images and prompts): policy vs the untouched base model, 8 fresh draws
    held_out = data.PreferencePairs(bright_dark_pairs(tmp_path / "held_out", 32, seed=1), SIZE, hflip=False,
                                    prompt_dropout=0.0)
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
        run(calibrated_sd_dir, pairs_dir, tmp_path / name, "--max_steps=2", "--val_pairs=6", "--eval_every=1")
    a, b = ([r["val_loss"] for r in metrics(tmp_path / name) if "val_loss" in r] for name in ("a", "b"))
    assert len(a) == 3 and a == b  # steps 0, 1, 2; the same numbers on a rerun
    assert a[0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 0


def test_exported_unet_loads_in_diffusers(calibrated_sd_dir, pairs_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    run(calibrated_sd_dir, pairs_dir, tmp_path, "--max_steps=1")
    ours = weights.load_unet(tmp_path / "unet")
    theirs = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    x, context = torch.randn(2, 4, 4, 4), torch.randn(2, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, 10, context), theirs(x, 10, context).sample, atol=1e-5, rtol=1e-4)


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
    """Pick-a-Pic-like parquet shards (bench_data's generator): 80 rows in row groups of 10, ties included."""
    folder = tmp_path_factory.mktemp("parquet")
    write_synthetic_pick_a_pic(folder, 80, rows_per_group=10, sizes=(SIZE, 40), distinct_images=8)
    return folder


@pytest.mark.parametrize("lora_rank, kind", [(0, "jsonl"), (2, "jsonl"), (2, "parquet")])
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(calibrated_sd_dir, pairs_dir, parquet_dir,
                                                                  tmp_path, monkeypatch, lora_rank, kind):
    pairs_dir = parquet_dir if kind == "parquet" else pairs_dir
    options = ["--max_steps=6", "--save_every=3", "--grad_accum=2", f"--lora_rank={lora_rank}"]
    run(calibrated_sd_dir, pairs_dir, tmp_path / "straight", *options)
    with monkeypatch.context() as patch:
        crash_at_call(patch, 2 * 4 + 1, dpo, "dpo_train_step")  # inside step 5, after the step-3 checkpoint
        with pytest.raises(Crash):
            run(calibrated_sd_dir, pairs_dir, tmp_path / "resumed", *options)
    assert checkpoint.latest(tmp_path / "resumed").endswith("ckpt_00000003.safetensors")
    run(calibrated_sd_dir, pairs_dir, tmp_path / "resumed", *options, "--resume")
    straight, resumed = (checkpoint_weights(tmp_path / name, 6) for name in ("straight", "resumed"))
    assert_same_weights(straight, resumed, atol=0.0)  # bit-exact
    rows = [metrics(tmp_path / name) for name in ("straight", "resumed")]
    assert [r["step"] for r in rows[1]] == list(range(1, 7))
    assert [r["loss"] for r in rows[0]] == [r["loss"] for r in rows[1]]
    exported = weights.load_unet(calibrated_sd_dir / "unet")  # the exported weights are the checkpoint's
    if lora_rank:
        lora.inject_lora(exported, lora_rank, alpha=4.0)  # train.py's default lora_alpha
        lora.load_lora(exported, tmp_path / "resumed" / "lora.safetensors")
    else:
        exported = weights.load_unet(tmp_path / "resumed" / "unet")
    assert_same_weights({f"model.{k}": v for k, v in checkpoint.trainable(exported).items()}, resumed, 1e-6)


def trained_positions(monkeypatch) -> list[list[int]]:
    """The stream positions of every training micro-batch dpo_train_step sees from now on."""
    original, seen = dpo.dpo_train_step, []

    def recording(sd, reference_unet, batch, *args):
        seen.append(list(batch["positions"]))
        return original(sd, reference_unet, batch, *args)
    monkeypatch.setattr(dpo, "dpo_train_step", recording)
    return seen


def test_resume_with_a_smaller_batch_continues_after_the_samples_consumed(calibrated_sd_dir, pairs_dir,
                                                                         tmp_path, monkeypatch):
    run(calibrated_sd_dir, pairs_dir, tmp_path, "--max_steps=2", "--batch_size=4")  # positions 0-7
    seen = trained_positions(monkeypatch)
    run(calibrated_sd_dir, pairs_dir, tmp_path, "--max_steps=4", "--batch_size=2", "--resume")
    assert seen == [[8, 9], [10, 11]]


def test_checkpoint_records_the_samples_consumed_and_the_configuration(calibrated_sd_dir, pairs_dir,
                                                                       tmp_path):
    run(calibrated_sd_dir, pairs_dir, tmp_path, "--max_steps=3", "--batch_size=2", "--grad_accum=2")
    metadata = checkpoint.read_metadata(checkpoint.latest(tmp_path))
    assert int(metadata["samples_consumed"]) == 3 * 2 * 2  # steps x batch x accumulation (one process)
    assert json.loads(metadata["config"])["batch_size"] == 2
    assert json.loads(metadata["data_identity"])


@pytest.mark.parametrize("option, saved", [("--method=sft", "dpo"), ("--lora_rank=4", "2"),
                                           ("--seed=1", "0")])
def test_resume_refuses_a_checkpoint_of_another_run_in_one_line(calibrated_sd_dir, pairs_dir, tmp_path,
                                                                monkeypatch, option, saved):
    run(calibrated_sd_dir, pairs_dir, tmp_path, "--max_steps=1", "--lora_rank=2")

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the refusal")
    monkeypatch.setattr(weights, "load_stable_diffusion", no_model)
    with pytest.raises(checkpoint.CheckpointMismatch) as refusal:
        run(calibrated_sd_dir, pairs_dir, tmp_path, "--max_steps=2", "--lora_rank=2", option, "--resume")
    name = option.split("=")[0]
    assert f"{name}={saved}" in str(refusal.value) and len(str(refusal.value).splitlines()) == 1


def test_resume_says_where_it_continues_from_or_that_it_starts_fresh(calibrated_sd_dir, pairs_dir, tmp_path,
                                                                      capsys):
    run(calibrated_sd_dir, pairs_dir, tmp_path / "missing", "--max_steps=1", "--resume")
    assert f"no folder {tmp_path / 'missing'}" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    run(calibrated_sd_dir, pairs_dir, tmp_path / "empty", "--max_steps=1", "--resume")
    assert f"no checkpoint in {tmp_path / 'empty'}" in capsys.readouterr().err
    run(calibrated_sd_dir, pairs_dir, tmp_path / "empty", "--max_steps=2", "--resume")
    expected = f"resuming from {tmp_path / 'empty' / 'ckpt_00000001.safetensors'} (step 1)"
    assert expected in capsys.readouterr().err


def test_crash_while_writing_a_checkpoint_leaves_no_partial_file(calibrated_sd_dir, pairs_dir, tmp_path,
                                                                 monkeypatch):
    original, calls = checkpoint.save_file, []

    def dies_on_third_write(tensors, path, metadata=None):  # writes: ckpt_2, its UNet export, ckpt_4
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
    run(calibrated_sd_dir, pairs_dir, tmp_path, "--max_steps=4", "--save_every=2", "--resume")  # it loads
    assert [row["step"] for row in metrics(tmp_path)] == [1, 2, 3, 4]


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(calibrated_sd_dir, pairs_dir,
                                                                          tmp_path, monkeypatch):
    original = dpo.dpo_train_step

    def nan_at_step_4(*args):
        loss, metrics = original(*args)
        nan_at_step_4.calls += 1
        return loss * (float("nan") if nan_at_step_4.calls == 4 else 1.0), metrics
    nan_at_step_4.calls = 0
    monkeypatch.setattr(dpo, "dpo_train_step", nan_at_step_4)
    with pytest.raises(SystemExit, match=r"step 4: loss nan.*The last good checkpoint is .*ckpt_00000002"):
        run(calibrated_sd_dir, pairs_dir, tmp_path, "--max_steps=6", "--save_every=2")
    assert checkpoint.latest(tmp_path).endswith("ckpt_00000002.safetensors")
    assert all(v.isfinite().all() for v in checkpoint_weights(tmp_path, 2).values())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("lora_rank", [0, 2])
def test_step_zero_is_log_2_under_mixed_precision(calibrated_sd_dir, pairs_dir, tmp_path, precision,
                                                  lora_rank):
    """The policy equals its reference at step 0 under the same autocast: loss log 2, implicit accuracy 0."""
    run(calibrated_sd_dir, pairs_dir, tmp_path, "--max_steps=2", f"--lora_rank={lora_rank}",
        f"--mixed_precision={precision}", "--learning_rate=1e-3")
    first = metrics(tmp_path)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7) and first["implicit_accuracy"] == 0.0
    assert all(v.dtype == torch.float32 for v in checkpoint_weights(tmp_path, 2).values())  # fp32 trainables


def ddp_worker(rank, port, argv):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    train.main(argv)


def run_two_processes(argv, timeout=120):
    """train.main(argv) in 2 gloo processes; fails (rather than hangs) if they do not finish in time."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = torch.multiprocessing.start_processes(ddp_worker, args=(port, argv), nprocs=2, join=False,
                                                    start_method="fork")
    deadline = time.time() + timeout
    while not context.join(timeout=1):
        assert time.time() < deadline, "DDP processes hang"


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_two_ddp_processes_equal_one_process_with_the_doubled_batch(calibrated_sd_dir, pairs_dir, parquet_dir,
                                                                      tmp_path, kind):
    source = pairs_dir if kind == "jsonl" else parquet_dir
    common = [f"--model={calibrated_sd_dir}", "--method=dpo", f"--data={source}", f"--resolution={SIZE}",
              "--lora_rank=0", "--max_steps=2", "--learning_rate=1e-4", "--beta=500"]
    # one thread here (conftest) as in the workers: Adam's update of a near-zero gradient is sensitive to the
    # rounding of the reduction order
    train.main(common + ["--batch_size=4", f"--out_dir={tmp_path / 'one'}"])
    run_two_processes(common + ["--batch_size=2", f"--out_dir={tmp_path / 'two'}"])
    one, two = checkpoint_weights(tmp_path / "one", 2), checkpoint_weights(tmp_path / "two", 2)
    start = {f"model.{k}": v for k, v in weights.load_unet(calibrated_sd_dir / "unet").state_dict().items()}
    assert_same_weights(one, two, atol=1e-5)  # Adam moves each weight by up to 2e-4: equal to 5%
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 1e-4
    for key in ("loss", "grad_norm"):  # the logged metrics are averaged over the ranks
        assert [r[key] for r in metrics(tmp_path / "one")] == pytest.approx(
            [r[key] for r in metrics(tmp_path / "two")], rel=1e-4)  # step 2: after the 1e-5 weight gap


def test_ddp_online_run_with_empty_pair_sets_neither_hangs_nor_diverges(calibrated_sd_dir, tmp_path):
    """--tailorpo.min_reward_gap drops pairs; a rank left with none still joins every gradient all-reduce,
    so 2 processes x 1 prompt equal 1 process x 2 prompts whichever pairs each rank kept."""
    common = [f"--model={calibrated_sd_dir}", "--method=tailorpo", "--reward=brightness", "--max_steps=2",
              "--tailorpo.num_steps=3", "--tailorpo.min_reward_gap=0.002", "--eval_every=0",
              "--learning_rate=1e-2"]
    train.main(common + ["--batch_size=2", f"--out_dir={tmp_path / 'one'}"])
    run_two_processes(common + ["--batch_size=1", f"--out_dir={tmp_path / 'two'}"])
    one, two = checkpoint_weights(tmp_path / "one", 2), checkpoint_weights(tmp_path / "two", 2)
    assert_same_weights(one, two, atol=1e-5)
    kept = [r["pairs_kept"] for r in metrics(tmp_path / "one")]
    assert min(kept) < 1.0, kept  # some pairs were dropped (the case under test)


def test_online_method_logs_fresh_sample_rewards_and_the_relabel_count(calibrated_sd_dir, pairs_dir,
                                                                        tmp_path):
    train.main([f"--model={calibrated_sd_dir}", "--method=tailorpo", "--reward=brightness", "--max_steps=2",
                "--batch_size=2", "--tailorpo.num_steps=2", "--eval_every=1", "--eval_prompts=2",
                f"--out_dir={tmp_path / 'online'}"])
    rows = metrics(tmp_path / "online")
    assert [r["step"] for r in rows if "eval_reward" in r] == [0, 1, 2]
    assert all((tmp_path / "online" / name).exists() for name in ("reward.png", "lora.safetensors"))
    dark_preferred = bright_dark_pairs(tmp_path / "dark", 8, seed=2, labels_0=[0.0] * 8)
    run(calibrated_sd_dir, dark_preferred, tmp_path / "ai", "--max_steps=2", "--ai_feedback",
        "--reward=brightness")
    assert all(r["pairs_relabelled"] == 2 for r in metrics(tmp_path / "ai"))  # brightness flips every label


def test_final_report_uses_the_trained_reward_weights(calibrated_sd_dir, pairs_dir, tmp_path):
    from test_rewards import L14, hf_clip, write_aesthetic_pth

    hf_clip(*L14).save_pretrained(tmp_path / "clip")
    write_aesthetic_pth(tmp_path / "mlp.pth", L14[0].projection_dim)
    paths = {"clip_path": tmp_path / "clip", "mlp_path": tmp_path / "mlp.pth"}
    run(calibrated_sd_dir, pairs_dir, tmp_path / "out", "--max_steps=1", "--ai_feedback",
        "--reward=aesthetic",
        "--reward_paths=" + ",".join(f"{key}={path}" for key, path in paths.items()))
    report = json.loads((tmp_path / "out" / "eval" / "report.json").read_text())
    assert "aesthetic" in report["rewards"]


def test_config_flags_files_and_help(tmp_path, capsys):
    cfg = train.parse_config(["--method", "sft", "--data=.", "--tailorpo.beta=10", "--ai-feedback",
                              "--reward=brightness", "--hflip=0"])
    assert (cfg.method, cfg.tailorpo.beta, cfg.ai_feedback, cfg.hflip) == ("sft", 10.0, True, False)
    (tmp_path / "run.txt").write_text("# comment\n--method=sft --data=.  # trailing comment\n--beta=100\n")
    cfg = train.parse_config([f"@{tmp_path / 'run.txt'}", "--beta=7"])  # the command line wins
    assert (cfg.method, cfg.data, cfg.beta) == ("sft", ".", 7.0)
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


def test_bad_input_fails_in_seconds_from_the_command_line(tmp_path):
    """A fresh folder has no toy cache, so a late check would pretrain for minutes first; a pickle that runs
    code is refused in one line."""
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    torch.save({"state_dict": Evil()}, tmp_path / "evil.ckpt")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
    for argv in (["--method=dpo", "--data=/nonexistent"], ["--tailorpo.log_prob_reduction=Mean"],
                 ["--tailorpo.next_state=Random"], ["--tailorpo.eta=0"], ["--tailorpo.train_start_step=50"],
                 ["--method=tailorpo", f"--model={tmp_path}"],
                 [f"--model={tmp_path / 'evil.ckpt'}", "--data=."]):
        started = time.time()
        result = subprocess.run([sys.executable, script, *argv], cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode != 0 and time.time() - started < 10 and "Traceback" not in result.stderr
        assert result.stderr.startswith("train.py: ") and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / ".cache").exists() and not (tmp_path / "pwned").exists()
