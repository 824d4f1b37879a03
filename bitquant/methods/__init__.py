"""Calibrated quantization methods: pure functions over tensors (no I/O, no printing).

Every method works in the scale convention of :mod:`bitquant.ternary` (``W ~ s * codes``,
one float32 multiplier ``s`` per matrix) and measures errors against a calibration
Hessian ``H = X^T X / n`` of the layer's inputs, so the error of a quantized weight is the
error of the layer's *output* on the calibration data:

    output_error(W, W') = tr((W - W') H (W - W')^T) / tr(W H W^T)

* :mod:`.gptq`: error feedback while rounding (GPTQ) onto the ternary grid, with a fitted scale.
* :mod:`.equalize`: per-channel scales moved into the preceding RMSNorm or projection.
* :mod:`.mixed`: which projections to keep in full precision under a bits-per-weight budget.

:mod:`bitquant.calibrate` runs them layer by layer over a checkpoint.
"""
