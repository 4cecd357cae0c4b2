"""Hugging Face transformers integration: a Trainer that adds the MoE auxiliary losses, attention mask wiring."""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn

try:
    from transformers import Trainer
except ImportError as err:  # torch_moe itself never needs transformers; only this module does
    raise ImportError("torch_moe.integrations.hf needs the transformers package: pip install transformers") from err

from ..convert import moefy
from ..feedforward import _install_attention_mask_hook, padding_mask
from ..layer import aux_loss
from ..balancing import GlobalBatchBalancing

__all__ = ["MoETrainer", "add_aux_loss", "route_attention_mask", "moefy", "padding_mask"]


def route_attention_mask(model: nn.Module) -> nn.Module:
    """Make ``model``'s ``attention_mask`` argument reach the MoE layers converted by :func:`moefy` inside it.

    :func:`moefy` already does this on the model it converts; call this when that model is wrapped by another one
    that you call instead (say, a base model converted and then wrapped in a task head). A forward pre-hook stores
    the mask ([batch, sequence], 0 = padding) on every converted FFN, which passes it to its MoE as
    ``padding_mask``, so padding takes no capacity and is left out of the losses and statistics.
    """
    if not _install_attention_mask_hook(model):
        raise ValueError(f"route_attention_mask: {type(model).__name__}.forward takes no attention_mask argument; "
                         "use torch_moe.convert.padding_mask(model, mask) around the call instead")
    return model


def add_aux_loss(loss: Tensor, model: nn.Module, scale: float = 1.0) -> Tensor:
    """``loss + scale * torch_moe.aux_loss(model)`` (the already weighted balance and z losses of every MoE layer
    from the last forward), on the loss's device."""
    return loss + scale * aux_loss(model).to(loss.device)


class MoETrainer(Trainer):
    """A :class:`transformers.Trainer` that adds ``torch_moe.aux_loss(model)`` to the training loss.

    The auxiliary loss is a mean over the micro-batch. When the Trainer treats the task loss as already scaled
    for gradient accumulation (normalised over the whole accumulated batch), the auxiliary loss is divided by the
    number of accumulation steps, so that in both cases it enters the step as the mean over the micro-batches.
    Evaluation losses stay the task loss alone. Logs gain ``aux_loss`` (mean over the logged training steps; read
    from the device only when the Trainer logs). The model's ``attention_mask`` is routed to the MoE layers.

    ``global_batch_balancing=True``: the load-balancing loss counts the expert fractions over all micro-batches of
    each optimizer step (:class:`torch_moe.balancing.GlobalBatchBalancing`), and over ``balancing_group`` (a
    data-parallel process group) when given. The Trainer collects a step's micro-batches before running them, so
    each step starts with a no-grad routing pre-pass over them (one extra forward per micro-batch).
    """

    def __init__(self, *args, global_batch_balancing: bool = False, balancing_group=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _install_attention_mask_hook(self.model)
        if balancing_group is not None and not global_batch_balancing:
            raise ValueError("MoETrainer: balancing_group needs global_batch_balancing=True")
        self.global_batch_balancing = (GlobalBatchBalancing(self.model, balancing_group) if global_batch_balancing
                                       else None)
        self._aux_loss_sum: Optional[Tensor] = None
        self._aux_loss_count = 0

    def _loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        # Mirrors Trainer.training_step's decision of whether to divide the loss by the accumulation steps.
        explicit = getattr(self, "loss_is_scaled_for_ga", None)
        if explicit is not None:
            return bool(explicit)
        return bool((getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
                    or getattr(self, "compute_loss_func", None) is not None)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            moe_loss = aux_loss(model).to(loss.device)
            if self._loss_is_scaled_for_ga(num_items_in_batch):
                steps = (getattr(self, "current_gradient_accumulation_steps", None)
                         or self.args.gradient_accumulation_steps)
                moe_loss = moe_loss / steps
            loss = loss + moe_loss
            detached = moe_loss.detach()
            self._aux_loss_sum = detached if self._aux_loss_sum is None else self._aux_loss_sum + detached
            self._aux_loss_count += 1
        return (loss, outputs) if return_outputs else loss

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.global_batch_balancing is not None and batch_samples:
            # The step's routing pre-pass, in training mode as the step itself (training_step sets it too).
            self.model.train()
            with self.global_batch_balancing.counting():
                for inputs in batch_samples:
                    self.model(**self._prepare_inputs(dict(inputs)))
        return batch_samples, num_items_in_batch

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._aux_loss_sum is not None and "loss" in logs:
            logs["aux_loss"] = round(float(self._aux_loss_sum) / self._aux_loss_count, 6)
            self._aux_loss_sum, self._aux_loss_count = None, 0
        super().log(logs, *args, **kwargs)
