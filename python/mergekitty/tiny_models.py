"""Tiny random Hugging Face models for examples and tests (no network needed).

    python -m mergekitty.tiny_models OUT_DIR [--arch llama] [--fine-tunes 3]

writes ``OUT_DIR/base`` and ``OUT_DIR/ft1..ftN``: real checkpoints (config.json,
model.safetensors, a word-level tokenizer) that transformers loads. Fine-tunes
are the base plus small random changes, like real fine-tunes of one ancestor.
"""

from __future__ import annotations

import argparse
from pathlib import Path

TINY_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, vocab_size=96)


def _config(arch: str, **overrides):
    import transformers

    sizes = {**TINY_SIZES, **overrides}
    common = dict(
        hidden_size=sizes["hidden_size"],
        intermediate_size=sizes["intermediate_size"],
        num_hidden_layers=sizes["num_hidden_layers"],
        num_attention_heads=sizes["num_attention_heads"],
        vocab_size=sizes["vocab_size"],
        max_position_embeddings=128,
    )
    if arch == "llama":
        return transformers.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=sizes.get("tie_word_embeddings", False), **common)
    if arch == "mistral":
        return transformers.MistralConfig(num_key_value_heads=2, sliding_window=64, tie_word_embeddings=False, **common)
    if arch == "qwen2":
        return transformers.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=sizes.get("tie_word_embeddings", True), **common)
    raise ValueError(f"unknown tiny architecture {arch!r} (llama, mistral, qwen2)")


def _tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab_size - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def make_model(out_dir: str | Path, arch: str = "llama", seed: int = 0, parent: str | Path | None = None, delta: float = 0.02, **overrides) -> Path:
    """Write a tiny random model. With ``parent``, start from that model's weights and add noise of scale ``delta``."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    out = Path(out_dir)
    torch.manual_seed(seed)
    if parent is not None:
        model = transformers.AutoModelForCausalLM.from_pretrained(parent, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * delta)
    else:
        model = transformers.AutoModelForCausalLM.from_config(_config(arch, **overrides), dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():  # norms start at 1; perturb them so merges of norms are visible
                p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(out, safe_serialization=True)
    _tokenizer(model.config.vocab_size).save_pretrained(out)
    return out


def make_family(root: str | Path, arch: str = "llama", fine_tunes: int = 3, **overrides) -> list[Path]:
    """A base model and ``fine_tunes`` models derived from it: [base, ft1, ...]."""
    root = Path(root)
    base = make_model(root / "base", arch, seed=0, **overrides)
    return [base] + [make_model(root / f"ft{i}", arch, seed=i, parent=base) for i in range(1, fine_tunes + 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--arch", default="llama", choices=["llama", "mistral", "qwen2"])
    parser.add_argument("--fine-tunes", type=int, default=3)
    args = parser.parse_args()
    for path in make_family(args.out_dir, args.arch, args.fine_tunes):
        print(path)


if __name__ == "__main__":
    main()
