"""Memory-lean training state: activation checkpointing, and AdamW for bfloat16 weights.

A GPT-2 small worker holds its weights, their gradients and Adam's two moments for the whole run. In
float32 that is 16 bytes per parameter (2.0 GB for 124M); with bfloat16 weights and gradients and
float32 moments it is 12 (1.5 GB). Plain Adam on bfloat16 weights loses most small updates: bfloat16
keeps 8 significant bits, so a weight of 0.05 moves in steps of ~2e-4 and an lr-1e-5 update rounds back
to the same value. :class:`StochasticRoundingAdamW` computes each update in float32 and rounds the new
weight up or down at random, with the probability that makes the rounding exact on average (Gupta et
al. 2015, "Deep Learning with Limited Numerical Precision"; Zamirai et al. 2020, "Revisiting BFloat16
Training"), so every update counts in expectation at no extra memory.
"""

from __future__ import annotations

import math

import torch


def stochastic_round_to_bfloat16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """float32 ``x`` rounded to bfloat16, up or down with probability proportional to the distance.

    bfloat16 is float32 without its low 16 bits: adding uniform noise in [0, 2**16) to the bit pattern and
    clearing those bits rounds up exactly when the noise carries into bit 16.
    """
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = (bits + noise) & -65536  # -65536 == 0xFFFF0000 as int32: clear the low 16 bits
    out = rounded.view(torch.float32).to(torch.bfloat16)
    # inf/nan bit patterns must not be perturbed into other values
    return torch.where(torch.isfinite(x), out, x.to(torch.bfloat16))


class StochasticRoundingAdamW(torch.optim.Optimizer):
    """AdamW with float32 moments; bfloat16 parameters get their float32 update stochastically rounded.

    float32 parameters are updated exactly as :class:`torch.optim.AdamW` does (decoupled weight decay,
    bias-corrected moments). The rounding noise comes from a generator seeded by (``seed``, step), so a
    run resumed from a checkpoint (optimizer state holds the step) draws the same noise.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, seed: int = 0):
        if lr <= 0 or eps <= 0 or not all(0 <= b < 1 for b in betas) or weight_decay < 0:
            raise ValueError(f"bad AdamW hyper-parameters: lr={lr}, betas={betas}, eps={eps}, wd={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.seed = int(seed)
        self._generators: dict[torch.device, torch.Generator] = {}

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but the moments stay float32 (torch casts loaded state to each parameter's dtype)."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if key != "step" and torch.is_tensor(value):
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32, copy=True)

    def _generator(self, device: torch.device, step: int) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        gen.manual_seed((self.seed * 1_000_003 + step) % (2 ** 63))
        return gen

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step over every parameter with a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] = state["step"] + 1  # a new tensor: a loaded state dict may share the old one
                step = int(state["step"])
                grad = p.grad.float()
                state["exp_avg"].lerp_(grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** step)).add_(group["eps"])
                weight = p.float()  # a float32 copy of a bfloat16 weight; p itself when already float32
                if group["weight_decay"]:
                    weight.mul_(1 - group["lr"] * group["weight_decay"])
                weight.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** step))
                if p.dtype == torch.bfloat16:
                    p.copy_(stochastic_round_to_bfloat16(weight, self._generator(p.device, step)))
                elif weight is not p:
                    p.copy_(weight)
        return loss


def make_optimizer(params, *, kind: str, lr: float, weight_decay: float, seed: int = 0) -> torch.optim.Optimizer:
    """``kind``: ``adam`` (torch's Adam, or AdamW when weight_decay > 0) or ``adamw_sr``."""
    params = list(params)
    if kind == "adamw_sr":
        return StochasticRoundingAdamW(params, lr=lr, weight_decay=weight_decay, seed=seed)
    if kind == "adam":
        cls = torch.optim.AdamW if weight_decay > 0 else torch.optim.Adam
        return cls(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {kind!r}; allowed: adam, adamw_sr")


def enable_activation_checkpointing(model) -> bool:
    """Recompute each transformer layer's activations in backward instead of storing them.

    Keeps one tensor per layer and token (its input) instead of ~25 KB per layer and token for GPT-2
    small in bfloat16, for about one more forward pass of compute in training. transformers applies it
    only in train mode, so every dropout probability is set to 0 here: train mode then computes exactly
    what eval mode does (the GRPO ratio must compare the same function). False when the model cannot.
    """
    enable = getattr(model, "activation_checkpointing_enable", None) or getattr(
        model, "gradient_checkpointing_enable", None)
    if enable is None or not getattr(model, "supports_gradient_checkpointing", False):
        return False
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):  # Llama-style layers keep the probability as a float
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    try:
        if enable.__name__ == "activation_checkpointing_enable":
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    except ValueError:  # "does not support activation checkpointing"
        return False
    return True
