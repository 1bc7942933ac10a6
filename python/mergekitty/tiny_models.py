"""Tiny random Hugging Face models for examples and tests (no network needed).

    python -m mergekitty.tiny_models OUT_DIR [--arch llama] [--fine-tunes 3]

writes ``OUT_DIR/base`` and ``OUT_DIR/ft1..ftN``: real checkpoints (config.json,
model.safetensors, a word-level tokenizer) that transformers loads. Fine-tunes
are the base plus small random changes, like real fine-tunes of one ancestor.
``OUT_DIR/chat-chatml`` and ``OUT_DIR/chat-tools`` are ft1 and ft2 with added
special tokens (and embedding rows for them), for tokenizer-union examples.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PretrainedConfig

TINY_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, vocab_size=96)


# Smaller sizes for the architecture matrix (tests/test_architectures.py).
SMALL_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, vocab_size=96)
# Four layers with an irregular sliding/full pattern, so that slicing visibly rebuilds layer_types.
_PATTERN = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]


def _small(arch: str, **overrides: Any) -> PretrainedConfig | None:
    """Configs for every architecture family of the test matrix (hidden 32, 4 layers, vocab 96)."""
    import transformers as T

    s = {**SMALL_SIZES, **overrides}
    n = s["num_hidden_layers"]
    c: dict[str, Any] = dict(
        hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"],
        num_hidden_layers=n,
        num_attention_heads=s["num_attention_heads"],
        vocab_size=s["vocab_size"],
        max_position_embeddings=64,
    )
    ids: dict[str, Any] = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kv: dict[str, Any] = dict(num_key_value_heads=2)
    pattern = (_PATTERN * n)[:n]
    head_dim: dict[str, Any] = dict(head_dim=8)  # Qwen3MoeConfig takes it through **kwargs
    gemma: dict[str, Any] = dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=4)
    table: dict[str, Callable[[], PretrainedConfig]] = {
        "qwen3": lambda: T.Qwen3Config(head_dim=8, tie_word_embeddings=False, **kv, **ids, **c),
        "gemma": lambda: T.GemmaConfig(head_dim=8, **kv, **ids, **c),
        "gemma2": lambda: T.Gemma2Config(layer_types=pattern, **gemma, **kv, **ids, **c),
        "gemma3_text": lambda: T.Gemma3TextConfig(layer_types=pattern, **gemma, **kv, **ids, **c),
        "phi3": lambda: T.Phi3Config(**kv, **ids, **c),
        "gpt_neox": lambda: T.GPTNeoXConfig(**ids, **c),
        "gpt2": lambda: T.GPT2Config(
            n_embd=c["hidden_size"],
            n_layer=n,
            n_head=c["num_attention_heads"],
            vocab_size=c["vocab_size"],
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "falcon": lambda: T.FalconConfig(
            hidden_size=c["hidden_size"],
            num_hidden_layers=n,
            num_attention_heads=c["num_attention_heads"],
            vocab_size=c["vocab_size"],
            bos_token_id=1,
            eos_token_id=2,
        ),
        "starcoder2": lambda: T.Starcoder2Config(**kv, **ids, **c),
        "stablelm": lambda: T.StableLmConfig(**kv, **ids, **c),
        "cohere": lambda: T.CohereConfig(**kv, **ids, **c),
        "olmo2": lambda: T.Olmo2Config(**kv, **ids, **c),
        "mixtral": lambda: T.MixtralConfig(num_local_experts=3, num_experts_per_tok=2, **kv, **ids, **c),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(
            **head_dim,
            num_experts=3,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            decoder_sparse_step=1,
            tie_word_embeddings=False,
            **kv,
            **ids,
            **c,
        ),
        # vision-language: a tiny SigLIP tower and a Gemma3 text model (language_model.* / vision_tower.*)
        "gemma3_vl": lambda: T.Gemma3Config(
            text_config=T.Gemma3TextConfig(
                layer_types=pattern, **gemma, **kv, **ids, **{**c, "vocab_size": 128}
            ).to_dict(),
            vision_config=T.SiglipVisionConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=28,
                patch_size=14,
            ).to_dict(),
            mm_tokens_per_image=4,
            image_token_index=120,
            boi_token_index=121,
            eoi_token_index=122,
        ),
        # LLaVA: a CLIP tower with as many layers as the Llama text model (the stack must still be the text one)
        "llava": lambda: T.LlavaConfig(
            text_config=T.LlamaConfig(**kv, **ids, **{**c, "vocab_size": 128}).to_dict(),
            vision_config=T.CLIPVisionConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=n,
                num_attention_heads=4,
                image_size=28,
                patch_size=14,
                projection_dim=32,
            ).to_dict(),
            image_token_index=120,
            vision_feature_layer=-1,
        ),
    }
    if arch not in table:
        return None
    return table[arch]()


SMALL_ARCHS = (
    "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt_neox", "gpt2", "falcon",
    "starcoder2", "stablelm", "cohere", "olmo2", "mixtral", "qwen3_moe", "gemma3_vl", "llava",
)  # fmt: skip
ARCHS = ("llama", "mistral", "qwen2") + SMALL_ARCHS


def _config(arch: str, **overrides: Any) -> PretrainedConfig:
    import transformers

    small = _small(arch, **overrides)
    if small is not None:
        return small
    sizes = {**TINY_SIZES, **overrides}
    common: dict[str, Any] = dict(
        hidden_size=sizes["hidden_size"],
        intermediate_size=sizes["intermediate_size"],
        num_hidden_layers=sizes["num_hidden_layers"],
        num_attention_heads=sizes["num_attention_heads"],
        vocab_size=sizes["vocab_size"],
        max_position_embeddings=128,
    )
    if arch == "llama":
        return transformers.LlamaConfig(
            num_key_value_heads=2, tie_word_embeddings=sizes.get("tie_word_embeddings", False), **common
        )
    if arch == "mistral":
        return transformers.MistralConfig(num_key_value_heads=2, sliding_window=64, tie_word_embeddings=False, **common)
    if arch == "qwen2":
        return transformers.Qwen2Config(
            num_key_value_heads=2, tie_word_embeddings=sizes.get("tie_word_embeddings", True), **common
        )
    raise ValueError(f"unknown tiny architecture {arch!r} ({', '.join(ARCHS)})")


def model_class(config: PretrainedConfig) -> Any:
    """The transformers class that loads a tiny model: the causal LM, else the image-text-to-text model."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and config.model_type != "gemma3":
        return transformers.AutoModelForCausalLM
    return transformers.AutoModelForImageTextToText


