"""Reward models behind one signature: reward(images, prompts) -> scores;
get_reward(name, device, **paths).

    images  float [B, 3, H, W] in [0, 1], any device      prompts  list[str] of length B
    scores  float [B] on images.device; differentiable w.r.t. images when reward.differentiable

    aesthetic    LAION improved aesthetic predictor v2: MLP(normalize(CLIP ViT-L/14 image emb.))
    pickscore    PickScore v1 (Kirstain et al. 2023): logit_scale.exp() * cos(image, text), ViT-H/14
    hpsv2        HPS v2 / v2.1 (Wu et al. 2023): cos(image, text) of a fine-tuned OpenCLIP ViT-H-14
    clipscore    CLIPScore (Hessel et al. 2021) as torchmetrics: 100 * max(cos(image, text), 0),
                 CLIP ViT-L/14
    jpeg_compressibility / jpeg_incompressibility   DDPO (Black et al. 2023): -/+ JPEG size in kB
    brightness, saturation   weight-free and differentiable (tests, the CPU toy world)
    ModelReward  a reward model from elsewhere behind these checks (the toy world's, via its door)

Deviations from the official code:
1. Preprocessing in torch on the float images (antialiased bicubic resize, clamp, center crop), so
   gradients reach the pixels; the originals resize uint8 with PIL: ~1/255 per pixel apart (i.i.d.
   noise: 4/255).
2. hpsv2.score resizes the longer side to 224 and pads to a square; we crop as the others: same on
   squares.
3. Prompts are eos-padded to 77, where PickScore pads to the longest prompt and open_clip with 0:
   the causal text towers pool at the first <|endoftext|>, so padding cannot change a score.
4. Weights: weights.read_state_dict (no pickled code runs); `python rewards.py convert IN OUT` ->
   safetensors.
5. Rewards score in float32 (float64 for gradcheck) with autocast off, whatever the caller runs
   under: in bf16 the aesthetic score has a resolution of 1/32 in [4, 8), so close candidates and
   pairs became ties.
6. clipscore clamps each image's score at 0 (torchmetrics' documentation; Hessel et al., w = 100);
   its code clamps the batch mean: the same when every cosine is >= 0, as CLIP gives for images and
   their prompts.
7. clipscore cuts a prompt as torchmetrics does, at the first 77 ids ([bos] + 76 tokens, no eos),
   where the others keep 75 tokens and the eos (CLIP's training rule): with no eos, the text is
   pooled at position 0 (ours, and transformers' legacy argmax of the ids alike), so such a
   prompt's text embedding is the bos's.
"""

import argparse
import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from clip import CLIPModel, CLIPTextConfig, CLIPVisionConfig, convert_hf_clip_keys
from state_dicts import CheckpointError, load_strict, read_state_dict
from tokenizer import CLIPTokenizer
from weights import read_json

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
AESTHETIC_MLP_URL = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
    "sac+logos+ava1-l14-linearMSE.pth"
)
VIT_L14 = "HF openai/clip-vit-large-patch14"


def read_image(path) -> torch.Tensor:
    """An image file -> [3, H, W] float32 in [0, 1] (converted to RGB)."""
    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(
            2, 0, 1
        )


