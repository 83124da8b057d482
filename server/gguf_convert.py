"""A GGUF file -> a plain model folder (float weights, config, tokenizer) that loads in seconds.

transformers reads GGUF (`from_pretrained(dir, gguf_file=...)`) by dequantizing every tensor to float,
which takes tens of seconds (mostly rebuilding the tokenizer), so it is done once and the result saved.
`save_pretrained` refuses such a model as loaded: transformers attaches a `GgufHfQuantizer` to it, and
that quantizer's `is_serializable()` is always False, even though every weight is already a plain float
tensor. Detaching the quantizer (and the `quantization_config` it put in the config, which other servers
such as vLLM also refuse) leaves an ordinary model, which `save_pretrained` writes as any other: safetensors
without the tied `lm_head.weight`.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("promptserve")


class GGUFError(ValueError):
    """A GGUF file that cannot be served: not GGUF, or an architecture transformers cannot read."""


def architecture(gguf_file: Path) -> str:
    """The file's `general.architecture` (read from its header; the tensors stay on disk)."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(gguf_file).fields["general.architecture"]
    except (ValueError, KeyError, OSError) as exc:
        raise GGUFError(f"{gguf_file}: not a readable GGUF file ({exc})") from None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def read_config(gguf_file: Path):
    """The transformers config of a GGUF file; GGUFError naming the architecture when unsupported."""
    import transformers
    from transformers import AutoConfig

    arch = architecture(gguf_file)
    try:
        return AutoConfig.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    except (ValueError, KeyError) as exc:
        raise GGUFError(f"{gguf_file}: transformers {transformers.__version__} cannot read GGUF architecture "
                        f"{arch!r} ({exc}); convert it to a model folder another way, or pick a GGUF of an "
                        f"architecture transformers reads (llama, mistral, qwen2, qwen3, gemma2/3, phi3, ...)")\
            from None


def convert(gguf_file: Path, dest: Path) -> None:
    """Write `dest` as a plain float model folder from `gguf_file` (dest exists and is empty)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    config = read_config(gguf_file)
    log.info("converting %s (GGUF, %s) to a float model folder, once: %s", gguf_file.name, config.model_type, dest)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model.hf_quantizer = None  # its weights are float already: see the module's docstring
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
