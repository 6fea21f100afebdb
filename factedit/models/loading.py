"""Load a causal LM and its tokenizer: the embedded demo model, a local folder or a hub id."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as tf_logging

from factedit.errors import FactEditError, ModelLoadError
from factedit.models import zoo
from factedit.models.adapter import family_for
from factedit.paths import demo_checkpoint

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _say(msg: str) -> None:
    print(f"factedit: {msg}", file=sys.stderr, flush=True)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}: use one of {', '.join(sorted(_DTYPES))} or auto") from None


def _check_local_weights(path: Path, allow_pickle: bool) -> None:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"{path} has no config.json: pass a Hugging Face model folder")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{cfg_path} is not valid JSON ({exc}): restore the model folder's config.json") from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{cfg_path} does not hold a JSON object: restore the model folder's config.json")
    # an unsupported family is refused before anything is read. A supported one loads with
    # transformers' own classes: Python code the folder brings (auto_map) runs only with
    # trust_remote_code
    family_for(str(cfg.get("model_type", "")))
    safetensors = sorted(path.glob("*.safetensors"))
    has_bin = any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth"))
    if not safetensors and has_bin and not allow_pickle:
        raise ModelLoadError(
            f"{path} holds only pickle weights (.bin/.pt), which can run code when loaded: "
            "convert them to safetensors, or pass --allow-pickle if you trust the source"
        )
    if not safetensors and not has_bin:
        raise ModelLoadError(f"{path} holds no weight files (*.safetensors)")
    for f in safetensors:
        check_safetensors(f)


def check_safetensors(path: Path) -> None:
    """Refuse a truncated or corrupt safetensors file from its header (cheap: no tensor is read)."""
    size = path.stat().st_size
    problem = None
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            problem = "its header is cut off"
        else:
            try:
                header = json.loads(f.read(n))
                ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
            except (ValueError, TypeError, KeyError, IndexError, AttributeError, UnicodeDecodeError):
                problem = "its header is not valid"
            else:
                if not ends:
                    problem = "it holds no tensors"
                elif 8 + n + max(ends, default=0) > size:
                    problem = f"it holds {size} bytes of the {8 + n + max(ends)} its header describes"
    if problem is not None:
        raise ModelLoadError(f"{path} is truncated or corrupt ({problem}): re-download or re-save the checkpoint")


def resolve_device(device: str | None) -> torch.device | None:
    """``--device`` checked before anything is loaded: a device torch knows and this machine has."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ModelLoadError(f"--device {device!r} is not a device: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ModelLoadError(f"--device {device}: this machine has no CUDA GPU: leave --device out (CPU)")
        if dev.index is not None and dev.index >= n:
            raise ModelLoadError(f"--device {device}: this machine has {n} CUDA GPU(s), cuda:0..cuda:{n - 1}")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelLoadError(f"--device {device}: MPS is not available here: leave --device out (CPU)")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ModelLoadError(f"--device {device}: factedit runs on cpu, cuda or mps")
    return dev


def _check_weights_match(info: dict, source: str) -> None:
    """Refuse a checkpoint whose weights do not match its config (more or fewer layers, other
    names): transformers would fill the missing weights at random, and drop the unexpected."""
    missing, unexpected = sorted(info.get("missing_keys") or ()), sorted(info.get("unexpected_keys") or ())
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} weight(s) the config needs are missing ({', '.join(missing[:3])}"
                         + (", ..." if len(missing) > 3 else "") + ")")
        if unexpected:
            parts.append(f"{len(unexpected)} weight(s) the config does not describe ({', '.join(unexpected[:3])}"
                         + (", ..." if len(unexpected) > 3 else "") + ")")
        raise ModelLoadError(f"the weights in {source} do not match its config.json: {'; '.join(parts)}: restore "
                             "the checkpoint's config.json and weights from the same save")


def check_model_source(name_or_path: str | Path | None, allow_pickle: bool = False,
                       trust_remote_code: bool = False) -> tuple[str, object]:
    """``(source, config)``: what :func:`load_model` would load, checked without loading the
    weights (the folder exists, holds safetensors weights unless ``allow_pickle``, its config
    reads, its family is supported). A named model or GGUF file is provisioned first."""
    source = str(demo_checkpoint()) if name_or_path is None else zoo.resolve(str(name_or_path), echo=_say)
    local = Path(source)
    looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source
    if looks_local and not local.exists():
        raise ModelLoadError(f"model folder {source} does not exist: check the path")
    if local.exists():
        if not local.is_dir():
            raise ModelLoadError(f"{local} is a file: pass the model's folder")
        _check_local_weights(local, allow_pickle)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"could not load model from {source}: {type(exc).__name__}: {first} "
                             "(check that it is a complete Hugging Face checkpoint: config.json, "
                             "*.safetensors weights and tokenizer files)") from exc
    family_for(config.model_type)  # (a hub model: once its config is read)
    return source, config


def load_model(
    name_or_path: str | Path | None = None,
    *,
    dtype: str | torch.dtype | None = "float32",
    device: str | None = None,
    device_map: str | dict | None = None,
    attn_implementation: str = "eager",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
):
    """Return ``(model, tokenizer)`` in eval mode.

    ``None`` loads the embedded demo model. A named real model (``smollm2-135m``,
    ``gemma3-270m``; see ``factedit.models.zoo``) or a ``.gguf`` file is provisioned on first
    use and then loaded from its cached folder. Weights load from safetensors only unless
    ``allow_pickle``; ``trust_remote_code`` is off unless asked. Analysis hooks need
    ``attn_implementation="eager"`` (the default here), so that attention masks added
    by factedit reach the attention logits in every family.
    """
    from factedit.validate import check_instance, check_path_arg

    if name_or_path is not None:
        check_path_arg(name_or_path, "model (--model)")
    check_instance(dtype, (str, torch.dtype), "dtype (--dtype)", "a dtype name (float32, bfloat16, float16) or auto")
    check_instance(device, (str, torch.device), "device (--device)", "a device name, e.g. cpu or cuda:0")
    for flag, label in ((allow_pickle, "allow_pickle"), (trust_remote_code, "trust_remote_code")):
        check_instance(flag, bool, label, "True or False", optional=False)
    dev = resolve_device(device if device is None or isinstance(device, str) else str(device))
    source, config = check_model_source(name_or_path, allow_pickle, trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        verbosity = tf_logging.get_verbosity()
        tf_logging.set_verbosity_error()  # its load report of missing weights: refused below, in one line
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source,
                config=config,
                dtype=resolve_dtype(dtype),
                device_map=device_map,
                attn_implementation=attn_implementation,
                use_safetensors=None if allow_pickle else True,
                trust_remote_code=trust_remote_code,
                output_loading_info=True,
            )
        finally:
            tf_logging.set_verbosity(verbosity)
        model, info = model
        _check_weights_match(info, source)
    except FactEditError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"could not load model from {source}: {type(exc).__name__}: {first} "
                             "(check that it is a complete Hugging Face checkpoint: config.json, "
                             "*.safetensors weights and tokenizer files)") from exc
    if dev is not None and device_map is None:
        model.to(dev)
    model.eval()
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return model, tok
