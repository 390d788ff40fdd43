"""Samplers as swappable scheduler objects, in diffusers' manner: `set_timesteps`, `timesteps`,
`step(model_output, timestep, sample).prev_sample`, the config from `register_to_config`, saved
by `save_pretrained` into a model folder's `scheduler/`.

They integrate dx/dt = v (the velocity the pipeline gives) from noise level `start` (1: pure
noise; below it, SDEdit from a noised image) to exactly 0 on a uniform grid shifted by `shift`
(t' = shift t / (1 + (shift - 1) t); > 1 spends more steps near noise). A timestep is the noise
level itself, t in [0, 1], the value the transformer is trained on; levels are float64.

diffusers' FlowMatchEulerDiscreteScheduler / FlowMatchHeunDiscreteScheduler give other numbers:
float32 levels (shifted and differenced in float32), timesteps in [0, num_train_timesteps], a
default grid ending at 1 / num_train_timesteps, no start level for the Heun one, and a Heun
derivative recomputed as (x - (x - v t)) / t; hence these two small classes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from .errors import ModelError


class FlowMatchScheduler(SchedulerMixin, ConfigMixin):
    """The shifted noise-level grid both samplers step on (one Euler step per level)."""

    order = 1

    @register_to_config
    def __init__(self, shift: float = 1.0) -> None:
        self.sigmas = torch.zeros(0, dtype=torch.float64)  # the levels, steps + 1 of them
        self.timesteps = self.sigmas  # the levels the model is evaluated at, in order
        self._step_index = 0

    def set_timesteps(self, num_inference_steps: int, start: float = 1.0) -> None:
        """`num_inference_steps` steps from noise level `start` down to 0."""
        shift = float(self.config.shift)
        u0 = start / (shift - (shift - 1) * start)  # the unshifted level whose shift is `start`
        ts = np.linspace(u0, 0.0, num_inference_steps + 1)
        self.sigmas = torch.from_numpy(shift * ts / (1 + (shift - 1) * ts))
        self.timesteps = self._evaluations()
        self._step_index = 0

    def _evaluations(self) -> torch.Tensor:
        return self.sigmas[:-1]

    @property
    def state_in_first_order(self) -> bool:
        """True between whole steps (a step of a second-order sampler takes two calls)."""
        return True

    def _levels(self) -> tuple[float, float]:
        i = self._step_index
        return float(self.sigmas[i]), float(self.sigmas[i + 1])

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor,
             sample: torch.Tensor) -> SchedulerOutput:
        """x + (t_next - t) v; `timestep` is `timesteps[i]` of the i-th call (the scheduler counts)."""
        t, t_next = self._levels()
        self._step_index += 1
        return SchedulerOutput(prev_sample=sample + (t_next - t) * model_output)


class FlowMatchEulerScheduler(FlowMatchScheduler):
    """Euler steps; one step from pure noise is the one-step readout x0 = noise - v(noise, 1)."""


class FlowMatchHeunScheduler(FlowMatchScheduler):
    """Heun (2nd order): an Euler predictor to the next level, then the mean of both velocities;
    the last step, to level 0, is plain Euler. `timesteps` lists every model evaluation."""

    order = 2
    _predicted: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (v, x) of the predictor

    def set_timesteps(self, num_inference_steps: int, start: float = 1.0) -> None:
        super().set_timesteps(num_inference_steps, start)
        self._predicted = None

    def _evaluations(self) -> torch.Tensor:
        s = self.sigmas.tolist()
        return torch.tensor([t for i in range(len(s) - 1)
                             for t in (s[i:i + 2] if s[i + 1] > 0 else s[i:i + 1])], dtype=torch.float64)

    @property
    def state_in_first_order(self) -> bool:
        return self._predicted is None

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor,
             sample: torch.Tensor) -> SchedulerOutput:
        if self._predicted is not None:  # the corrector: from the step's start, the mean velocity
            (v, sample), self._predicted = self._predicted, None
            return super().step((v + model_output) / 2, timestep, sample)
        t, t_next = self._levels()
        if t_next <= 0:  # the last step: Euler
            return super().step(model_output, timestep, sample)
        self._predicted = (model_output, sample)  # the predictor: an Euler step to the next level
        return SchedulerOutput(prev_sample=sample + (t_next - t) * model_output)


#: The samplers by the names `generate` / `translate` take.
SCHEDULERS: dict[str, type[FlowMatchScheduler]] = {"euler": FlowMatchEulerScheduler,
                                                   "heun": FlowMatchHeunScheduler}


def load_scheduler(folder: Path) -> FlowMatchScheduler:
    """The scheduler saved in `folder` (a model folder's `scheduler/`), one of this module's
    classes by its `_class_name` (a name, never an import)."""
    name = json.loads((folder / FlowMatchScheduler.config_name).read_text()).get("_class_name")
    classes = {cls.__name__: cls for cls in SCHEDULERS.values()}
    if name not in classes:
        raise ModelError(f"{folder} holds a scheduler {name!r}; known: {', '.join(classes)}")
    return classes[name].from_pretrained(folder)
