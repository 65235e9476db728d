"""Tests of evaluate.py: the shipped prompt sets are the published files, `evaluate.py --prompts
drawbench` end to end on a tiny random SD folder with tiny reward weights (tables, category
breakdown, PNG paths, the second run only scores), the LoRA base, compare() with already-loaded
rewards, one-line errors, statistics.
"""

import hashlib
import json
import re

import pytest
import torch

import evaluate
import lora
import rewards
from sampler import generate
from testkit import hf_clip, write_aesthetic_pth
from weights import load_stable_diffusion

DRAWBENCH_COUNTS = {
    "Colors": 25,
    "Conflicting": 10,
    "Counting": 19,
    "DALL-E": 20,
    "Descriptions": 20,
    "Gary Marcus et al.": 10,
    "Misspellings": 10,
    "Positional": 20,
    "Rare Words": 7,
    "Reddit": 38,
    "Text": 21,
}
PARTI_COUNTS = {
    "Abstract": 51,
    "Animals": 314,
    "Artifacts": 287,
    "Arts": 66,
    "Food & Beverage": 74,
    "Illustrations": 124,
    "Indoor Scenes": 40,
    "Outdoor Scenes": 131,
    "People": 177,
    "Produce & Plants": 50,
    "Vehicles": 104,
    "World Knowledge": 214,
}


def counts(categories):
    return {name: categories.count(name) for name in set(categories)}


def test_prompt_sets_are_the_published_files():
    """Counts and categories as the Imagen and Parti papers state them, and the bytes named in
    the README."""
    readme = (evaluate.PROMPT_SETS["drawbench"].parent / "README.md").read_text()
    for name, expected in (("drawbench", DRAWBENCH_COUNTS), ("parti", PARTI_COUNTS)):
        digest = hashlib.sha256(evaluate.PROMPT_SETS[name].read_bytes()).hexdigest()
        assert digest in readme
        prompt_set = evaluate.read_prompts(name)
        assert prompt_set.name == name and counts(prompt_set.categories) == expected
        assert (
            len(prompt_set.prompts)
            == sum(expected.values())
            == {"drawbench": 200, "parti": 1632}[name]
        )
    drawbench, parti = evaluate.read_prompts("drawbench"), evaluate.read_prompts("parti")
    assert drawbench.prompts[0] == "A red colored car." and drawbench.prompts[-1].startswith(
        "New York"
    )
    assert drawbench.prompts[66].startswith(
        "A stack of 3 plates. A blue plate is on the top, sitting on"
    )
    assert parti.prompts[:2] == ["bond", "element"] and parti.prompts[-1].endswith(
        "on a computer screen"
    )
    assert '"G I G G L E" painted in thick colorful lettering' in " ".join(
        parti.prompts
    )  # unbalanced quotes


def test_read_prompts_of_user_files(tmp_path):
    (tmp_path / "p.csv").write_text(
        'Caption,Category\n"a red apple, on a table",Food\na blue car,Cars\n\n'
    )
    (tmp_path / "p.txt").write_text("one\n\n two \n")
    prompt_set = evaluate.read_prompts(str(tmp_path / "p.csv"))
    assert prompt_set.prompts == ["a red apple, on a table", "a blue car"]
    assert prompt_set.categories == ["Food", "Cars"]
    assert evaluate.read_prompts(str(tmp_path / "p.csv"), 1).prompts == prompt_set.prompts[:1]
    assert evaluate.read_prompts(str(tmp_path / "p.txt")).prompts == ["one", "two"]
    with pytest.raises(ValueError, match="'nope.csv': no such file; give drawbench, parti"):
        evaluate.read_prompts("nope.csv")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        evaluate.read_prompts(str(tmp_path / "empty.txt"))


