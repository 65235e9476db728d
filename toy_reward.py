"""The toy reward model: the role PickScore plays for SD, learned from the toy pairs; NOT the hidden
utility.

r(image, prompt) is prompt-aware and differentiable in the image. It is fitted to toy.make_pairs()
with the Bradley-Terry loss of the RLHF reward-model step,

    L = -log sigmoid(r(x_w, c) - r(x_l, c))        (dpo.dpo_loss: beta = 1, log-ratios r_w, r_l)

and used by the online methods and Diffusion-DPO with AI feedback; it never sees toy.judge()'s
internals. Held-out pairwise accuracy of the cached default: 0.95 (training prompts), 0.89 (held-out
prompts; u 0.91).

Imports run one way, toy -> toy_reward -> data, dpo, weights: the door (toy.World.reward) hands this
file the world's prompt-aware feature maps (toy.reward_features), the pairs folder and the cache
path; evaluate.load_rewards wraps it in rewards.ModelReward for --reward=toy.
"""

import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from data import PreferencePairs, unit_pixels
from dpo import dpo_loss
from progress import bar
from state_dicts import load_strict


class ToyRewardModel(nn.Module):
    """The learned toy reward (the PickScore role): a logit, fitted to the toy pairs.

    A small CNN on fixed, prompt-aware feature maps (as the LAION aesthetic predictor is an MLP on
    CLIP embeddings): two 3x3 convolutions with GELU, mean and max pooling, a linear head; images in
    [0, 1]. features(images, prompts) -> [B, channels, H, W]: the world's (toy.reward_features).
    """

    def __init__(self, features, channels: int, width: int = 16):
        super().__init__()
        self.features = features
        self.convs = nn.ModuleList(
            [nn.Conv2d(channels, width, 3, padding=1), nn.Conv2d(width, width, 3, padding=1)]
        )
        self.head = nn.Linear(2 * width, 1)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """r(images [B, 3, H, W] in [0, 1], prompts) -> [B]."""
        h = self.features(images, prompts)
        for conv in self.convs:
            h = F.gelu(conv(h))
        return self.head(torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)).squeeze(1)


# Part of the cache key (toy.load_reward_model): bump it when train_reward_model learns other
# weights from the same pairs and config, or every existing cache keeps serving the old model.
VERSION = 2


@dataclass
class RewardModelConfig:
    width: int = 16  # ToyRewardModel channels
    steps: int = 400  # AdamW steps of the Bradley-Terry loss
    batch_size: int = 64  # pairs per step
    lr: float = 3e-3
    weight_decay: float = 1e-2
    validation: int = 256  # pairs of the training prompts kept out of training, for accuracy
    seed: int = 0


def _pair_tensors(folder: str):
    """(winners, losers [N, 3, H, W] in [0, 1], captions) of a pairs.jsonl folder via data.py (no
    ties)."""
    pairs = PreferencePairs(folder, resolution=16, hflip=False, prompt_dropout=0.0)
    (batch,) = pairs.batches(len(pairs))
    return unit_pixels(batch["pixels_w"]), unit_pixels(batch["pixels_l"]), batch["captions"]


def pairwise_accuracy(reward_fn, winners, losers, captions) -> float:
    """Fraction of pairs the reward orders as labelled (ties in score count 1/2)."""
    with torch.no_grad():
        margin = reward_fn(winners, captions) - reward_fn(losers, captions)
    return ((margin > 0).float() + 0.5 * (margin == 0).float()).mean().item()


def _augment(images, flip, blur):
    """images [B,3,H,W] blended with their 3x3 box blur by blur [B,1,1,1] in [0, 1], flipped
    where flip."""
    images = torch.lerp(images, F.avg_pool2d(images, 3, 1, 1, count_include_pad=False), blur)
    return torch.where(flip, images.flip(-1), images)


def train_reward_model(
    pairs_folder: str,
    features,
    channels: int,
    config: RewardModelConfig | None = None,
    judge=None,
    progress: bool = True,
):
    """Fit ToyRewardModel(features, channels) to the pairs with the Bradley-Terry loss; returns
    (model, pairwise accuracies; with `judge`, also the judge's on the held-out prompts). Both
    images of a pair get a horizontal flip (p 1/2) and (p 1/2) a blend with a 3x3 box blur of random
    strength, so that the blurry x0_pred of early steps (which TailorPO scores) rank like finished
    images."""
    config = config or RewardModelConfig()
    winners, losers, captions = _pair_tensors(pairs_folder)

    def pick(rows):  # the pairs at rows
        return winners[rows], losers[rows], [captions[i] for i in rows]

    order = torch.randperm(len(captions), generator=torch.Generator().manual_seed(config.seed))
    validation, train = order[: config.validation], order[config.validation :]
    torch.manual_seed(config.seed)
    model = ToyRewardModel(features, channels, config.width)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    generator = torch.Generator().manual_seed(config.seed)
    steps = bar(range(config.steps), desc="toy reward model", unit="step", disable=not progress)
    for step in steps:
        batch = train[torch.randint(len(train), (config.batch_size,), generator=generator)]
        flip = torch.rand(len(batch), 1, 1, 1, generator=generator) < 0.5
        blur = torch.rand(len(batch), 1, 1, 1, generator=generator)
        blur = blur * (torch.rand(len(batch), 1, 1, 1, generator=generator) < 0.5)
        images_w, images_l, texts = pick(batch)
        reward_w = model(_augment(images_w, flip, blur), texts)
        reward_l = model(_augment(images_l, flip, blur), texts)
        loss = dpo_loss(reward_w, reward_l, beta=1.0)[0]  # Bradley-Terry: -log sigmoid(r_w - r_l)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for group in optimizer.param_groups:  # cosine decay to 0
            group["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * (step + 1) / config.steps))
    model.eval().requires_grad_(False)
    held_out = _pair_tensors(os.path.join(pairs_folder, "heldout"))
    metrics = {
        "train_accuracy": pairwise_accuracy(model, *pick(train)),
        "validation_accuracy": pairwise_accuracy(model, *pick(validation)),
        "held_out_prompts_accuracy": pairwise_accuracy(model, *held_out),
    }
    if judge is not None:
        metrics["utility_held_out_prompts_accuracy"] = pairwise_accuracy(judge, *held_out)
    return model, metrics


def save_atomically(tensors: dict, metadata: dict, path: str):
    """A safetensors file written whole or not at all: a per-process temporary renamed onto `path`,
    so that several processes filling the cache at once never leave (or read) a truncated file."""
    temporary = f"{path}.tmp{os.getpid()}"
    save_file(tensors, temporary, metadata)
    os.replace(temporary, path)


def load_reward_model(
    path: str,
    pairs_folder: str,
    features,
    channels: int,
    device="cpu",
    config: RewardModelConfig | None = None,
    judge=None,
    progress: bool = True,
) -> ToyRewardModel:
    """The learned reward model, frozen: read from `path`, or trained on the pairs
    (train_reward_model) and saved there on the first call (toy.load_reward_model names the path
    after the pairs and the config)."""
    config = config or RewardModelConfig()
    if not os.path.isfile(path):
        model, metrics = train_reward_model(
            pairs_folder, features, channels, config, judge, progress
        )
        accuracies = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
        print(f"trained the toy reward model; pairwise accuracy: {accuracies}")
        save_atomically(model.state_dict(), {k: str(v) for k, v in metrics.items()}, path)
    model = load_strict(ToyRewardModel(features, channels, config.width), load_file(path), path)
    return model.eval().requires_grad_(False).to(device)