def _tokenizer(vocab_size: int) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab_size - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def make_model(
    out_dir: str | Path,
    arch: str = "llama",
    seed: int = 0,
    parent: str | Path | None = None,
    delta: float = 0.02,
    **overrides: Any,
) -> Path:
    """Write a tiny random model. With ``parent``, start from that model's weights and add noise of scale ``delta``."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    out = Path(out_dir)
    torch.manual_seed(seed)
    if parent is not None:
        model = model_class(transformers.AutoConfig.from_pretrained(parent)).from_pretrained(
            parent, dtype=torch.float32
        )
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * delta)
    else:
        config = _config(arch, **overrides)
        model = model_class(config).from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():  # norms start at 1; perturb them so merges of norms are visible
                p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(out, safe_serialization=True)
    vocab_size = getattr(model.config, "vocab_size", None) or model.config.get_text_config().vocab_size
    _tokenizer(vocab_size).save_pretrained(out)
    return out


def make_family(root: str | Path, arch: str = "llama", fine_tunes: int = 3, **overrides: Any) -> list[Path]:
    """A base model and ``fine_tunes`` models derived from it: [base, ft1, ...]."""
    root = Path(root)
    base = make_model(root / "base", arch, seed=0, **overrides)
    return [base] + [make_model(root / f"ft{i}", arch, seed=i, parent=base) for i in range(1, fine_tunes + 1)]


CHAT_VARIANTS = {
    "chat-chatml": ("ft1", ("<|im_start|>", "<|im_end|>")),
    "chat-tools": ("ft2", ("<tool_call>", "</tool_call>")),
}


def add_special_tokens(src: str | Path, out_dir: str | Path, tokens: tuple[str, ...], seed: int = 0) -> Path:
    """A copy of model ``src`` whose tokenizer has ``tokens`` as added special tokens, with a new
    random embedding (and head) row for each, as a fine-tune that learned them would have."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = model_class(transformers.AutoConfig.from_pretrained(src)).from_pretrained(src, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(src)
    tok.add_special_tokens({"additional_special_tokens": list(tokens)})
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        n = len(tokens)
        for emb in {
            id(e): e for e in (model.get_input_embeddings(), model.get_output_embeddings()) if e is not None
        }.values():
            emb.weight[-n:] = torch.randn_like(emb.weight[-n:]) * 0.05
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return Path(out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--arch", default="llama", choices=list(ARCHS))
    parser.add_argument("--fine-tunes", type=int, default=3)
    args = parser.parse_args()
    for path in make_family(args.out_dir, args.arch, args.fine_tunes):
        print(path)
    for i, (name, (parent, tokens)) in enumerate(CHAT_VARIANTS.items()):
        if (Path(args.out_dir) / parent).is_dir():
            print(add_special_tokens(Path(args.out_dir) / parent, Path(args.out_dir) / name, tokens, seed=100 + i))


if __name__ == "__main__":
    main()