def test_statistics_and_seed_parsing():
    assert evaluate.parse_seeds("0-3") == [0, 1, 2, 3] and evaluate.parse_seeds("5,9") == [5, 9]
    assert evaluate.parse_seeds("2") == [0, 1]
    for bad in ("x", "3-1", "1,1", "0"):
        with pytest.raises(ValueError, match="--seeds"):
            evaluate.parse_seeds(bad)
    result = evaluate.win_rate(
        torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 2.0, 1.0, 1.0])
    )
    assert result["win_rate"] == pytest.approx((1 + 0.5 + 1 + 0) / 4) and result["ties"] == 1
    near = evaluate.win_rate(
        torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 2.0, 1.0, 1.0]), 1.0
    )
    assert near["win_rate"] == pytest.approx((0.5 + 0.5 + 1 + 0.5) / 4) and near["ties"] == 3
    stats = evaluate.mean_stderr(torch.tensor([1.0, 3.0]))
    assert stats["mean"] == 2.0 and stats["stderr"] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def tiny_files(tiny_sd_dir, tmp_path_factory):
    """Tiny reward weights (the aesthetic predictor's CLIP folder + MLP .pth, shared by clipscore),
    and aligned UNets for tiny_sd_dir: an exact copy, a perturbed one, and a LoRA file."""
    from safetensors.torch import save_file

    from testkit import L14

    folder = tmp_path_factory.mktemp("eval_files")
    hf_clip(*L14).save_pretrained(folder / "clip")
    write_aesthetic_pth(folder / "mlp.pth", L14[0].projection_dim)
    unet = load_stable_diffusion(tiny_sd_dir).unet
    save_file(unet.state_dict(), folder / "same.safetensors")
    lora.inject_lora(unet, rank=2)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    lora.save_lora(unet, folder / "lora.safetensors")
    lora.merge_lora(unet)
    save_file(unet.state_dict(), folder / "changed.safetensors")
    return folder


def run(tiny_sd_dir, files, out, *extra, rewards="aesthetic,clipscore", mlp_path=None):
    paths = f"clip_path={files / 'clip'},mlp_path={mlp_path or files / 'mlp.pth'}"
    return evaluate.main(
        [
            "--model",
            str(tiny_sd_dir),
            "--prompts",
            "drawbench",
            "--max_prompts",
            "3",
            "--seeds",
            "0,7",
            "--steps",
            "2",
            "--batch_size",
            "4",
            "--rewards",
            rewards,
            "--reward_paths",
            paths,
            "--out_dir",
            str(out),
            *extra,
        ]
    )


