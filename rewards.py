"""Reward models behind one signature: reward(images, prompts) -> scores.

    images  float [B, 3, H, W] in [0, 1], any device      prompts  list[str] of length B
    scores  float [B] on images.device; differentiable w.r.t. images when reward.differentiable

TailorPO (Ren et al. 2025, Fig. 3) ranks the two candidates x_{t-1} of a denoising step by their step-wise
reward r(decode(x0_pred)) (justified by its Proposition 1), TailorPO-G moves the winner along grad_x r,
Diffusion-DPO's AI-feedback variant relabels pairs with a reward, and evaluate.py reports rewards.
get_reward(name, device, **paths) builds one by name:

    aesthetic    LAION improved aesthetic predictor v2: MLP(normalize(CLIP ViT-L/14 image embedding)),
                 MLP 768->1024->128->64->16->1 with no nonlinearity (its ReLUs are commented out upstream)
    pickscore    PickScore v1 (Kirstain et al. 2023): logit_scale.exp() * cos(image, text), CLIP ViT-H/14
    hpsv2        HPS v2 / v2.1 (Wu et al. 2023): cos(image, text) of a fine-tuned OpenCLIP ViT-H-14
    clipscore    CLIPScore (Hessel et al. 2021) as torchmetrics defines it: 100 * max(cos(image, text), 0)
                 with OpenAI CLIP ViT-L/14 (text-image alignment; the same CLIP file as the aesthetic reward)
    jpeg_compressibility / jpeg_incompressibility   DDPO (Black et al. 2023): -/+ JPEG size in kB
    brightness, saturation, redness   weight-free and differentiable: for tests and the CPU toy world

Deviations from the official code:
1. Preprocessing is done in torch on the float images so gradients reach the pixels: bicubic antialiased
   resize of the shortest side to 224, clamp to [0, 1], center crop, OpenAI mean/std. The originals quantise
   to uint8 and resize with PIL, which also rounds and clips to uint8 between its horizontal and vertical
   passes. Smooth (SD-like) images agree to ~1/255 per pixel (test_rewards.py, which also measures the score
   change); i.i.d. pixel noise differs by up to 4/255 from 512 px and ~20/255 when enlarged (PIL's clipping).
2. hpsv2.score resizes the longer side to 224 and pads to a square (ResizeMaxSize); we use the shortest-side
   resize + center crop of the other rewards. Both are the same plain resize for square images.
3. Prompts are tokenized by clip.CLIPTokenizer (HF text cleaning for PickScore, OpenAI's for HPS) and padded
   to 77, where PickScore pads to the longest prompt and open_clip pads with 0. The text towers are causal
   and pool at the first <|endoftext|>, so padding cannot change a score; HPS ids are still 0-padded.
4. Pickled checkpoints (.pth/.pt/.bin) are read only with torch.load(weights_only=True), never unpickled in
   full; `python rewards.py convert IN OUT.safetensors` turns one into a safetensors file once. Every weight
   file goes through weights.read_state_dict, so a bad one raises weights.CheckpointError: one line naming
   the file and the reason (missing, corrupt header, a pickle that would run code).
5. Precision: a reward scores in float32 (float64 if built so, for gradcheck) with autocast disabled,
   whatever the caller runs under. Under bf16 autocast the aesthetic score of SD images has a resolution of
   1/32 in [4, 8): close TailorPO candidates, AI-feedback pairs and evaluation pairs became ties (the
   official DDPO / Diffusion-DPO scorers also run in fp32 outside autocast). get_reward refuses half dtypes.
6. clipscore clamps each image's score at 0, the formula of torchmetrics' documentation (and of Hessel et
   al. with w = 100); torchmetrics' code clamps the batch mean instead. The two agree whenever every cosine
   is >= 0, as CLIP ViT-L/14 gives for images and their prompts (cosines ~0.2-0.35).
"""

import argparse
import io
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from clip import CLIPModel, CLIPTextConfig, CLIPVisionConfig, convert_hf_clip_keys
from tokenizer import CLIPTokenizer
from weights import CheckpointError, load_strict, read_state_dict

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
AESTHETIC_MLP_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                     "sac+logos+ava1-l14-linearMSE.pth")

