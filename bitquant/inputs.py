"""What a checkpoint holds, read from its ``config.json`` and tensor headers, and how its
ternary layers are taken over without loss.

Three layouts (``Layout.kind``):

* ``fp``: an ordinary FP16/BF16/FP32 model (no ``quantization_config``). Its projections
  are ternarized with absmean, except that a matrix whose values are already
  {-c, 0, +c} keeps its codes and c (absmean would give it c x the share of non-zeros);
  when every projection is like that the report calls the input *ternary-valued dense*.
* ``master``: a ternary-trained master. Its latent weights are ternarized on the fly in
  every forward pass (transformers' ``AutoBitLinear`` in ``online`` mode: fp32
  s = mean|W|, codes round(W/s)), so absmean reproduces exactly the model that was
  trained. ``BitNetForCausalLM`` checkpoints, and any config whose
  ``quantization_config`` says ``bitnet`` / ``autobitlinear`` / ``online`` (the ``-bf16``
  master of BitNet b1.58 2B-4T, and the masters ``bitquant heal --save-master`` writes).
* ``packed``: a BitNet ``offline`` checkpoint whose codes and scales are the model. Codes
  are copied code for code; ``weight_scale`` is read in the source's convention
  (``bitlinear`` divides by it: 1/s; ``autobitlinear`` multiplies: s) and written in the
  output's. ``autobitlinear`` may also hold the codes unpacked, as floats.

Every refusal names the tensor or the config field and what to do. Pure functions of
config dictionaries, tensor specs and tensors: no file is opened here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitquant.errors import SourceError, TensorError, UnsupportedModelError
from bitquant.families import expected_shape
from bitquant.kernels import PackedTernary
from bitquant.packing import pack_ternary
from bitquant.formats.hf_bitnet import SCALE_SUFFIX
from bitquant.tensorfile import TensorSpec

BITNET_ARCHITECTURE = "BitNetForCausalLM"
LINEAR_CLASSES = ("bitlinear", "autobitlinear")

#: Per decoder block, the BitNet sub-norms (attention output, and MLP before down_proj).
SUB_NORMS = ("self_attn.attn_sub_norm.weight", "mlp.ffn_sub_norm.weight")

#: The report's and card's words for each input kind.
KIND_LABELS = {
    "fp": "FP model",
    "ternary-dense": "ternary-valued dense",
    "master": "ternary-trained master",
    "packed": "packed ternary",
}


@dataclass(frozen=True)
class Layout:
    """How a checkpoint stores its projections."""

    kind: str  # "fp", "master" or "packed"
    linear_class: str | None = None  # master/packed: the source's transformers linear class
    not_convert: tuple[str, ...] = ()  # packed: modules the source keeps in full precision

    @property
    def ternary_trained(self) -> bool:
        return self.kind != "fp"

    def keeps(self, module: str) -> bool:
        """True when the source's ``modules_to_not_convert`` names ``module`` (transformers
        matches names at module boundaries)."""
        return any(module == m or module.endswith("." + m) or module.startswith(m + ".") for m in self.not_convert)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "linear_class": self.linear_class}


def is_projection(name: str, projections: tuple[str, ...]) -> bool:
    """``model.layers.N.<...>.<proj>.weight`` for one of the recipe's projections."""
    module, _, leaf = name.rpartition(".")
    return leaf == "weight" and ".layers." in name and module.rsplit(".", 1)[-1] in projections


def runs_ternary(config: dict) -> bool:
    """True when a config describes a ternary model (BitNet quantization, or the BitNet
    architecture), from config.json alone; :func:`detect` says which layout."""
    qc = config.get("quantization_config") or {}
    return qc.get("quant_method") == "bitnet" or (config.get("architectures") or [""])[0] == BITNET_ARCHITECTURE


def is_ternary_weight(name: str, layout: Layout, names, projections: tuple[str, ...]) -> bool:
    """True when source tensor ``name`` is a ternary matrix of a ternary-trained checkpoint
    (``names``: every tensor name of the checkpoint)."""
    if layout.kind == "fp" or not is_projection(name, projections):
        return False
    if layout.kind == "master":
        return True
    return not layout.keeps(name.removesuffix(".weight")) and name + SCALE_SUFFIX in names


