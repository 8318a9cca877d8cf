"""DeepSeekMoE feed-forward block: shared experts + fine-grained routed experts.

    y_t = sum_{shared j} FFN_j(x_t) + sum_{i in topk(s_t + b)} g_{t,i} FFN_i(x_t)

with s_t the router affinities, b the selection-only balancing bias and g the combine weights
(from s_t alone; optionally normalised over the k chosen; times route_scale). Dropless: every
token reaches all of its k experts whatever the load.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from core.accounting import Counts
from core.distributed import all_reduce_sum
from core.param_groups import tag
from models.ffn import SwiGLU
from models.moe.balancing import load_stats, sequence_aux_loss, update_expert_bias_
from models.moe.config import MoEConfig
from models.moe.dispatch import ExpertDispatch
from models.moe.experts import RoutedExperts
from models.moe.parallel import ExpertShard, expert_parallel_compute
from models.moe.router import TopKRouter


class MoEFFN(nn.Module):
    """Drop-in FFN: ``forward(x [B, T, d]) -> [B, T, d]``.

    Training-step forwards (``module.training`` and grad enabled) accumulate per-expert token
    counts and, when the balance mode asks for it, set ``self.aux_loss``; other forwards (eval,
    no_grad) leave the balancing state untouched and set ``aux_loss = None``. After every
    optimizer step the owner calls :meth:`on_optimizer_step`, which all-reduces the counts of the
    step (all micro-batches, all ranks), updates the selection bias and records load metrics.
    Activation recomputation would count a micro-batch twice; relative loads, hence the sign
    update, are unaffected.
    """

    def __init__(self, cfg: MoEConfig, d_model: int, layer_id: int, init_std: float = 0.02,
                 out_std: float = 0.02):
        super().__init__()
        self.cfg, self.d_model, self.layer_id = cfg, d_model, layer_id
        self.router = TopKRouter(d_model, cfg.n_routed_experts, cfg.top_k, cfg.score_func, cfg.norm_topk,
                                 cfg.route_scale, init_std)
        self.experts = RoutedExperts(d_model, cfg.expert_hidden, cfg.n_routed_experts, cfg.top_k,
                                     init_std, out_std)
        self.shared: Optional[SwiGLU] = None
        if cfg.n_shared_experts > 0:
            # n_s shared SwiGLU experts of hidden h == one SwiGLU of hidden n_s * h (a sum over units).
            self.shared = SwiGLU(d_model, cfg.n_shared_experts * cfg.expert_hidden, init_std, out_std)
            for p in self.shared.parameters():
                tag(p, "experts")
        self.shard: Optional[ExpertShard] = None  # set by set_expert_shard: this rank holds a block of experts
        self.aux_loss: Optional[torch.Tensor] = None
        self._step_load: Optional[torch.Tensor] = None  # int64 [E]: tokens per expert this step
        self._last_load: Optional[torch.Tensor] = None  # float32 [E]: all-reduced counts of the last routed step

    def set_expert_shard(self, shard: ExpertShard) -> None:
        """Hold only ``shard``'s block of routed experts and exchange rows with its EP group in forward.
        The per-expert loads stay global: every rank routes over all E experts, and the post-step
        all-reduce sums every rank's counts (the EP group's and the data-parallel ranks')."""
        if shard.n_experts != self.cfg.n_routed_experts:
            raise ValueError(f"expert shard over {shard.n_experts} experts for a layer of {self.cfg.n_routed_experts}")
        self.experts.shard_(shard.first, shard.local)
        self.shard = shard

    @property
    def metric_prefix(self) -> str:
        return f"moe/layer{self.layer_id}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"MoE layer expects [B, T, {self.d_model}] input, got {tuple(x.shape)}")
        B, T, d = x.shape
        flat = x.reshape(B * T, d)
        routing = self.router(flat)
        dispatch = ExpertDispatch.from_expert_ids(routing.expert_ids, self.cfg.n_routed_experts)
        rows = dispatch.permute(flat)  # [B*T*k, d] sorted by expert
        if self.shard is None:
            expert_out = self.experts(rows, dispatch.tokens_per_expert, self.cfg.impl)
        else:
            expert_out = expert_parallel_compute(rows, dispatch.tokens_per_expert, self.shard, self.experts,
                                                 self.cfg.impl)
        out = dispatch.combine(expert_out, routing.weights)
        if self.shared is not None:
            out = self.shared(flat) + out

        training_step = self.training and torch.is_grad_enabled()
        if training_step:
            load = dispatch.tokens_per_expert.detach()
            self._step_load = load.clone() if self._step_load is None else self._step_load + load
        self.aux_loss = None
        if training_step and self.cfg.uses_aux_loss:
            self.aux_loss = sequence_aux_loss(routing.scores, routing.expert_ids, B, T, self.cfg.score_func,
                                              self.cfg.aux_loss_coef)
        return out.view(B, T, d)

    @torch.no_grad()
    def on_optimizer_step(self) -> None:
        """Consume this step's token counts: all-reduce, update the bias, keep the load for metrics.

        Every rank must call it after every optimizer step (it is a collective when
        torch.distributed is initialised, even on a rank that routed no token). A model of several MoE
        layers calls :meth:`take_step_load` / :meth:`apply_step_load` instead, with one all-reduce for all
        of them (:meth:`models.transformer.Transformer.on_optimizer_step`)."""
        self.apply_step_load(all_reduce_sum(self.take_step_load()))

    @torch.no_grad()
    def take_step_load(self) -> torch.Tensor:
        """This rank's tokens per routed expert since the last step ([E] fp32, zeros where none was
        routed), and reset: what the caller sums over ranks before :meth:`apply_step_load`."""
        bias = self.router.expert_bias
        if self._step_load is None:
            load = torch.zeros(self.cfg.n_routed_experts, dtype=torch.float32, device=bias.device)
        else:
            load = self._step_load.to(device=bias.device, dtype=torch.float32)
        self._step_load = None
        return load

    @torch.no_grad()
    def apply_step_load(self, load: torch.Tensor) -> None:
        """Update the bias from the global load ([E], summed over ranks) and keep it for metrics.

        Nothing here reads a value back to the host: the bias update is a no-op where no token was
        routed (a device-side select, not a Python branch), so a GPU step never waits on it. The load
        statistics are computed from the last step's counts only when :meth:`metrics` is called (once
        per log interval)."""
        bias = self.router.expert_bias
        routed = load.sum() > 0  # a 0-d device tensor: selects below, never a Python branch
        if self.cfg.uses_bias:
            updated = update_expert_bias_(bias.clone(), load, self.cfg.bias_update_rate)
            bias.copy_(torch.where(routed, updated, bias))
        # metrics keep the last step that routed tokens
        self._last_load = load if self._last_load is None else torch.where(routed, load, self._last_load)

    def metrics(self) -> dict[str, float]:
        """Load metrics of the last optimizer step that routed tokens ({} before the first).
        Reads the device: call it at log steps only."""
        if self._last_load is None:
            return {}
        stats = load_stats(self._last_load)
        if not stats:
            return {}
        stats["bias_norm"] = self.router.expert_bias.norm().item()
        return {f"{self.metric_prefix}/{k}": v for k, v in stats.items()}

    def counts(self, seq_len: int) -> Counts:
        c = self.router.counts(seq_len) + self.experts.counts(seq_len)
        if self.shared is not None:
            c = c + self.shared.counts(seq_len)
        return c

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"layer={self.layer_id}, routed={c.n_routed_experts}, shared={c.n_shared_experts}, "
                f"top_k={c.top_k}, hidden={c.expert_hidden}, score={c.score_func}, balance={c.balance}, "
                f"impl={c.impl}")


def build_moe_ffn(cfg: MoEConfig, d_model: int, layer_id: int, init_std: float,
                  out_std: float) -> Optional[MoEFFN]:
    """The MoE FFN of layer ``layer_id``, or None where the layer stays dense (< n_dense_layers)."""
    if layer_id < cfg.n_dense_layers:
        return None
    return MoEFFN(cfg, d_model, layer_id, init_std, out_std)