# ----------------------------------------------------------------------------------------------------------
# Inputs, preprocessing and weight files


def check_images(images: torch.Tensor, prompts: list[str]) -> None:
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
        shape = list(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"rewards take images as a float tensor [B, 3, H, W] in [0, 1], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"rewards take float images in [0, 1], got {images.dtype} (divide uint8 by 255)")
    low, high = torch.stack([images.min(), images.max()]).tolist()  # one host sync per reward call
    if not (-1e-4 <= low and high <= 1 + 1e-4):  # also catches NaN
        raise ValueError(f"rewards take images in [0, 1], got values in [{low:.3g}, {high:.3g}]; "
                         "map decoded SD images x in [-1, 1] with (x / 2 + 0.5).clamp(0, 1)")
    if len(prompts) != len(images):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")


def clip_preprocess(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> CLIP pixel_values [B, 3, size, size], differentiable (deviation 1)."""
    height, width = images.shape[-2:]
    short, long = min(height, width), max(height, width)
    new_long = int(size * long / short)  # as CLIPImageProcessor: the shortest side becomes `size`
    new_size = (size, new_long) if height <= width else (new_long, size)
    if new_size != (height, width):
        images = F.interpolate(images, new_size, mode="bicubic", antialias=True, align_corners=False)
        images = images.clamp(0, 1)  # PIL stores uint8, so its bicubic overshoot is clipped too
    top, left = (new_size[0] - size) // 2, (new_size[1] - size) // 2
    images = images[:, :, top : top + size, left : left + size]
    mean, std = (torch.tensor(v, dtype=images.dtype, device=images.device).view(3, 1, 1)
                 for v in (OPENAI_MEAN, OPENAI_STD))
    return (images - mean) / std


def read_weights(path, what: str) -> dict[str, torch.Tensor]:
    """weights.read_state_dict (safetensors, or torch.load(weights_only=True)); its CheckpointError also
    says which file was expected."""
    try:
        return read_state_dict(path)
    except CheckpointError as error:
        raise CheckpointError(f"{error} (expected: {what})") from None


def load_hf_clip(path, text_config: CLIPTextConfig, vision_config: CLIPVisionConfig, what: str) -> CLIPModel:
    """An HF CLIPModel: a folder (config.json + model.safetensors or pytorch_model.bin) or one weight file,
    which then has the given configs."""
    path = Path(path)
    if path.is_dir():
        files = [path / "model.safetensors", path / "pytorch_model.bin"]
        if not (path / "config.json").is_file() or not any(file.is_file() for file in files):
            raise CheckpointError(f"{path}: no config.json and model.safetensors (or pytorch_model.bin), as "
                                  f"saved by transformers' CLIPModel (expected: {what})")
        config = json.loads((path / "config.json").read_text())
        text_config = CLIPTextConfig.from_hf(config["text_config"], config.get("projection_dim"))
        vision_config = CLIPVisionConfig.from_hf(config["vision_config"])
        path = next(file for file in files if file.is_file())
    state_dict = convert_hf_clip_keys(read_weights(path, what))
    with torch.device("meta"):  # no random init of ~1B parameters that the file overwrites anyway
        model = CLIPModel(text_config, vision_config)
    return load_strict(model, state_dict, str(path))


OPEN_CLIP_PREFIXES = [  # (open_clip prefix, our prefix); the first match wins
    ("visual.transformer.resblocks.", "vision_model.encoder.layers."),
    ("visual.conv1.", "vision_model.embeddings.patch_embedding."),
    ("visual.class_embedding", "vision_model.embeddings.class_embedding"),
    ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    ("visual.ln_pre.", "vision_model.pre_layrnorm."),
    ("visual.ln_post.", "vision_model.post_layernorm."),
    ("transformer.resblocks.", "text_model.encoder.layers."),
    ("token_embedding.", "text_model.embeddings.token_embedding."),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
    ("ln_final.", "text_model.final_layer_norm."),
]
OPEN_CLIP_LAYER_PARTS = [(".ln_1.", ".layer_norm1."), (".ln_2.", ".layer_norm2."), (".attn.", ".self_attn."),
                         (".mlp.c_fc.", ".mlp.fc1."), (".mlp.c_proj.", ".mlp.fc2.")]


def convert_open_clip_keys(state_dict: dict) -> dict:
    """OpenCLIP names (HPSv2) -> ours (HF CLIPModel names): the fused qkv is split, projections transposed."""
    converted = {}
    for key, tensor in state_dict.items():
        if key in ("visual.proj", "text_projection"):  # open_clip computes x @ proj, nn.Linear x @ weight.T
            converted["visual_projection.weight" if key[0] == "v" else "text_projection.weight"] = tensor.T
            continue
        for old, new in OPEN_CLIP_PREFIXES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        for old, new in OPEN_CLIP_LAYER_PARTS:
            key = key.replace(old, new)
        if ".in_proj_" in key:  # self_attn.in_proj_{weight,bias}: rows are [q; k; v]
            prefix, kind = key.split(".in_proj_")
            for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3)):
                converted[f"{prefix}.{name}.{kind}"] = part
        else:
            converted[key] = tensor
    return {key: tensor.contiguous() for key, tensor in converted.items()}


# ----------------------------------------------------------------------------------------------------------
# Rewards


class Reward(nn.Module):
    """Checks the inputs, runs score() on the weights' device and dtype; returns [B] on images.device."""

    differentiable = True

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_images(images, prompts)
        if not self.differentiable and images.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(f"the {self.name} reward is not differentiable, it has no gradient to give: "
                               "call it under torch.no_grad() or on images.detach()")
        weight = next(self.parameters(), None)
        device = images.device if weight is None else weight.device
        dtype = weight.dtype if weight is not None else torch.promote_types(images.dtype, torch.float32)
        with torch.autocast(device.type, enabled=False):  # deviation 5: fp32 whatever the caller runs under
            scores = self.score(images.to(device, dtype), prompts)
        return scores.to(images.device, dtype)

    def train(self, mode: bool = True):  # a frozen scorer: dropout stays off even when a parent trains
        return super().train(False)


def brightness(images):
    """Mean Rec. 601 luma, in [0, 1]. Linear in the pixels."""
    luma = images.new_tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    return (images * luma).sum(dim=1).mean(dim=(1, 2))


def saturation(images):
    """Mean over pixels of the standard deviation of (R, G, B), scaled so a pure primary scores ~1, grey 0.

    The toy world's reward: toy.py mixes every colour with mid-grey, and this is linear in that vividness.
    Smooth (the epsilon keeps sqrt differentiable on grey pixels) and bounded in [0, 1].
    """
    return ((images.var(dim=1, unbiased=False) + 1e-6).sqrt() / (2 / 9 + 1e-6) ** 0.5).mean(dim=(1, 2))


def redness(images):
    """Soft fraction of red pixels, in (0, 1): sigmoid(12 (R - (G + B) / 2 - 0.3)) averaged over pixels."""
    red, green, blue = images.unbind(dim=1)
    return torch.sigmoid(12 * (red - (green + blue) / 2 - 0.3)).mean(dim=(1, 2))


def jpeg_incompressibility(images):
    """DDPO: JPEG (PIL, quality 95) file size in kB of the uint8-rounded image. Not differentiable."""
    pixels = (images * 255).round().clamp(0, 255).to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()  # NCHW -> NHWC
    sizes = []
    for pixel_array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(pixel_array).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes)


def jpeg_compressibility(images):
    """DDPO: minus the JPEG size in kB (smaller files score higher). Not differentiable."""
    return -jpeg_incompressibility(images)


class PixelReward(Reward):
    """A weight-free reward of the pixels alone; the prompts are ignored."""

    def __init__(self, fn, differentiable: bool = True):
        super().__init__()
        self.fn, self.name, self.differentiable = fn, fn.__name__, differentiable

    def score(self, images, prompts):
        return self.fn(images)


class AestheticMLP(nn.Module):
    """The predictor's head; the module indices give the .pth keys layers.{0,2,4,6,7} (Dropout is inert)."""

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(embed_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128),
                                    nn.Dropout(0.2), nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16),
                                    nn.Linear(16, 1))  # no nonlinearities: the whole head is one affine map

    def forward(self, embedding):
        return self.layers(embedding)


