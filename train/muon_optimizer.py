"""One optimizer for the Muon recipe: Muon for hidden matrices, AdamW for everything else.

Muon groups (``use_muon=True``) run ``torch.optim.Muon``'s own update kernel
(``torch.optim._muon._single_tensor_muon``: Nesterov momentum 0.95, 5 quintic Newton-Schulz steps
in bf16, decoupled weight decay ``p *= 1 - lr * wd``) with ``adjust_lr_fn``:

- ``match_rms_adamw`` (default; Moonlight / the paper's recipe): each matrix [A, B] moves by
  ``lr * 0.2 * sqrt(max(A, B))`` times an orthogonal update, which gives the update the RMS of an
  AdamW step at the same lr. So the paper's Muon lr 4e-4 (wd 0.1) is an AdamW-scale lr and
  ``optim.lr`` means the same thing under ``kind=adamw`` and ``kind=muon``.
- ``original`` (Keller Jordan): ``lr * sqrt(max(1, A / B))``; needs lrs around 0.02.

Routed experts' weights [E, out, in] are E matrices: each expert is orthogonalised on its own
([out, in] slices, the per-expert shape sets the lr adjustment), never the flattened [E*out, in].

AdamW groups use ``torch.optim.adam.adam`` with decoupled weight decay, the kernel of
``torch.optim.AdamW`` (Adam where ``weight_decay`` is 0, e.g. the Engram tables). A group with
``lazy=True`` updates only the entries whose gradient is non-zero this step: an Engram table row no
token looked up keeps its weight and both Adam moments (bias correction uses the step count of
the table, as in lazy Adam); the dense default moves every row along its old momentum.

Under the DeepSpeed engine. ZeRO 0 hands this optimizer the real parameters. ZeRO 1/2 flatten
each group into a 1-D fp32 partition per rank, where no one can orthogonalise; DeepSpeed 0.19
recognises Muon (a ``MuonWithAuxAdam`` subclass whose parameters carry ``use_muon``): it gathers
each full gradient, runs its Muon update (same Newton-Schulz coefficients and steps; here
``ns_method='standard'``, Nesterov, the group's momentum; momentum kept in its own partition
buffers) and writes the orthogonalised update, scaled by ``sqrt(max(1, A / B))``, into the
partition's gradient. :meth:`MuonAdamW.step` then applies it with ``lr * zero_lr_scale``, the ratio
of the configured adjustment to DeepSpeed's: Muon groups are split by matrix shape so that one
scale holds per flat partition. Gradient clipping: ZeRO 0 clips the raw gradient before Muon (as
Moonlight does); ZeRO 1/2 would clip the orthogonalised updates, whose norm (~sqrt(width) per matrix)
would shrink every step, so train/optim.py refuses Muon there unless ``train.grad_clip=0``.
"""
from __future__ import annotations

import torch
from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, DEFAULT_NS_STEPS, EPS, \
    _single_tensor_muon
from torch.optim.adam import adam as adam_kernel

from train.muon import ADJUST_LR_FNS


class MuonAdamW(MuonWithAuxAdam):
    """Param groups: ``use_muon`` + ``lr`` + ``weight_decay`` always; Muon groups add ``momentum``,
    ``adjust_lr_fn`` and ``zero_lr_scale``; AdamW groups add ``betas``, ``eps`` and ``lazy``."""

    def __init__(self, param_groups: list[dict]):
        for g in param_groups:
            if g["use_muon"]:
                if g["adjust_lr_fn"] not in ADJUST_LR_FNS:
                    raise ValueError(f"optim.muon.adjust_lr_fn must be one of {ADJUST_LR_FNS}, "
                                     f"got {g['adjust_lr_fn']!r}")
                g.setdefault("ns_method", "standard")  # DeepSpeed's ZeRO path: torch's NS iteration
        super().__init__(param_groups)

    @torch.no_grad()
    def step(self, closure=None, step_id=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_group(group)
            else:
                self._adamw_group(group)
        return loss

    def _muon_group(self, group: dict) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.ndim < 2:  # ZeRO 1/2 flat partition: the gradient already holds DeepSpeed's Muon update
                p.mul_(1 - lr * wd)
                p.add_(p.grad, alpha=-lr * group["zero_lr_scale"])
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            # [out, in] -> one matrix; [E, out, in] -> E matrices, each orthogonalised alone
            mats = ([p], [p.grad], [buf]) if p.ndim == 2 else (list(p.unbind(0)), list(p.grad.unbind(0)),
                                                               list(buf.unbind(0)))
            _single_tensor_muon(*mats, lr=lr, weight_decay=wd, momentum=group["momentum"], nesterov=True,
                                ns_coefficients=(DEFAULT_A, DEFAULT_B, DEFAULT_C), ns_steps=DEFAULT_NS_STEPS,
                                eps=EPS, adjust_lr_fn=group["adjust_lr_fn"], has_complex=False)

    def _adamw_group(self, group: dict) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            tensors = [p, p.grad, state["exp_avg"], state["exp_avg_sq"]]
            touched = None
            if group["lazy"]:
                touched = p.grad.reshape(-1).nonzero().squeeze(1)  # entries some token looked up
                tensors = [t.reshape(-1).index_select(0, touched) for t in tensors]
            adam_kernel([tensors[0]], [tensors[1]], [tensors[2]], [tensors[3]], [], [state["step"]],
                        foreach=False, decoupled_weight_decay=True, amsgrad=False, beta1=group["betas"][0],
                        beta2=group["betas"][1], lr=group["lr"], weight_decay=group["weight_decay"],
                        eps=group["eps"], maximize=False)
            if touched is not None:
                for full, sub in zip((p, state["exp_avg"], state["exp_avg_sq"]), (tensors[0], tensors[2],
                                                                                  tensors[3])):
                    full.view(-1).index_copy_(0, touched, sub)
