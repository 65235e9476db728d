"""The SD1.5 noise schedule, the DDIM step and keyed randomness, written in the papers' symbols.

- DDPM (Ho et al. 2020) Eq. 4, q(x_t|x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), and
  Eq. 15 / DDIM Eq. 9, Tweedie's estimate x0_pred of x_0 from eps_pred.
- DDIM (Song et al. 2021) Eq. 12, the generalized step
      x_{t-1} = sqrt(alpha_bar_prev) x0_pred + sqrt(1 - alpha_bar_prev - sigma_t^2) eps_pred
                + sigma_t z,
  and Eq. 16,
      sigma_t(eta) = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)
                              * (1 - alpha_bar_t / alpha_bar_prev)).
  As a policy p(x_{t-1} | x_t) = N(mean, sigma_t^2 I), the mean is Eq. 12 without sigma_t z;
  gaussian_log_prob is its log-density (pi(a_t | s_t) of DDPO / D3PO / SPO / TailorPO).

Notation (paper -> diffusers DDIMScheduler -> here):
    alpha_bar_t (DDIM writes alpha_t)  alphas_cumprod[t]     alpha_bar(t)
    alpha_bar_prev = alpha_bar_{t-1}   alpha_prod_t_prev     alpha_bar(prev_timestep(t, num_steps))
    eps_pred, x0_pred, sigma_t         model_output, pred_original_sample, std_dev_t

Deviations from the papers / diffusers
1. Betas and alphas_cumprod in float64 (diffusers: float32), cast on use to x's dtype but at least
   float32.
2. Only what SD1.5 needs: epsilon prediction, "leading" spacing, no x0 clipping or thresholding;
   from_config refuses other configs rather than sample differently. A key absent from a config
   means what it means to diffusers' DDIMScheduler (its default), except clip_sample: its default
   True would clip SD's latents (about +-4) to [-1, 1], which no SD pipeline does, and SD1.5
   folders written by newer diffusers omit the key.
3. t may be an int or a tensor of any shape on any device; no host sync when t is on the sample's
   device.
"""

import hashlib
import math
from typing import NamedTuple

import torch

# diffusers' DDIMScheduler defaults: what a scheduler config means by an absent key.
DIFFUSERS_DEFAULTS = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    set_alpha_to_one=True,
    steps_offset=0,
    clip_sample=False,  # DDIMScheduler's is True (deviation 2)
    prediction_type="epsilon",
    timestep_spacing="leading",
    thresholding=False,
    rescale_betas_zero_snr=False,
    trained_betas=None,
)
# SD1.5's scheduler/scheduler_config.json: where it differs from those defaults.
SD15_CONFIG = DIFFUSERS_DEFAULTS | dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    set_alpha_to_one=False,
    steps_offset=1,
)
# The config keys that would change the math, and the only value implemented here.
_REQUIRED = dict(
    prediction_type="epsilon",
    timestep_spacing="leading",
    clip_sample=False,
    thresholding=False,
    rescale_betas_zero_snr=False,
    trained_betas=None,
)