class AestheticReward(Reward):
    name = "aesthetic"

    def __init__(self, clip: CLIPModel, mlp: AestheticMLP):
        super().__init__()
        self.clip, self.mlp = clip, mlp
        self.requires_grad_(False).eval()

    def score(self, images, prompts):
        pixels = clip_preprocess(images, self.clip.vision_model.config.image_size)
        embedding = F.normalize(self.clip.get_image_features(pixels), dim=-1)
        return self.mlp(embedding).squeeze(-1)


class CLIPScoreReward(Reward):
    """A function of cos(image, text) of a CLIP model; `output` says which:
    "cosine" (HPSv2), "logits" = logit_scale.exp() * cosine (PickScore),
    "clipscore" = 100 * max(cosine, 0) (torchmetrics' CLIPScore)."""

    OUTPUTS = ("cosine", "logits", "clipscore")

    def __init__(self, name: str, clip: CLIPModel, tokenizer: CLIPTokenizer, output: str,
                 pad_id: int | None = None):
        super().__init__()
        if output not in self.OUTPUTS:
            raise ValueError(f"output must be one of {self.OUTPUTS}, got {output!r}")
        self.name, self.clip, self.tokenizer = name, clip, tokenizer
        self.output, self.pad_id = output, pad_id
        self.requires_grad_(False).eval()

    def score(self, images, prompts):
        pixels = clip_preprocess(images, self.clip.vision_model.config.image_size)
        image_features = F.normalize(self.clip.get_image_features(pixels), dim=-1)
        ids = self.tokenizer(prompts).to(images.device)
        if self.pad_id is not None:  # open_clip pads with 0 after <|endoftext|> (deviation 3)
            first_eos = (ids == self.tokenizer.eos_id).int().argmax(dim=1, keepdim=True)
            ids = ids.masked_fill(torch.arange(ids.shape[1], device=ids.device) > first_eos, self.pad_id)
        text_features = F.normalize(self.clip.get_text_features(ids), dim=-1)
        cosine = (image_features * text_features).sum(dim=-1)
        if self.output == "logits":
            return self.clip.logit_scale.exp() * cosine
        if self.output == "clipscore":
            return 100 * cosine.clamp(min=0)
        return cosine