def clip_preprocess(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> CLIP pixel_values [B, 3, size, size], differentiable (deviation
    1)."""
    height, width = images.shape[-2:]
    short = min(height, width)  # as CLIPImageProcessor: the shortest side becomes `size`
    new_size = (int(size * height / short), int(size * width / short))
    if new_size != (height, width):
        images = F.interpolate(
            images, new_size, mode="bicubic", antialias=True, align_corners=False
        )
        images = images.clamp(0, 1)  # PIL stores uint8, so its bicubic overshoot is clipped too
    top, left = (new_size[0] - size) // 2, (new_size[1] - size) // 2
    images = images[:, :, top : top + size, left : left + size]
    mean, std = (images.new_tensor(v).view(3, 1, 1) for v in (OPENAI_MEAN, OPENAI_STD))
    return (images - mean) / std


def read_weights(
    path, what: str
) -> dict[str, torch.Tensor]:  # a CheckpointError also says what was expected
    try:
        return read_state_dict(path)
    except CheckpointError as error:
        raise CheckpointError(f"{error} (expected: {what})") from None


def load_clip(
    path,
    text_config: CLIPTextConfig,
    vision_config: CLIPVisionConfig,
    what: str,
    convert=convert_hf_clip_keys,
) -> CLIPModel:
    """A CLIPModel from an HF folder (its config.json wins) or one file; `convert` maps its keys
    to ours."""
    path = Path(path)
    if path.is_dir():
        config = read_json(path / "config.json")
        text_config = CLIPTextConfig.from_hf(config["text_config"], config.get("projection_dim"))
        vision_config = CLIPVisionConfig.from_hf(config["vision_config"])
        safetensors = path / "model.safetensors"
        path = safetensors if safetensors.is_file() else path / "pytorch_model.bin"
    state_dict = convert(read_weights(path, what))
    with torch.device("meta"):  # no random init of ~1B parameters that the file overwrites anyway
        model = CLIPModel(text_config, vision_config)
    return load_strict(model, state_dict, str(path))


# open_clip name -> ours in its tower (visual.* -> vision_model.*, else text_model.*)
OPEN_CLIP_NAMES = {
    "transformer.resblocks.": "encoder.layers.",
    "conv1.": "embeddings.patch_embedding.",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.": "final_layer_norm.",
    "class_embedding": "embeddings.class_embedding",
    "token_embedding.": "embeddings.token_embedding.",
    "ln_pre.": "pre_layrnorm.",
    "ln_post.": "post_layernorm.",
}
OPEN_CLIP_LAYER_PARTS = [
    (".ln_1.", ".layer_norm1."),
    (".ln_2.", ".layer_norm2."),
    (".attn.", ".self_attn."),
    (".mlp.c_fc.", ".mlp.fc1."),
    (".mlp.c_proj.", ".mlp.fc2."),
]


def convert_open_clip_keys(state_dict: dict) -> dict:
    """OpenCLIP names (HPSv2) -> ours (HF CLIPModel names): the fused qkv is split, projections
    transposed."""
    converted = {}
    for key, tensor in state_dict.items():
        if key in (
            "visual.proj",
            "text_projection",
        ):  # open_clip computes x @ proj, nn.Linear x @ weight.T
            converted[("visual" if key[0] == "v" else "text") + "_projection.weight"] = tensor.T
            continue
        name = key.removeprefix("visual.")
        tower = "text_model." if name == key else "vision_model."
        for old, new in OPEN_CLIP_NAMES.items():
            if name.startswith(old):
                key = tower + new + name[len(old) :]
        for old, new in OPEN_CLIP_LAYER_PARTS:
            key = key.replace(old, new)
        if ".in_proj_" in key:  # self_attn.in_proj_{weight,bias}: rows are [q; k; v]
            prefix, kind = key.split(".in_proj_")
            for projection, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3)):
                converted[f"{prefix}.{projection}.{kind}"] = part
        else:
            converted[key] = tensor
    return {key: tensor.contiguous() for key, tensor in converted.items()}


class Reward(nn.Module):
    """Checks the inputs, runs score() on the weights' device and dtype; returns [B] on
    images.device."""

    differentiable = True

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        is_tensor = torch.is_tensor(images)
        if not (
            is_tensor and images.ndim == 4 and images.shape[1] == 3 and images.is_floating_point()
        ):
            got = f"{images.dtype} {list(images.shape)}" if is_tensor else type(images).__name__
            raise ValueError(
                f"rewards take images as a float tensor [B, 3, H, W] in [0, 1], got {got}"
            )
        low, high = torch.stack(
            [images.min(), images.max()]
        ).tolist()  # one host sync per reward call
        if not (-1e-4 <= low and high <= 1 + 1e-4):  # also catches NaN
            raise ValueError(
                f"rewards take images in [0, 1], got values in [{low:.3g}, {high:.3g}]; "
                "map decoded SD images x in [-1, 1] with (x / 2 + 0.5).clamp(0, 1)"
            )
        if len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        if not self.differentiable and images.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                f"the {self.name} reward is not differentiable, it has no gradient to give: "
                "call it under torch.no_grad() or on images.detach()"
            )
        weight = next(self.parameters(), None)
        device = images.device if weight is None else weight.device
        dtype = (
            weight.dtype if weight is not None else torch.promote_types(images.dtype, torch.float32)
        )
        with torch.autocast(
            device.type, enabled=False
        ):  # deviation 5: fp32 whatever the caller runs under
            scores = self.score(images.to(device, dtype), prompts)
        return scores.to(images.device, dtype)


def brightness(images):
    """Mean Rec. 601 luma, in [0, 1]. Linear in the pixels."""
    luma = images.new_tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    return (images * luma).sum(dim=1).mean(dim=(1, 2))


def saturation(images):
    """Mean std of (R, G, B) over pixels, in [0, 1] (pure primary ~1, grey 0); linear in toy's
    vividness."""
    return ((images.var(dim=1, unbiased=False) + 1e-6).sqrt() / (2 / 9 + 1e-6) ** 0.5).mean(
        dim=(1, 2)
    )


def jpeg_incompressibility(images):
    """DDPO: JPEG (PIL, quality 95) file size in kB of the uint8-rounded image. Not
    differentiable."""
    sizes = []
    for pixels in (images * 255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy():
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes)


def jpeg_compressibility(images):
    """DDPO: minus the JPEG size in kB (smaller files score higher). Not differentiable."""
    return -jpeg_incompressibility(images)


class PixelReward(Reward):
    """A weight-free reward of the pixels alone; the prompts are ignored."""

    def __init__(self, fn, differentiable: bool = True):
        super().__init__()
        self.fn = fn
        self.name = fn.__name__
        self.differentiable = differentiable

    def score(self, images, prompts):
        return self.fn(images)


def clipscore_ids(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """CLIPScore's text ids [B, 77] as torchmetrics makes them (deviation 7): [bos] + tokens + [eos]
    cut to the first 77 ids, eos-padded; a prompt of over 75 tokens keeps 76 and no eos
    (tokenizer(): 75 + eos)."""
    rows = [
        [tokenizer.bos_id, *tokenizer.encode(p), tokenizer.eos_id][: tokenizer.max_length]
        for p in prompts
    ]
    return torch.tensor(
        [row + [tokenizer.eos_id] * (tokenizer.max_length - len(row)) for row in rows]
    )


class CLIPReward(Reward):
    """A score of a CLIP model's normalised embeddings: the formula of its name in the module
    docstring."""

    def __init__(
        self,
        name: str,
        clip: CLIPModel,
        tokenizer: CLIPTokenizer | None = None,
        mlp: nn.Module | None = None,
    ):
        super().__init__()
        self.name = name
        self.clip = clip
        self.tokenizer = tokenizer
        self.mlp = mlp
        self.requires_grad_(False).eval()

    def score(self, images, prompts):
        pixels = clip_preprocess(images, self.clip.vision_model.config.image_size)
        image_features = F.normalize(self.clip.get_image_features(pixels), dim=-1)
        if self.name == "aesthetic":
            return self.mlp(image_features).squeeze(-1)
        if self.name == "clipscore":  # deviation 7
            ids = clipscore_ids(self.tokenizer, prompts).to(images.device)
        else:
            ids = self.tokenizer(prompts).to(images.device)  # padded with eos (deviation 3)
        text_features = F.normalize(self.clip.get_text_features(ids), dim=-1)
        cosine = (image_features * text_features).sum(dim=-1)
        if self.name == "pickscore":
            return self.clip.logit_scale.exp() * cosine
        if self.name == "clipscore":
            return 100 * cosine.clamp(min=0)
        return cosine  # HPSv2's score is the cosine itself.


def load_aesthetic(
    clip_path="weights/clip-vit-large-patch14", mlp_path="weights/sac+logos+ava1-l14-linearMSE.pth"
) -> CLIPReward:
    """clip_path: HF openai/clip-vit-large-patch14 (folder or model.safetensors); mlp_path: the
    .pth."""
    clip = load_clip(
        clip_path, CLIPTextConfig.sd15(), CLIPVisionConfig.vit_l14(), f"aesthetic {VIT_L14}"
    )
    # Named as in the .pth: layers.{0,2,4,6,7}; no ReLUs (they are commented out upstream).
    mlp = nn.Sequential()
    mlp.layers = nn.Sequential(
        nn.Linear(clip.visual_projection.out_features, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )
    load_strict(
        mlp, read_weights(mlp_path, f"aesthetic reward MLP ({AESTHETIC_MLP_URL})"), str(mlp_path)
    )
    return CLIPReward("aesthetic", clip, mlp=mlp)


def load_vit_h14(path, what: str, convert=convert_hf_clip_keys) -> CLIPModel:
    """The OpenCLIP ViT-H/14 that PickScore and HPSv2 fine-tune, read as load_clip reads it."""
    return load_clip(path, CLIPTextConfig.vit_h14_text(), CLIPVisionConfig.vit_h14(), what, convert)


def load_pickscore(path="weights/PickScore_v1") -> CLIPReward:
    """path: the HF yuvalkirstain/PickScore_v1 folder (or its model.safetensors)."""
    clip = load_vit_h14(path, "PickScore (HF yuvalkirstain/PickScore_v1)")
    return CLIPReward("pickscore", clip, CLIPTokenizer.default())


def load_hpsv2(path="weights/HPS_v2.1_compressed.pt") -> CLIPReward:
    """path: HPS_v2(.1)_compressed.pt (HF xswu/HPSv2): an OpenCLIP ViT-H-14 in open_clip names."""
    clip = load_vit_h14(
        path, "HPSv2 (HPS_v2.1_compressed.pt, HF xswu/HPSv2)", convert_open_clip_keys
    )
    return CLIPReward("hpsv2", clip, CLIPTokenizer.default(text_cleaning="openai"))


def load_clipscore(clip_path="weights/clip-vit-large-patch14") -> CLIPReward:
    """clip_path: HF openai/clip-vit-large-patch14 (torchmetrics' default CLIPScore model, HF
    cleaning)."""
    clip = load_clip(
        clip_path, CLIPTextConfig.sd15(), CLIPVisionConfig.vit_l14(), f"CLIPScore {VIT_L14}"
    )
    return CLIPReward("clipscore", clip, CLIPTokenizer.default())


class ModelReward(Reward):
    """A reward model defined elsewhere, model(images, prompts) -> [B], behind Reward's checks
    (the toy's)."""

    def __init__(self, name: str, model: nn.Module):
        super().__init__()
        self.name = name
        self.model = model

    def score(self, images, prompts):
        return self.model(images, prompts)


REWARDS = {  # name -> loader(**paths)
    "aesthetic": load_aesthetic,
    "pickscore": load_pickscore,
    "hpsv2": load_hpsv2,
    "clipscore": load_clipscore,
    "jpeg_compressibility": lambda: PixelReward(jpeg_compressibility, differentiable=False),
    "jpeg_incompressibility": lambda: PixelReward(jpeg_incompressibility, differentiable=False),
    "brightness": lambda: PixelReward(brightness),
    "saturation": lambda: PixelReward(saturation),
}

LEGENDS = {  # one line per reward, under every evaluate.py report
    "aesthetic": "LAION aesthetic predictor v2: predicted 1-10 rating of the image alone",
    "pickscore": "PickScore v1: a CLIP-H logit of how much people prefer the image for the prompt",
    "hpsv2": "HPS v2: cosine of image and prompt in a CLIP-H tuned on human preferences",
    "clipscore": "CLIPScore: 100 x the CLIP-L cosine of image and prompt (text-image agreement)",
    "saturation": "mean colour saturation in [0, 1] (grey 0, pure primary 1); ignores the prompt",
    "brightness": "mean luma in [0, 1]; ignores the prompt",
    "jpeg_compressibility": "minus the JPEG size in kB (DDPO): simpler images score higher",
    "jpeg_incompressibility": "the JPEG size in kB (DDPO): busier images score higher",
}


def get_reward(name: str, device="cpu", dtype=torch.float32, **paths) -> Reward:
    """A reward by name, e.g. get_reward("aesthetic", "cuda",
    mlp_path="sac+logos+ava1-l14-linearMSE.pth")."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; choose from {', '.join(REWARDS)}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"rewards score in float32 (or float64), got dtype={dtype} (deviation 5)")
    return REWARDS[name](**paths).to(device=device, dtype=dtype)


def main():
    parser = argparse.ArgumentParser(
        description="Reward models: score image files or convert a checkpoint."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser(
        "convert", help="IN (.pth/.pt/.bin, read with weights_only=True) -> OUT"
    )
    convert.add_argument("input")
    convert.add_argument("output", help="the .safetensors file to write")
    score = commands.add_parser("score", help="print the reward of image files (any size; RGB)")
    score.add_argument("reward", choices=list(REWARDS))
    score.add_argument("images", nargs="+")
    score.add_argument(
        "--prompt", default="", help="the prompt of every image (pickscore, hpsv2, clipscore)"
    )
    score.add_argument(
        "--path", action="append", default=[], metavar="KEY=FILE", help="e.g. mlp_path=a.pth"
    )
    score.add_argument("--device", default="cpu", help="torch device")
    args = parser.parse_args()
    try:  # a missing or bad weight file: one line, no traceback
        if args.command == "convert":
            state_dict = read_weights(args.input, "a .pth/.pt/.bin weights file to convert")
            save_file({key: tensor.contiguous() for key, tensor in state_dict.items()}, args.output)
            return print(f"wrote {args.output}")
        reward = get_reward(args.reward, args.device, **dict(p.split("=", 1) for p in args.path))
    except CheckpointError as error:
        raise SystemExit(f"rewards.py: {error}") from None
    with torch.no_grad():
        for file in args.images:
            print(f"{file}\t{reward(read_image(file)[None], [args.prompt]).item():.4f}")


if __name__ == "__main__":
    main()
