"""Quantization-aware distillation ("heal"), split the way mlx-lm's tuner/ is:

* :mod:`~bitquant.training.recipe`: the frozen, versioned heal recipe;
* :mod:`~bitquant.training.data`: teacher sampling (cached) and text data, as token batches;
* :mod:`~bitquant.training.student`: fake-quantized projections that call :mod:`bitquant.ternary`'s quantizer;
* :mod:`~bitquant.training.loss`: KL divergence over chunks of rows, never the whole logits;
* :mod:`~bitquant.training.loop`: optimizer, schedule and the training steps;
* :mod:`~bitquant.training.checkpoint`: resume checkpoints (torch.distributed.checkpoint);
* :mod:`~bitquant.training.distributed`: launchers' worlds, DDP/FSDP2, the low-memory road.
"""
