"""Tiny random Hugging Face models for examples and tests (no network needed).

    python -m mergekitty.tiny_models OUT_DIR [--arch llama] [--fine-tunes 3]

writes ``OUT_DIR/base`` and ``OUT_DIR/ft1..ftN``: real checkpoints (config.json,
model.safetensors, a word-level tokenizer) that transformers loads. Fine-tunes
are the base plus small random changes, like real fine-tunes of one ancestor.
``OUT_DIR/chat-chatml`` and ``OUT_DIR/chat-tools`` are ft1 and ft2 with added
special tokens (and embedding rows for them), for tokenizer-union examples.

llama, mistral and qwen2 models are written with numpy and the native writer (no torch needed);
the other architectures (the test matrix) are built by their transformers class, with torch.
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


# The architectures written with numpy alone (no torch): plain decoder stacks whose tensor names
# and shapes are spelled out in ``_decoder_tensors``. The others are built by their transformers
# class, which needs torch.
NUMPY_ARCHS = ("llama", "mistral", "qwen2")
# what transformers' own initialisation gives each kind of tensor: normal(0, initializer_range)
# for projections and embeddings, ones for norms, zeros for biases
Init = str  # "normal" | "ones" | "zeros"


def _decoder_tensors(config: PretrainedConfig) -> list[tuple[str, tuple[int, ...], Init]]:
    """Every tensor a Llama-style causal LM (llama, mistral, qwen2) stores: name, shape, initialisation."""
    h, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    qwen2 = config.model_type == "qwen2"
    qkv_bias = qwen2 or bool(getattr(config, "attention_bias", False))
    o_bias = not qwen2 and bool(getattr(config, "attention_bias", False))
    mlp_bias = bool(getattr(config, "mlp_bias", False))
    out: list[tuple[str, tuple[int, ...], Init]] = [("model.embed_tokens.weight", (vocab, h), "normal")]

    def linear(name: str, rows: int, cols: int, bias: bool) -> None:
        out.append((f"{name}.weight", (rows, cols), "normal"))
        if bias:
            out.append((f"{name}.bias", (rows,), "zeros"))

    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}"
        linear(f"{layer}.self_attn.q_proj", heads * head_dim, h, qkv_bias)
        linear(f"{layer}.self_attn.k_proj", kv * head_dim, h, qkv_bias)
        linear(f"{layer}.self_attn.v_proj", kv * head_dim, h, qkv_bias)
        linear(f"{layer}.self_attn.o_proj", h, heads * head_dim, o_bias)
        linear(f"{layer}.mlp.gate_proj", inter, h, mlp_bias)
        linear(f"{layer}.mlp.up_proj", inter, h, mlp_bias)
        linear(f"{layer}.mlp.down_proj", h, inter, mlp_bias)
        out.append((f"{layer}.input_layernorm.weight", (h,), "ones"))
        out.append((f"{layer}.post_attention_layernorm.weight", (h,), "ones"))
    out.append(("model.norm.weight", (h,), "ones"))
    if not config.tie_word_embeddings:
        out.append(("lm_head.weight", (vocab, h), "normal"))
    return out


# the numpy dtypes of the safetensors codes tiny models hold
_NUMPY_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "I64": "int64", "I32": "int32", "BOOL": "bool"}


def _read_weights(model_dir: Path) -> dict[str, Any]:
    """Every tensor of a model directory as a numpy array, in file order."""
    import numpy as np

    from .io.checkpoint import Checkpoint

    checkpoint = Checkpoint(model_dir)
    out = {}
    for name, info in checkpoint.infos.items():
        if info.dtype not in _NUMPY_DTYPES:
            raise ValueError(f"{model_dir}: tensor '{name}' is {info.dtype}; tiny models are float32")
        view = checkpoint.view(name)
        if view is None:
            raise ValueError(f"{model_dir}: tensor '{name}' is not in a safetensors file")
        out[name] = np.frombuffer(view, dtype=_NUMPY_DTYPES[info.dtype]).reshape(info.shape).copy()
    return out


def _write_weights(out_dir: Path, tensors: dict[str, Any]) -> None:
    """``tensors`` (numpy arrays) as ``out_dir/model.safetensors``, through the native writer, in
    the order the safetensors library writes them (by name), as in the checkpoints on the hub."""
    from . import _native

    code_of = {numpy_name: code for code, numpy_name in _NUMPY_DTYPES.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = dict(sorted(tensors.items()))
    layout = [(name, code_of[str(t.dtype)], list(t.shape)) for name, t in tensors.items()]
    # one shard, with the metadata transformers expects of a PyTorch-format file
    writer = _native.ShardWriter(str(out_dir), layout, 1 << 62, {"format": "pt"})
    for name, t in tensors.items():
        writer.write(name, t.reshape(-1).view("uint8"))
    writer.finalize()


def _write_config(out_dir: Path, config: PretrainedConfig) -> None:
    """config.json and generation_config.json, as ``save_pretrained`` of the model writes them."""
    from transformers import GenerationConfig

    config.save_pretrained(out_dir)
    GenerationConfig.from_model_config(config).save_pretrained(out_dir)


def _architecture_name(config: PretrainedConfig) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return str(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type])


def make_model(
    out_dir: str | Path,
    arch: str = "llama",
    seed: int = 0,
    parent: str | Path | None = None,
    delta: float = 0.02,
    **overrides: Any,
) -> Path:
    """Write a tiny random model. With ``parent``, start from that model's weights and add noise of scale ``delta``.

    ``NUMPY_ARCHS`` are written with numpy and the native writer; the other architectures are
    built by their transformers class, which needs torch."""
    import json

    out = Path(out_dir)
    parent_config = json.loads((Path(parent) / "config.json").read_text()) if parent is not None else None
    if parent_config is not None:
        arch = parent_config.get("model_type", arch)
    if arch not in NUMPY_ARCHS:
        return _make_torch_model(out, arch, seed, parent, delta, **overrides)
    import numpy as np

    rng = np.random.default_rng(seed)
    if parent is not None and parent_config is not None:
        import shutil

        tensors = _read_weights(Path(parent))
        for name, t in tensors.items():
            tensors[name] = t + (rng.standard_normal(t.shape, dtype=np.float32) * delta).astype(t.dtype)
        _write_weights(out, tensors)
        for side in ("config.json", "generation_config.json"):
            shutil.copyfile(Path(parent) / side, out / side)
        vocab_size = int(parent_config["vocab_size"])
    else:
        config = _config(arch, **overrides)
        config.architectures = [_architecture_name(config)]
        config.dtype = "float32"
        init_std = float(config.initializer_range)
        tensors = {}
        for name, shape, init in _decoder_tensors(config):
            if init == "normal":
                t = rng.standard_normal(shape, dtype=np.float32) * np.float32(init_std)
            else:
                t = np.ones(shape, np.float32) if init == "ones" else np.zeros(shape, np.float32)
            # perturbed, as a trained model's are: norms away from 1, so that merges of norms are visible
            tensors[name] = t + rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        _write_weights(out, tensors)
        _write_config(out, config)
        vocab_size = config.vocab_size
    _tokenizer(vocab_size).save_pretrained(out)
    return out


def _make_torch_model(
    out: Path, arch: str, seed: int, parent: str | Path | None, delta: float, **overrides: Any
) -> Path:
    """A tiny model of an architecture ``_decoder_tensors`` does not spell out, built (or, from
    ``parent``, loaded) by its transformers class."""
    from .extras import require_torch

    torch = require_torch(f"tiny {arch} models")
    import transformers

    transformers.utils.logging.disable_progress_bar()
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
    import json
    import shutil

    import numpy as np
    import transformers

    from .architecture.layout import is_embedding_name, set_vocab_size, vocab_size_of

    src, out = Path(src), Path(out_dir)
    rng = np.random.default_rng(seed)
    tok = transformers.AutoTokenizer.from_pretrained(src)
    tok.add_special_tokens({"additional_special_tokens": list(tokens)})
    cfg = json.loads((src / "config.json").read_text())
    rows, n = len(tok), len(tokens)
    tensors = _read_weights(src)
    resized = [name for name, t in tensors.items() if is_embedding_name(name) and t.ndim == 2]
    if not resized:
        raise ValueError(f"{src}: no embedding tensor found to add the tokens' rows to")
    for name in resized:
        # as resize_token_embeddings(rows): kept rows, then the new rows drawn at random
        t = tensors[name]
        grown = np.zeros((rows, t.shape[1]), t.dtype)
        grown[: min(rows, t.shape[0])] = t[:rows]
        grown[-n:] = rng.standard_normal((n, t.shape[1]), dtype=np.float32) * np.float32(0.05)
        tensors[name] = grown
    if vocab_size_of(cfg) is not None:
        set_vocab_size(cfg, rows)
    _write_weights(out, tensors)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if (src / "generation_config.json").is_file():
        shutil.copyfile(src / "generation_config.json", out / "generation_config.json")
    tok.save_pretrained(out)
    return out


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