def load_aesthetic(clip_path="weights/clip-vit-large-patch14",
                   mlp_path="weights/sac+logos+ava1-l14-linearMSE.pth") -> AestheticReward:
    """clip_path: HF openai/clip-vit-large-patch14 (folder or its model.safetensors); mlp_path: the .pth."""
    clip = load_hf_clip(clip_path, CLIPTextConfig.sd15(), CLIPVisionConfig.vit_l14(),
                        "aesthetic reward CLIP (HF openai/clip-vit-large-patch14)")
    mlp = AestheticMLP(clip.visual_projection.out_features)
    load_strict(mlp, read_weights(mlp_path, f"aesthetic reward MLP ({AESTHETIC_MLP_URL})"), str(mlp_path))
    return AestheticReward(clip, mlp)


def load_pickscore(path="weights/PickScore_v1") -> CLIPScoreReward:
    """path: the HF yuvalkirstain/PickScore_v1 folder (or its model.safetensors)."""
    clip = load_hf_clip(path, CLIPTextConfig.vit_h14_text(), CLIPVisionConfig.vit_h14(),
                        "PickScore (HF yuvalkirstain/PickScore_v1)")
    return CLIPScoreReward("pickscore", clip, CLIPTokenizer.default(), output="logits")


def load_hpsv2(path="weights/HPS_v2.1_compressed.pt", text_config=None, vision_config=None):
    """path: HPS_v2(.1)_compressed.pt from HF xswu/HPSv2: open_clip ViT-H-14 weights under ckpt['state_dict'].

    The file holds no config: ViT-H/14 unless the (test) configs are given."""
    state_dict = convert_open_clip_keys(read_weights(path, "HPSv2 (HPS_v2.1_compressed.pt, HF xswu/HPSv2)"))
    with torch.device("meta"):
        clip = CLIPModel(text_config or CLIPTextConfig.vit_h14_text(),
                         vision_config or CLIPVisionConfig.vit_h14())
    load_strict(clip, state_dict, str(path))
    tokenizer = CLIPTokenizer.default(text_cleaning="openai")
    return CLIPScoreReward("hpsv2", clip, tokenizer, output="cosine", pad_id=0)