def detect(config: dict, specs: dict[str, TensorSpec], projections: tuple[str, ...], where: str) -> Layout:
    """The layout of a checkpoint (``where`` names it in errors), refusing configs that do
    not match their tensors."""
    arch = (config.get("architectures") or [""])[0]
    qc = config.get("quantization_config")
    if arch == BITNET_ARCHITECTURE:
        check_sub_norms(config, specs, where)
    if not qc:
        return Layout("master", "autobitlinear") if arch == BITNET_ARCHITECTURE else Layout("fp")
    method = qc.get("quant_method", "unknown")
    if method != "bitnet":
        raise UnsupportedModelError(f"{where} is already quantized ({method}); convert the FP16/BF16 checkpoint instead")
    linear_class = qc.get("linear_class", "bitlinear")
    mode = qc.get("quantization_mode", "offline")
    if linear_class not in LINEAR_CLASSES:
        raise UnsupportedModelError(
            f"{where}/config.json has quantization_config.linear_class {linear_class!r}, which bitquant does not know; "
            f"it reads {' and '.join(LINEAR_CLASSES)} (fix the config or convert the FP checkpoint)")
    if mode not in ("offline", "online"):
        raise UnsupportedModelError(
            f"{where}/config.json has quantization_config.quantization_mode {mode!r}; transformers knows offline and online")
    if qc.get("use_rms_norm"):
        raise UnsupportedModelError(
            f"{where} applies an RMSNorm inside every BitNet linear layer (quantization_config.use_rms_norm), "
            "which bitquant cannot export yet; convert its FP checkpoint instead")
    weights = [s for s in specs.values() if is_projection(s.name, projections)]
    packed = [s for s in weights if s.dtype == torch.uint8]
    if mode == "online":
        if linear_class != "autobitlinear":
            raise UnsupportedModelError(
                f"{where}/config.json says quantization_mode online with linear_class bitlinear, which transformers "
                "does not have (online needs autobitlinear); fix its quantization_config")
        if packed:
            raise UnsupportedModelError(
                f"{where}/config.json says quantization_mode online (latent weights), but {packed[0].name} is packed "
                "uint8; set quantization_mode to offline, or fix the checkpoint")
        return Layout("master", linear_class)
    layout = Layout("packed", linear_class, tuple(qc.get("modules_to_not_convert") or ()))
    for s in weights:
        module = s.name.removesuffix(".weight")
        if s.dtype == torch.uint8:
            if s.name + SCALE_SUFFIX not in specs:
                raise SourceError(f"packed weight {s.name} of {where} has no {s.name}{SCALE_SUFFIX}; "
                                  "the checkpoint is incomplete, download it again")
            check_shape(config, s.name, (4 * s.shape[0], *s.shape[1:]), where)
        elif not layout.keeps(module) and linear_class == "bitlinear":
            dtype = str(s.dtype).replace("torch.", "")
            raise UnsupportedModelError(
                f"{where}/config.json says the projections are packed (bitlinear, offline), but {s.name} is {dtype} "
                f"{list(s.shape)}; fix its quantization_config (a latent master is autobitlinear/online)")
        elif not layout.keeps(module) and s.name + SCALE_SUFFIX not in specs:
            raise SourceError(f"{s.name} of {where} has no {s.name}{SCALE_SUFFIX}, which autobitlinear offline "
                              "multiplies by; the checkpoint is incomplete, download it again")
    return layout


def check_sub_norms(config: dict, specs: dict[str, TensorSpec], where: str) -> None:
    """BitNet blocks need both sub-norms; a checkpoint without them is not BitNet."""
    for i in range(int(config.get("num_hidden_layers", 0))):
        for leaf in SUB_NORMS:
            name = f"model.layers.{i}.{leaf}"
            if name not in specs:
                raise SourceError(f"{where} is a BitNetForCausalLM checkpoint without {name}; BitNet blocks need "
                                  "attn_sub_norm and ffn_sub_norm (is the architecture in config.json right?)")


def check_shape(config: dict, name: str, shape: tuple[int, ...], where: str, packed: bool = True) -> None:
    """Refuse a projection (fused ones included) whose [out, in] shape (a packed one's, unpacked)
    is not what ``config`` gives it."""
    want = expected_shape(config, name)
    if want is None or tuple(shape) == want:
        return
    if packed:
        raise SourceError(f"packed weight {name} of {where} unpacks to {list(shape)}, but its config.json says "
                          f"{list(want)}; the checkpoint and its config do not match")
    raise SourceError(f"{name} of {where} is {list(shape)}, but its config.json gives {list(want)}; "
                      "the checkpoint and its config do not match (re-export it)")