class NoiseSchedule:
    def __init__(self, betas: torch.Tensor, set_alpha_to_one: bool = False, steps_offset: int = 1):
        self.betas = betas.double()  # [T]
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)  # alpha_bar_t, [T]
        self.num_train_timesteps = len(betas)
        self.steps_offset = steps_offset
        # alpha_bar(-1), after the last step (diffusers' final_alpha_cumprod); SD1.5 reuses
        # alpha_bar_0.
        if set_alpha_to_one:
            self.final_alpha_bar = torch.ones(1).double()
        else:
            self.final_alpha_bar = self.alphas_cumprod[:1]
        # device -> [final_alpha_bar, alpha_bar_0 .. alpha_bar_{T-1}], so that index = t + 1
        self._tables = {}

    @classmethod
    def sd15(cls):
        return cls.from_config(SD15_CONFIG)

    @classmethod
    def from_config(cls, config: dict, source: str = "config"):
        """The schedule of a diffusers scheduler config (scheduler_config.json); an absent key takes
        DDIMScheduler's default, except clip_sample (deviation 2)."""
        c = {**DIFFUSERS_DEFAULTS, **config}
        for key, value in _REQUIRED.items():
            if c[key] != value:
                raise ValueError(f"{source}: {key}={c[key]!r} is not supported (only {value!r})")
        n = c["num_train_timesteps"]
        if c["beta_schedule"] == "scaled_linear":  # LDM's "linear": linear in sqrt(beta)
            sqrt_betas = torch.linspace(
                c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, n, dtype=torch.float64
            )
            betas = sqrt_betas**2
        elif c["beta_schedule"] == "linear":
            betas = torch.linspace(c["beta_start"], c["beta_end"], n, dtype=torch.float64)
        else:
            raise ValueError(
                f"{source}: beta_schedule={c['beta_schedule']!r} is not supported "
                "(scaled_linear or linear)"
            )
        return cls(betas, set_alpha_to_one=c["set_alpha_to_one"], steps_offset=c["steps_offset"])

    # ---- lookups (t: int or LongTensor of any shape; results shaped like t, float64, on t's
    # device)

    def alpha_bar(self, t) -> torch.Tensor:
        """alpha_bar_t; t = -1 (or below) means the final alpha_bar after the last DDIM step."""
        t = torch.as_tensor(t)
        device = t.device
        # The table is built once per device, so that lookups inside loops stay on the device.
        if device not in self._tables:
            dtype = torch.float32 if device.type == "mps" else torch.float64  # mps has no float64
            table = torch.cat([self.final_alpha_bar, self.alphas_cumprod])
            self._tables[device] = table.to(device, dtype)
        index = (t.clamp(min=-1) + 1).reshape(-1)  # a 0-d index would be read on the host (a sync)
        return self._tables[device][index].reshape(t.shape)

    def prev_timestep(self, t, num_steps: int):
        return t - self.num_train_timesteps // num_steps  # negative after the last step

    def ddim_timesteps(self, num_steps: int, device=None) -> torch.Tensor:
        """The DDIM sub-sequence with "leading" spacing: 50 steps -> [981, 961, ..., 1],
        20 -> [951, ..., 1] (made on `device`: no copy)."""
        if not 1 <= num_steps <= self.num_train_timesteps:
            raise ValueError(
                f"num_steps must be in [1, {self.num_train_timesteps}], got {num_steps}"
            )
        step_ratio = self.num_train_timesteps // num_steps
        steps = torch.arange(num_steps - 1, -1, -1, device=device)
        return steps * step_ratio + self.steps_offset

    # ---- the processes (x: [B, ...], t: int, 0-d or [B]); arithmetic in at least float32

    def _per_sample(self, t, x: torch.Tensor) -> torch.Tensor:
        """alpha_bar_t shaped [B, 1, 1, 1] (or 0-d) in x's dtype, at least float32 (deviation 1)."""
        values = self.alpha_bar(torch.as_tensor(t, device=x.device))
        values = values.reshape(values.shape + (1,) * (x.ndim - values.ndim))
        return values.to(torch.promote_types(x.dtype, torch.float32))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        alpha_bar_t = self._per_sample(t, x0)
        return alpha_bar_t.sqrt() * x0 + (1 - alpha_bar_t).sqrt() * noise  # Eq. 4 (DDPM)

    def x0_from_eps(self, x_t: torch.Tensor, eps_pred: torch.Tensor, t) -> torch.Tensor:
        alpha_bar_t = self._per_sample(t, x_t)
        # Eq. 9 (DDIM), Tweedie's estimate
        return (x_t - (1 - alpha_bar_t).sqrt() * eps_pred) / alpha_bar_t.sqrt()

    def ddim_step(
        self, eps_pred, t, x_t, num_steps: int, eta: float = 0.0, noise=None
    ) -> "DDIMStep":
        """One DDIM step x_t -> x_{t-1} (Eq. 12), in the stages of diffusers' DDIMScheduler.step.

        eps_pred, x_t: [B, C, h, w]; t: int, 0-d or [B] (one timestep per row); noise: z like x_t,
        or None.
        """
        # 1. the previous timestep on the DDIM sub-sequence (< 0 after the last step: the final
        # alpha_bar)
        t_prev = self.prev_timestep(torch.as_tensor(t), num_steps)
        # 2. alpha_bar_t and alpha_bar_prev, [B, 1, 1, 1]
        alpha_bar_t = self._per_sample(t, x_t)
        alpha_bar_prev = self._per_sample(t_prev, x_t)
        # 3. x0_pred, Tweedie's estimate of x_0 ("predicted x_0" of Eq. 12)
        x0_pred = self.x0_from_eps(x_t, eps_pred, t)  # Eq. 9 (DDIM)
        # 4. sigma_t(eta)
        variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)
        sigma_t = eta * variance.sqrt()  # Eq. 16 (DDIM)
        # 5. the "direction pointing to x_t" of Eq. 12
        direction = (1 - alpha_bar_prev - sigma_t**2).sqrt() * eps_pred
        # 6. the mean of p(x_{t-1} | x_t) = N(mean, sigma_t^2 I)
        mean = alpha_bar_prev.sqrt() * x0_pred + direction  # Eq. 12 (DDIM) without sigma_t z
        # 7. the sample
        if noise is None or eta == 0:
            x_prev = mean
        else:
            x_prev = mean + sigma_t * noise  # Eq. 12 (DDIM)
        return DDIMStep(x_prev, mean, sigma_t, x0_pred)