def load_clipscore(clip_path="weights/clip-vit-large-patch14") -> CLIPScoreReward:
    """clip_path: HF openai/clip-vit-large-patch14 (folder or its model.safetensors), torchmetrics' default
    CLIPScore model. Text as transformers' CLIPTokenizer cleans it (torchmetrics uses CLIPProcessor)."""
    clip = load_hf_clip(clip_path, CLIPTextConfig.sd15(), CLIPVisionConfig.vit_l14(),
                        "CLIPScore CLIP (HF openai/clip-vit-large-patch14)")
    return CLIPScoreReward("clipscore", clip, CLIPTokenizer.default(), output="clipscore")


def load_toy_reward(cache_dir=".cache/toy") -> Reward:
    """The toy world's learned reward model (toy.ToyRewardModel; trained and cached on first use)."""
    import toy  # toy.py builds on this module: imported here, not at the top

    return toy.load_reward_model(cache_dir)


REWARDS = {
    "aesthetic": load_aesthetic,
    "pickscore": load_pickscore,
    "hpsv2": load_hpsv2,
    "clipscore": load_clipscore,
    "jpeg_compressibility": lambda: PixelReward(jpeg_compressibility, differentiable=False),
    "jpeg_incompressibility": lambda: PixelReward(jpeg_incompressibility, differentiable=False),
    "brightness": lambda: PixelReward(brightness),
    "saturation": lambda: PixelReward(saturation),
    "redness": lambda: PixelReward(redness),
    "toy": load_toy_reward,
}


def get_reward(name: str, device="cpu", dtype=torch.float32, **paths) -> Reward:
    """A reward by name, e.g. get_reward("aesthetic", "cuda", mlp_path="sac+logos+ava1-l14-linearMSE.pth").

    Scores come in float32 (float64: for gradcheck) whatever autocast the caller runs under (deviation 5).
    A missing or bad weight file raises weights.CheckpointError (one line: the file and the reason)."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; choose from {', '.join(REWARDS)}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"rewards score in float32 (or float64), got dtype={dtype} (deviation 5)")
    return REWARDS[name](**paths).to(device=device, dtype=dtype)


def main():
    parser = argparse.ArgumentParser(description="Reward models: score images or convert a checkpoint.")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="pickle (read with weights_only=True) -> safetensors")
    convert.add_argument("input", help="the .pth/.pt/.bin file (HPSv2: the weights under ckpt['state_dict'])")
    convert.add_argument("output", help="the .safetensors file to write")
    score = commands.add_parser("score", help="print the reward of image files")
    score.add_argument("reward", choices=list(REWARDS), help="reward name")
    score.add_argument("images", nargs="+", help="image files (any size; converted to RGB)")
    score.add_argument("--prompt", default="", help="the prompt of every image (pickscore, hpsv2, clipscore)")
    score.add_argument("--path", action="append", default=[], metavar="KEY=FILE",
                       help="weight paths, e.g. --path mlp_path=a.pth --path clip_path=clip-vit-l-14")
    score.add_argument("--device", default="cpu", help="torch device")
    args = parser.parse_args()
    try:
        run_command(args)
    except CheckpointError as error:  # a missing or bad weight file: one line, no traceback
        raise SystemExit(f"rewards.py: {error}") from None


def run_command(args):
    if args.command == "convert":
        state_dict = read_weights(args.input, "a .pth/.pt/.bin weights file to convert")
        save_file({key: tensor.contiguous() for key, tensor in state_dict.items()}, args.output)
        print(f"wrote {args.output}")
        return
    reward = get_reward(args.reward, args.device, **dict(p.split("=", 1) for p in args.path))
    with torch.no_grad():
        for file in args.images:
            pixels = torch.from_numpy(np.asarray(Image.open(file).convert("RGB"), dtype=np.float32) / 255)
            print(f"{file}\t{reward(pixels.permute(2, 0, 1)[None], [args.prompt]).item():.4f}")


if __name__ == "__main__":
    main()
