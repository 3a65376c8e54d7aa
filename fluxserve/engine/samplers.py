"""Thin adaptations that let diffusers' flow-matching schedulers run correctly inside FluxPipeline.

FluxPipeline calls `scheduler.set_timesteps(..., mu=...)` (plus `sigmas=` unless the config has
`use_flow_sigmas`) and `scheduler.step(noise_pred, t, latents)`. Four things need a small nudge:

- Stochastic samplers draw noise in `step()` from the generator they are handed, and the pipeline
  hands them none, so they would use torch's global RNG: not reproducible, and not safe with
  concurrent jobs. `SeededNoise` passes the job's own generator instead.
- The multistep solvers' own Karras/exponential/beta options replace the flow sigmas with
  variance-exploding ones (up to ~157) and give NaN. `FlowSigmaSpacing` keeps the (shifted) flow
  schedule and only respaces it between its first and last sigma, with diffusers' own conversions,
  exactly as FlowMatchEulerDiscreteScheduler does for `use_karras_sigmas` and friends.
- DEIS keeps its last sigma instead of stepping to 0, so its image keeps that much noise;
  `FinalStepToZero` makes its last step land on the clean sample (an Euler step to sigma 0).
- FlowMatchHeunDiscreteScheduler takes neither `sigmas` nor `mu`; `FlowMatchHeun` accepts both.

Every adapted class is a subclass of the diffusers class it adapts; its config is the diffusers config.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch


class SeededNoise:
    """Mixin: `step()` draws its noise from `self.generator` (the job's), never torch's global RNG."""

    generator: torch.Generator | None = None

    def step(self, *args, **kwargs):
        kwargs.setdefault("generator", self.generator)
        return super().step(*args, **kwargs)


class IgnoreMuWithoutShifting:
    """Mixin: FluxPipeline always passes `mu`; a scheduler without dynamic shifting must not see it."""

    def set_timesteps(self, *args, mu=None, **kwargs):
        if self.config.get("use_dynamic_shifting", False):
            kwargs["mu"] = mu
        return super().set_timesteps(*args, **kwargs)


class FlowSigmaSpacing:
    """Mixin: respace the flow sigmas (Karras, exponential or beta) between their own end points."""

    sigma_spacing: str = ""

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        flow_sigmas = self.sigmas[:-1].numpy().astype(np.float64)
        convert = getattr(self, f"_convert_to_{self.sigma_spacing}")
        spaced = np.asarray(convert(in_sigmas=flow_sigmas, num_inference_steps=len(flow_sigmas)), np.float32)
        self.sigmas = torch.cat([torch.from_numpy(spaced), self.sigmas[-1:]])
        timesteps = torch.from_numpy(spaced * self.config.num_train_timesteps)
        self.timesteps = timesteps.to(device=self.timesteps.device, dtype=self.timesteps.dtype)


class FinalStepToZero:
    """Mixin for solvers whose last sigma is not 0: the last step returns the predicted clean sample."""

    def step(self, model_output, timestep, sample, return_dict: bool = True, **kwargs):
        if self.step_index is None:
            self._init_step_index(timestep)
        if self.step_index < len(self.timesteps) - 1:
            return super().step(model_output, timestep, sample, return_dict=return_dict, **kwargs)
        # Flow matching: x0 = x_t - sigma_t * v, the same as one Euler step from sigma_t to 0.
        sigma = self.sigmas[self.step_index].to(sample.device, torch.float32)
        clean = (sample.to(torch.float32) - sigma * model_output.to(torch.float32)).to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (clean,)
        from diffusers.schedulers.scheduling_utils import SchedulerOutput

        return SchedulerOutput(prev_sample=clean)


def _flux_time_shift(mu: float, sigmas: np.ndarray) -> np.ndarray:
    """FLUX's resolution-dependent shift, as FlowMatchEulerDiscreteScheduler applies it."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


@functools.cache
def flow_match_heun():
    from diffusers import FlowMatchHeunDiscreteScheduler

    class FlowMatchHeun(FlowMatchHeunDiscreteScheduler):
        """Heun's method (2 model calls a step, one on the last) on FLUX's shifted flow sigmas."""

        def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None):
            if sigmas is None:
                sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
            sigmas = np.asarray(sigmas, dtype=np.float64)
            if mu is not None and self.config.get("use_dynamic_shifting", False):
                sigmas = _flux_time_shift(mu, sigmas)
            else:
                sigmas = self.config.shift * sigmas / (1 + (self.config.shift - 1) * sigmas)
            sigmas = torch.from_numpy(sigmas).to(dtype=torch.float32, device=device)
            self.num_inference_steps = len(sigmas)
            timesteps = sigmas * self.config.num_train_timesteps
            self.timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)])
            sigmas = torch.cat([sigmas, torch.zeros(1, device=sigmas.device)])
            self.sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
            self.prev_derivative = None
            self.dt = None
            self._step_index = None
            self._begin_index = None

    return FlowMatchHeun


@functools.cache
def sampler_class(class_name: str, *, stochastic: bool, sigma_spacing: str, final_step_to_zero: bool):
    """The diffusers scheduler class, with the adaptations a table entry asks for mixed in."""
    import diffusers

    base = flow_match_heun() if class_name == "FlowMatchHeunDiscreteScheduler" else getattr(diffusers, class_name)
    mixins: list[type] = []
    if stochastic:
        mixins.append(SeededNoise)
    if sigma_spacing:
        mixins.append(FlowSigmaSpacing)
    if final_step_to_zero:
        mixins.append(FinalStepToZero)
    if "use_flow_sigmas" in base.__init__.__code__.co_varnames:
        mixins.append(IgnoreMuWithoutShifting)
    if not mixins:
        return base
    return type(base.__name__, (*mixins, base), {"sigma_spacing": sigma_spacing, "__module__": __name__})
