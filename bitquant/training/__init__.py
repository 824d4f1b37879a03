"""Quantization-aware distillation ("heal"), split the way mlx-lm's tuner/ is:

* :mod:`~bitquant.training.recipe`: the frozen, versioned heal recipe;
* :mod:`~bitquant.training.data`: teacher sampling (cached) and the batches of every step;
* :mod:`~bitquant.training.texts`: the user's text: files, JSON Lines, Parquet, Hub data sets (streamed);
* :mod:`~bitquant.training.on_policy`: the share of every batch the student writes itself;
* :mod:`~bitquant.training.student`: fake-quantized projections that call :mod:`bitquant.ternary`'s quantizer;
* :mod:`~bitquant.training.loss`: forward/reverse KL and JSD over chunks of rows (or liger-kernel's fused kernel);
* :mod:`~bitquant.training.loop`: optimizer, schedule and the training steps;
* :mod:`~bitquant.training.checkpoint`: resume checkpoints (torch.distributed.checkpoint);
* :mod:`~bitquant.training.distributed`: launchers' worlds, DDP/FSDP2, the low-memory road.
"""