def stored_scale(weight_scale: torch.Tensor, linear_class: str, name: str) -> float:
    """s (the multiplier of the codes), as a Python float, from a stored ``weight_scale``
    in the source's convention: ``bitlinear`` stores 1/s, ``autobitlinear`` s."""
    if weight_scale.numel() != 1:
        raise TensorError(f"{name}{SCALE_SUFFIX} has {weight_scale.numel()} values; bitquant reads one scale per matrix")
    value = float(weight_scale.reshape(()).to(torch.float64))
    if not (value > 0 and value != float("inf")):
        raise TensorError(f"{name}{SCALE_SUFFIX} is {value}, not a positive finite scale; the checkpoint is broken, "
                          "download it again or use another revision")
    return 1.0 / value if linear_class == "bitlinear" else value


#: Per byte value of a packed matrix: how many of its four 2-bit fields hold code 0
#: (stored as 1), and whether any holds 3 (no code).
_BYTES = torch.arange(256)
_ZEROS_IN_BYTE = sum(((_BYTES >> (2 * i)) & 3 == 1).long() for i in range(4))
_BAD_BYTE = sum(((_BYTES >> (2 * i)) & 3 == 3).long() for i in range(4)) > 0


def _copied(packed: torch.Tensor, nonzero: int, numel: int, scale: float, name: str) -> PackedTernary:
    if nonzero == 0:
        raise TensorError(f"tensor {name!r} of this ternary-trained model is all zeros; the checkpoint is broken "
                          "(download it again, or use another revision)")
    return PackedTernary(packed, scale, False, 1.0 - nonzero / numel, 0.0, copied=True)


def copy_packed(packed: torch.Tensor, scale: float, name: str) -> PackedTernary:
    """A packed uint8 matrix taken over as it is; its 2-bit fields are checked (3 is no
    code) and counted from a histogram of its bytes, without unpacking it."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise TensorError(f"packed weight {name!r} must be a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    hist = torch.bincount(packed.reshape(-1), minlength=256)
    if bool(hist[_BAD_BYTE].any()):
        raise TensorError(f"packed weight {name!r} holds the 2-bit value 3, which is no ternary code; "
                          "the checkpoint is not in the BitNet packed layout")
    numel = 4 * packed.numel()
    return _copied(packed, numel - int(hist @ _ZEROS_IN_BYTE), numel, scale, name)


def copy_dense_codes(codes: torch.Tensor, scale: float, name: str) -> PackedTernary:
    """Unpacked codes stored as floats (autobitlinear offline) taken over: they must be -1, 0 or 1."""
    if not bool(((codes == 0) | (codes == 1) | (codes == -1)).all()):
        raise TensorError(f"{name!r} should hold ternary codes (-1, 0, 1), as autobitlinear offline stores them, but "
                          "holds other values; fix its quantization_config (a latent master is online)")
    c = codes.to(torch.int8)
    return _copied(pack_ternary(c), int(torch.count_nonzero(c)), c.numel(), scale, name)


def copy_ternary_values(codes: torch.Tensor, c: float, name: str) -> PackedTernary:
    """A dense matrix of values {-c, 0, +c} (see :func:`bitquant.ternary.ternary_values`)."""
    return _copied(pack_ternary(codes), int(torch.count_nonzero(codes)), codes.numel(), c, name)


def check_tensor(name: str, tensor: torch.Tensor) -> None:
    """For ternary-trained inputs: refuse a float tensor with NaN/Inf, or an all-zero matrix
    (a published re-upload of a BitNet model has all-zero MLP weights)."""
    if not tensor.is_floating_point():
        return
    largest = 0.0
    for chunk in tensor.reshape(-1).split(1 << 22):  # bounded temporaries, even for a 128k-token embedding
        m = float(chunk.abs().amax())  # NaN propagates through amax; one pass finds NaN, Inf and all-zero
        if m != m or m == float("inf"):
            raise TensorError(f"tensor {name!r} contains NaN or Inf values; fix or re-export the checkpoint")
        largest = max(largest, m)
    if tensor.dim() == 2 and largest == 0.0:
        raise TensorError(f"tensor {name!r} of this ternary-trained model is all zeros; the checkpoint is broken "
                          "(download it again, or use another revision)")