class DDIMStep(NamedTuple):
    """What one DDIM step computes; sigma_t is broadcastable to the others ([B, 1, 1, 1] or 0-d)."""

    x_prev: torch.Tensor  # x_{t-1} = mean + sigma_t z (diffusers' prev_sample)
    mean: torch.Tensor  # mu(x_t), the policy mean
    sigma_t: torch.Tensor  # std_dev_t of Eq. 16
    x0_pred: torch.Tensor  # Tweedie's x_0 estimate (diffusers' pred_original_sample)


def gaussian_log_prob(x, mean, std, reduction: str = "mean") -> torch.Tensor:
    """log N(x; mean, std^2 I) per sample [B]: x, mean [B, ...]; std broadcastable (0-d or
    [B, 1, ...]).

    "sum": the exact log-density of the D = C*H*W dimensional Gaussian. "mean": the sum / D, the
    convention of DDPO, D3PO and SPO code (the sum made exp(ratio) overflow in DDPO,
    jannerm/ddpo#10). std = 0 gives NaN.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    std = torch.as_tensor(std, device=x.device)
    log_density = -((x - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)
    log_density = log_density.flatten(1)
    if reduction == "mean":
        return log_density.mean(1)
    return log_density.sum(1)


# ---- Keyed randomness, all of training's: a draw is a pure function of (seed, the sample's global
# position, a stream name), so N processes draw as one with an N x batch, and a resume on any
# process count continues.


def keyed_generator(seed: int, position: int, stream: str) -> torch.Generator:
    """A CPU generator seeded by a stable hash of (seed, position, stream) (Python's hash() is
    salted)."""
    digest = hashlib.blake2b(f"{seed}/{position}/{stream}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def keyed_randn(seed: int, positions, shape, stream: str, device=None) -> torch.Tensor:
    """Standard normal [len(positions), *shape] float32; row i a function of (seed, positions[i],
    stream)."""
    rows = []
    for position in positions:
        generator = keyed_generator(seed, position, stream)
        rows.append(torch.randn(tuple(shape), generator=generator))
    return torch.stack(rows).to(device)