def test_drawbench_end_to_end_then_a_second_reward_only_scores(
    tiny_sd_dir, tiny_files, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "eval"
    report = run(tiny_sd_dir, tiny_files, out, "--unet", str(tiny_files / "changed.safetensors"))
    printed = capsys.readouterr().out
    # the table in the seed's form, the published reference beside ours, the category breakdown
    assert report["generated"] == {"base": 6, "aligned": 6} and report["num_pairs"] == 6
    assert set(report["rewards"]) == {"aesthetic", "clipscore"}
    for r in report["rewards"].values():
        assert set(r) == {"base", "aligned", "delta", "win_rate", "stderr", "ties", "tie_threshold"}
        assert r["delta"]["mean"] == pytest.approx(
            r["aligned"]["mean"] - r["base"]["mean"], abs=1e-9
        )
    assert (
        report["rewards"]["aesthetic"]["ties"] == 0
    )  # (random tiny CLIPs can give clipscore 0 for both)
    assert report["categories"].keys() == {"Colors"}  # the first 3 DrawBench prompts
    assert report["categories"]["Colors"]["rewards"] == report["rewards"]
    markdown = (out / "report.md").read_text()
    assert (
        "| metric | change aligned - base | win rate aligned > base | near-ties (threshold) | base "
        "| aligned |"
    ) in markdown
    assert "not measured here" in markdown
    assert "| SD1.5-DPO (published) | 5.6205 | 0.2672 | 0.6075 |" in markdown
    assert "| LCM-DPO (published) | 6.043 | 0.2814 | 0.572 |" in markdown
    assert "| ours: aligned | " in markdown and "| Colors | 6 | aesthetic |" in markdown
    assert markdown in printed and json.loads((out / "report.json").read_text()) == report
    # every image as a PNG under images/{base,aligned}/p{prompt index:03d}_s{seed}.png
    for kind in ("base", "aligned"):
        names = sorted(path.name for path in (out / "images" / kind).glob("*.png"))
        assert names == [f"p{i:03d}_s{s}.png" for i in range(3) for s in (0, 7)]
    # image (i, s) is the one generated alone from seed s (choice 4), as saved (uint8; batched float
    # reductions may move a pixel across a rounding boundary)
    sd = load_stable_diffusion(tiny_sd_dir)
    alone = generate(
        sd, [evaluate.read_prompts("drawbench").prompts[1]], num_steps=2, seed=7, progress=False
    )
    saved = rewards.read_image(out / "images" / "base" / "p001_s7.png")
    levels = (saved * 255).round() - (alone[0] * 255).round()
    assert levels.abs().max() <= 1 and (levels != 0).float().mean() < 0.02

    # a second run with another reward generates nothing and scores the same PNGs the same way
    mtimes = {path: path.stat().st_mtime_ns for path in out.glob("images/*/*.png")}
    monkeypatch.setattr(
        evaluate.sampler, "generate", lambda *a, **k: pytest.fail("generated an image")
    )
    again = run(
        tiny_sd_dir,
        tiny_files,
        out,
        "--unet",
        str(tiny_files / "changed.safetensors"),
        rewards="aesthetic,saturation",
    )
    assert again["generated"] == {"base": 0, "aligned": 0}
    assert again["rewards"]["aesthetic"] == report["rewards"]["aesthetic"]
    assert "saturation" in again["rewards"]
    assert mtimes == {path: path.stat().st_mtime_ns for path in out.glob("images/*/*.png")}
    # other sampler settings in the same folder are refused, in one line
    with pytest.raises(SystemExit, match="holds images made with") as error:
        run(
            tiny_sd_dir,
            tiny_files,
            out,
            "--unet",
            str(tiny_files / "changed.safetensors"),
            "--steps",
            "3",
        )
    assert "\n" not in str(error.value.code)


def test_lora_base_is_the_base_model_and_an_identical_unet_ties(tiny_sd_dir, tiny_files, tmp_path):
    """--lora: the base images come from the same UNet with the adapters off, and equal the base
    model's; an aligned UNet equal to the base gives all ties (win rate 1/2, delta 0)."""
    with_lora = run(
        tiny_sd_dir,
        tiny_files,
        tmp_path / "a",
        "--lora",
        str(tiny_files / "lora.safetensors"),
        rewards="saturation",
    )
    same = run(
        tiny_sd_dir,
        tiny_files,
        tmp_path / "b",
        "--unet",
        str(tiny_files / "same.safetensors"),
        rewards="saturation",
    )
    for name in ("p000_s0.png", "p002_s7.png"):
        lora_base, unet_base = (tmp_path / run_dir / "images" / "base" / name for run_dir in "ab")
        assert lora_base.read_bytes() == unet_base.read_bytes()
    assert with_lora["rewards"]["saturation"]["ties"] < 6
    same = same["rewards"]["saturation"]
    assert same["win_rate"] == 0.5 and same["ties"] == 6 and same["delta"]["mean"] == 0


def test_compare_takes_loaded_reward_functions(tiny_sd_dir, tmp_path):
    """compare() scores with the callables it is given (it loads nothing), per category of the
    given list."""
    sd = load_stable_diffusion(tiny_sd_dir)
    calls = []

    def mean_pixel(images, prompts):
        calls.append(len(prompts))
        return images.mean(dim=(1, 2, 3))

    prompts, categories = ["a cat", "a dog", "a car"], ["animal", "animal", "vehicle"]
    report = evaluate.compare(
        sd,
        prompts,
        {"mean_pixel": mean_pixel},
        [3],
        str(tmp_path),
        base_sd=sd,
        categories=categories,
        num_steps=2,
        batch_size=2,
    )
    assert sum(calls) == 2 * 3  # base and aligned images of 3 pairs
    assert {name: c["num_pairs"] for name, c in report["categories"].items()} == {
        "animal": 2,
        "vehicle": 1,
    }
    assert report["rewards"]["mean_pixel"]["ties"] == 3 and report["reference"] is None
    in_memory = evaluate.generate(sd, prompts, 3, num_steps=2, batch_size=2)  # train.py's
    saved = torch.stack(
        [rewards.read_image(tmp_path / f"images/aligned/p{i:03d}_s3.png") for i in range(3)]
    )
    assert torch.equal(saved, (in_memory * 255).round() / 255)
    with pytest.raises(ValueError, match="no LoRA layers"):
        evaluate.compare(sd, prompts, {"mean_pixel": mean_pixel}, [3], str(tmp_path), num_steps=2)


def test_a_tiny_consistent_shift_is_a_near_tie_not_a_win():
    """Issue 21.2: a shift of the aligned scores far below the base's seed-to-seed std (here 1/1000
    of it) counts as a tie, so the win rate is 1/2 and not ~1; a shift of half a std wins every
    comparison. The change itself is reported in the metric's units, whatever the win rate says."""
    base = torch.randn(
        20, 4, generator=torch.Generator().manual_seed(0)
    ).flatten()  # 20 prompts x 4 seeds
    threshold = evaluate.TIE_FRACTION * evaluate.seed_std(base, num_seeds=4)
    assert 0.05 < threshold < 0.2  # a tenth of a seed-to-seed std of ~1
    tiny = evaluate.summarize(
        {"base": {"u": base}, "aligned": {"u": base + 1e-3}}, {"u": threshold}
    )["u"]
    assert tiny["win_rate"] == 0.5 and tiny["ties"] == 80
    rounding = torch.finfo(torch.float32).eps * base.abs().max().item()  # of base + 1e-3 in float32
    assert tiny["delta"]["mean"] == pytest.approx(1e-3, abs=rounding)
    half = evaluate.summarize(
        {"base": {"u": base}, "aligned": {"u": base + 0.5}}, {"u": threshold}
    )["u"]
    assert half["win_rate"] == 1.0 and half["ties"] == 0


def test_the_report_leads_with_the_mean_change_and_a_legend_per_metric(tiny_sd_dir, tmp_path):
    """format_markdown's first table: metric, then the change aligned - base (mean +- stderr), then
    the win rate with near-ties; the threshold's rule is stated, and each metric has its one-line
    legend."""
    sd = load_stable_diffusion(tiny_sd_dir)

    def mean_pixel(images, prompts):
        """The mean pixel value in [0, 1]."""
        return images.mean(dim=(1, 2, 3))

    report = evaluate.compare(
        sd,
        ["a cat", "a dog"],
        {"mean_pixel": mean_pixel},
        [3, 4],
        str(tmp_path),
        base_sd=sd,
        num_steps=2,
        batch_size=2,
    )
    lines = evaluate.format_markdown(report).splitlines()
    header = next(line for line in lines if line.startswith("| metric"))
    assert [cell.strip() for cell in header.strip("|").split("|")][:3] == [
        "metric",
        "change aligned - base",
        "win rate aligned > base",
    ]
    row = next(line for line in lines if line.startswith("| mean_pixel"))
    assert row.split("|")[2].strip() == "+0.0000 ± 0.0000"
    assert any("seed-to-seed std" in line for line in lines)
    assert "- mean_pixel: The mean pixel value in [0, 1]." in lines


@pytest.mark.parametrize("option", ["--lora", "--unet", "--reward_paths"])
def test_bad_weight_files_and_options_give_one_line_errors(
    tiny_sd_dir, tiny_files, tmp_path, option
):
    """Issue 10 item 12 at evaluate.py's entry points: exit with one line naming the file and the
    reason, before any image is generated."""
    from testkit import write_bad_file

    for kind in ("pickle_with_code", "corrupt_safetensors", "missing"):
        path, reason = write_bad_file(tmp_path, kind)
        if option == "--reward_paths":  # the aesthetic MLP's file is the bad one
            extra, mlp_path = ["--unet", str(tiny_files / "same.safetensors")], path
        else:
            extra, mlp_path = [option, str(path)], None
        with pytest.raises(SystemExit) as error:
            run(tiny_sd_dir, tiny_files, tmp_path / "out", *extra, mlp_path=mlp_path)
        message = str(error.value.code)
        assert message.startswith("evaluate.py: ") and "\n" not in message and str(path) in message
        assert re.search(reason, message), message
        assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()
    with pytest.raises(SystemExit, match="'nope': no such file"):
        evaluate.main(["--prompts", "nope", "--lora", "x"])


def test_options_take_both_spellings_and_unknown_ones_get_a_suggestion(
    tiny_sd_dir, tiny_files, tmp_path
):
    """config.Parser's convention, as train.py's: --max_prompts and --max-prompts are one option; a
    typo is answered in one line with the option it resembles."""
    report = run(
        tiny_sd_dir,
        tiny_files,
        tmp_path / "a",
        "--unet",
        str(tiny_files / "same.safetensors"),
        "--max-prompts",
        "1",
        rewards="saturation",
    )
    assert report["num_prompts"] == 1
    with pytest.raises(
        SystemExit,
        match=r"^evaluate.py: unknown option '--max_prompt' \(did you mean "
        r"--max_prompts\?\)$",
    ):
        evaluate.main(["--max_prompt", "2", "--lora", "x"])
