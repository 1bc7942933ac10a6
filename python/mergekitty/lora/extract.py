"""``extract_lora``: a PEFT LoRA adapter approximating ``fine-tune - base``.

Planning reads only headers (and, when transformers can build the architecture on the
meta device, the module types): every tensor of the fine-tune is paired with the base's,
shapes are checked (vocabulary rows included) and each module gets a treatment, all
before any SVD. Then the modules are processed one at a time from the memory maps:

- linear modules (2-D weights; ``Conv1D`` through ``fan_in_fan_out``): the difference
  ``dW`` is factored by a truncated SVD, ``B = U_k sqrt(S_k)``, ``A = sqrt(S_k) Vh_k``,
  written as ``lora_A.weight`` / ``lora_B.weight``; a changed bias is saved in full
  (``bias: lora_only``, ``<m>.base_layer.bias``);
- the input embedding and the output head: saved in full (``modules_to_save``) when they
  changed; with ``embed_lora`` they are factored too (``lora_embedding_A/B`` for the
  embedding), unless the vocabulary sizes differ;
- any other changed tensor (norms...): saved in full (``modules_to_save``), or left out
  with ``skip_undecomposable``; unchanged ones are left out.

The rank is ``min(rank, min(dW.shape))``, lowered per module by ``sv_epsilon`` (drop
singular values at or below it) and ``energy`` (the smallest rank keeping that fraction
of ``||dW||_F^2``). The SVD is randomized (``torch.svd_lowrank`` with oversampling and
power iterations) when the rank is small against the matrix, exact otherwise.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ArchitectureError, ConfigError, OutputError, PlanError
from ..text import shape_text
from ..tokenizer.write import TOKENIZER_FILES
from .adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX

log = logging.getLogger(__name__)

REPORT_FILE = "lora_extraction.json"
# What an earlier extraction may have left that must not survive next to a new adapter.
ADAPTER_FILES = (ADAPTER_CONFIG, *ADAPTER_WEIGHTS, REPORT_FILE, *TOKENIZER_FILES)
OVERSAMPLE = 10
POWER_ITERATIONS = 4


@dataclass
class ModuleResult:
    """What extraction did with one module."""

    module: str
    treatment: str  # "lora", "embedding_lora", "full" or "unchanged"
    shape: tuple[int, ...]
    rank: int = 0
    relative_error: float = 0.0  # ||dW - BA||_F / ||dW||_F of the stored factors


@dataclass
class ExtractionResult:
    out_path: Path
    adapter_config: dict[str, Any]
    modules: list[ModuleResult]
    notes: list[str] = field(default_factory=list)

    @property
    def factored(self) -> list[ModuleResult]:
        return [m for m in self.modules if m.treatment in ("lora", "embedding_lora")]

    @property
    def saved_in_full(self) -> list[ModuleResult]:
        return [m for m in self.modules if m.treatment == "full"]


@dataclass
class _Task:
    module: str
    treatment: str  # "lora", "embedding_lora", "full", "other" (full if changed), "bias_only"
    ft: dict[str, str]  # param -> fine-tune tensor name
    base: dict[str, str]  # param -> base tensor name
    rows: int | None = None  # keep this many rows (vocabulary truncation)
    fan_in_fan_out: bool = False
    also: tuple[str, ...] = ()  # further modules given the same result (a tied head)
    forced: bool = False  # --save-module: saved even if unchanged


# ---------------------------------------------------------------------------- SVD
def low_rank_svd(matrix, rank: int, oversample: int = OVERSAMPLE, niter: int = POWER_ITERATIONS):
    """The top ``rank`` singular triplets of a float32 matrix: (U, S, Vh).

    Randomized (``torch.svd_lowrank``) when ``rank + oversample`` is well below the
    smaller side; an exact ``torch.linalg.svd`` otherwise (so full rank is exact)."""
    import torch

    n = min(matrix.shape)
    rank = min(rank, n)
    q = min(rank + oversample, n)
    if 2 * q >= n:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    u, s, v = torch.svd_lowrank(matrix, q=q, niter=niter)
    return u[:, :rank], s[:rank], v[:, :rank].T


def choose_rank(s, total_sq: float, max_rank: int, sv_epsilon: float = 0.0, energy: float | None = None) -> int:
    """The rank kept from singular values ``s`` (descending) of a matrix with squared norm ``total_sq``."""
    import torch

    k = min(max_rank, s.numel())
    if sv_epsilon > 0:
        k = min(k, int((s > sv_epsilon).sum()))
    if energy is not None and total_sq > 0:
        kept = torch.cumsum(s.double() ** 2, 0) / total_sq
        reached = (kept >= energy - 1e-12).nonzero()
        if reached.numel():
            k = min(k, int(reached[0]) + 1)
    return max(k, 1) if total_sq > 0 else 0


# ---------------------------------------------------------------------------- planning
@dataclass
class _Modules:
    """What transformers says about the architecture (None fields: unknown)."""

    kinds: dict[str, str] | None  # module -> "linear" | "conv1d" | "embedding" | "other"
    input_embedding: str | None
    head: str | None
    tied: bool


def _architecture_modules(model_dir: Path, cfg: dict[str, Any], layout, trust_remote_code: bool) -> _Modules:
    """Module types from the architecture built on the meta device (no weights); falls back
    to tensor names when transformers cannot build it."""
    from ..architecture.layout import is_embedding_name

    tied_cfg = bool(cfg.get("tie_word_embeddings", (cfg.get("text_config") or {}).get("tie_word_embeddings", False)))
    try:
        import torch
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        config = transformers.AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and config.model_type != "gemma3":
            cls = transformers.AutoModelForCausalLM
        else:
            cls = transformers.AutoModelForImageTextToText
        with torch.device("meta"):
            model = cls.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:  # any failure only costs the module types
        log.info("cannot build %s on the meta device (%s); module types are taken from tensor names", model_dir, exc)
        if layout is None:
            return _Modules(None, None, None, False)
        head = next((n.rsplit(".", 1)[0] for n in layout.post if is_embedding_name(n) and n.endswith(".weight")), None)
        emb = layout.input_embedding.rsplit(".", 1)[0] if layout.input_embedding else None
        return _Modules(None, emb, head, tied_cfg and head is None)
    kinds: dict[str, str] = {}
    names = {}
    for name, mod in model.named_modules():
        names[id(mod)] = name
        cls_name = type(mod).__name__
        if isinstance(mod, torch.nn.Embedding):
            kinds[name] = "embedding"
        elif cls_name == "Conv1D":
            kinds[name] = "conv1d"
        elif isinstance(mod, torch.nn.Linear):
            kinds[name] = "linear"
        else:
            kinds[name] = "other"
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = inp is not None and out is not None and getattr(out, "weight", None) is getattr(inp, "weight", 0)
    return _Modules(
        kinds, names.get(id(inp)) if inp is not None else None, names.get(id(out)) if out is not None else None, tied
    )


def _matches(module: str, names: Sequence[str]) -> bool:
    last = module.rsplit(".", 1)[-1]
    return any(module == n or last == n for n in names)


def _plan(ft, base, ft_layout, mods: _Modules, opts: dict[str, Any]) -> tuple[list[_Task], list[str]]:
    """Pair every tensor of the fine-tune with the base's and choose each module's treatment."""
    notes: list[str] = []
    groups: dict[str, dict[str, str]] = {}
    for name in ft.names():
        module, _, param = name.rpartition(".")
        groups.setdefault(module, {})[param] = name
    emb, head = mods.input_embedding, mods.head

    def base_name(name: str) -> str:
        if name in base:
            return name
        # a head missing from a base with tied embeddings: the base's embedding is its head
        if head is not None and emb is not None and name == f"{head}.weight" and f"{emb}.weight" in base:
            return f"{emb}.weight"
        raise PlanError(
            f"tensor '{name}' of the fine-tune {ft.label} is not in the base {base.label} (are they the same architecture?)"
        )

    for name in base.names():
        if name not in ft and not (
            emb is not None and head is not None and name == f"{head}.weight" and f"{emb}.weight" in ft
        ):
            raise PlanError(
                f"tensor '{name}' of the base {base.label} is missing from the fine-tune {ft.label} (are they the same architecture?)"
            )

    vocab_rows: int | None = None  # rows the adapter's embedding and head keep
    vocab_modules = [m for m in (emb, head) if m is not None and f"{m}.weight" in ft]
    for module in vocab_modules:
        name = f"{module}.weight"
        fs, bs = ft.infos[name].shape, base.infos[base_name(name)].shape
        if fs[1:] != bs[1:]:
            raise PlanError(
                f"tensor '{name}': the fine-tune has shape {shape_text(fs)} but the base has {shape_text(bs)}"
            )
        if fs[0] < bs[0]:
            raise PlanError(
                f"tensor '{name}': the fine-tune has fewer vocabulary rows ({fs[0]}) than the base ({bs[0]}); an adapter cannot remove rows"
            )
        if fs[0] > bs[0]:
            keep = fs[0] if opts["extend_vocab"] else bs[0]
            if vocab_rows is None:
                if opts["extend_vocab"]:
                    notes.append(
                        f"the fine-tune's vocabulary has {fs[0]} rows, the base's {bs[0]}: the {fs[0] - bs[0]} new rows are kept "
                        f"(--extend-vocab); resize the base's embeddings to {fs[0]} before loading the adapter"
                    )
                else:
                    notes.append(
                        f"the fine-tune's vocabulary has {fs[0]} rows, the base's {bs[0]}: the {fs[0] - bs[0]} new rows are dropped "
                        "(pass --extend-vocab to keep them)"
                    )
            vocab_rows = keep
    extended = opts["extend_vocab"] and any(
        ft.infos[f"{m}.weight"].shape[0] > base.infos[base_name(f"{m}.weight")].shape[0] for m in vocab_modules
    )
    embed_lora = opts["embed_lora"]
    if embed_lora and extended:
        notes.append("--embed-lora is off for the embeddings: the vocabulary sizes differ, so they are saved in full")
        embed_lora = False

    include = [re.compile(p) for p in opts["include"]]
    exclude = [re.compile(p) for p in opts["exclude"]]
    tasks: list[_Task] = []
    unknown: list[str] = []
    tied_head = head if (mods.tied and head is not None and f"{head}.weight" not in ft) else None
    for module, params in groups.items():
        bnames = {p: base_name(n) for p, n in params.items()}
        for p, n in params.items():
            if module not in vocab_modules and ft.infos[n].shape != base.infos[bnames[p]].shape:
                raise PlanError(
                    f"tensor '{n}': the fine-tune has shape {shape_text(ft.infos[n].shape)} but the base has {shape_text(base.infos[bnames[p]].shape)}"
                )
        also = (tied_head,) if module == emb and tied_head else ()
        rows = vocab_rows if module in vocab_modules else None
        weight = params.get("weight")
        two_d = weight is not None and len(ft.infos[weight].shape) == 2
        if _matches(module, opts["save_modules"]):
            tasks.append(_Task(module, "full", params, bnames, rows, also=also, forced=True))
        elif module in vocab_modules:
            if embed_lora and two_d:
                treatment = "embedding_lora" if module == emb else "lora"
                tasks.append(_Task(module, treatment, params, bnames, rows, also=also))
            else:
                tasks.append(_Task(module, "full", params, bnames, rows, also=also))
        elif two_d and (mods.kinds is None or mods.kinds.get(module, "unknown") in ("linear", "conv1d", "unknown")):
            if mods.kinds is not None and module not in mods.kinds:
                unknown.append(module)
            excluded = (include and not any(r.search(module) for r in include)) or any(
                r.search(module) for r in exclude
            )
            conv1d = mods.kinds is not None and mods.kinds.get(module) == "conv1d"
            tasks.append(_Task(module, "other" if excluded else "lora", params, bnames, fan_in_fan_out=conv1d))
        else:
            tasks.append(_Task(module, "other", params, bnames))
    if unknown:
        notes.append(
            f"{len(unknown)} 2-D weight(s) belong to no module of the transformers architecture (e.g. '{unknown[0]}'); "
            "they are factored, which mergekitty-merge-lora applies but PEFT may not load"
        )
    fifo = {t.fan_in_fan_out for t in tasks if t.treatment == "lora"}
    if len(fifo) > 1:
        notes.append(
            "the model mixes Conv1D and Linear layers; the Linear ones are saved in full (one fan_in_fan_out per adapter)"
        )
        for t in tasks:
            if t.treatment == "lora" and not t.fan_in_fan_out:
                t.treatment = "other"
    return tasks, notes


# ---------------------------------------------------------------------------- output
def _write_safetensors(f, tensors: list[tuple[str, Any]], metadata: dict[str, str]) -> None:
    """Write ``tensors`` (name, torch tensor) into the binary file ``f`` as one safetensors
    file, one tensor at a time."""
    from ..io.dtypes import code_of
    from ..ops.reduce import bytes_view

    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors:
        size = t.numel() * t.element_size()
        header[name] = {"dtype": code_of(t.dtype), "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for _, t in tensors:
        if t.numel():
            f.write(bytes_view(t.detach().to("cpu").contiguous()))


def _readme(result: ExtractionResult, finetuned: str, base: str, title: str, command: str | None) -> str:
    from ..card import hub_link, is_hub_id, made_with

    cfg = result.adapter_config
    front = ["---", "library_name: peft", "tags:", "- mergekitty", "- lora", "- extracted"]
    if is_hub_id(base.split("@")[0]):
        front.insert(2, f"base_model: {base.split('@')[0]}")
    factored = result.factored
    errors = [m.relative_error for m in factored]
    lines = [
        *front,
        "---",
        f"# {title}",
        "",
        f"This is a LoRA adapter extracted from a fine-tuned language model with {made_with('mergekitty-extract-lora')}: "
        "each linear layer's difference from the base model, factored by a truncated SVD.",
        "",
        f"* Fine-tuned model: {hub_link(finetuned)}",
        f"* Base model: {hub_link(base)}",
        f"* Rank: {cfg['r']} (lora_alpha {cfg['lora_alpha']}, scale 1)"
        + (f"; {len(cfg['rank_pattern'])} modules with lower ranks in rank_pattern" if cfg["rank_pattern"] else ""),
        f"* Modules factored: {len(factored)}; saved in full (modules_to_save): {', '.join(cfg['modules_to_save'] or []) or 'none'}",
    ]
    if errors:
        lines.append(
            f"* Relative reconstruction error ||dW - BA||_F / ||dW||_F: mean {sum(errors) / len(errors):.4g}, max {max(errors):.4g}"
        )
    for note in result.notes:
        lines.append(f"* Note: {note}")
    if command:
        lines += ["", "## Command", "", "```sh", command, "```"]
    if factored:
        lines += ["", "## Reconstruction error per module", "", "| module | rank | relative error |", "|---|---:|---:|"]
        lines += [f"| `{m.module}` | {m.rank} | {m.relative_error:.4g} |" for m in factored]
    lines += ["", f"The same figures are in `{REPORT_FILE}`.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- extraction
def extract_lora(
    finetuned: str | os.PathLike,
    base: str | os.PathLike,
    out_path: str | os.PathLike,
    rank: int = 32,
    *,
    sv_epsilon: float = 0.0,
    energy: float | None = None,
    embed_lora: bool = False,
    extend_vocab: bool = False,
    save_modules: Sequence[str] = (),
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    skip_undecomposable: bool = False,
    device: str = "cpu",
    trust_remote_code: bool = False,
    transformers_cache: str | None = None,
    model_name: str | None = None,
    command: str | None = None,
    distribute_scale: bool = True,
    seed: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
) -> ExtractionResult:
    """Extract a LoRA adapter of at most ``rank`` from ``finetuned - base`` into ``out_path``.

    ``finetuned`` and ``base`` are directories or hub ids (``path[@revision]``; a
    ``model+lora`` reference is applied first). ``distribute_scale=False`` puts the
    singular values in A alone (B = U). Returns what was done per module, including
    each factored module's relative reconstruction error.
    """
    from ..architecture import infer_layout
    from ..extras import require_torch
    from ..io.checkpoint import Checkpoint
    from ..io.output import check_output_path
    from ..refs import ModelReference, resolve_local_path

    if rank < 1:
        raise ConfigError(f"--rank must be at least 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise ConfigError(f"--energy must be in (0, 1], got {energy}")
    if sv_epsilon < 0:
        raise ConfigError(f"--sv-epsilon must be >= 0, got {sv_epsilon}")
    for pattern in (*include, *exclude):
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"invalid regular expression '{pattern}': {exc}") from None
    torch = require_torch("LoRA extraction")  # the SVDs
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OutputError(f"--device {device} was asked for, but torch sees no CUDA device")

    def open_model(text: str):
        try:
            ref = ModelReference.parse(str(text))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        path = resolve_local_path(ref.path, ref.revision, transformers_cache)
        ckpt = Checkpoint(Path(path), label=str(ref))
        if ref.lora is not None:
            from .apply import open_lora_checkpoint

            ckpt = open_lora_checkpoint(
                ckpt, resolve_local_path(ref.lora.path, ref.lora.revision, transformers_cache), label=str(ref)
            )
            other_base = ckpt.adapter.other_base_warning(ref.path, path)
            if other_base:
                log.warning("%s", other_base)
        return Path(path), ckpt

    ft_dir, ft = open_model(str(finetuned))
    base_dir, bs = open_model(str(base))
    out = Path(out_path).expanduser()
    check_output_path(out_path, [(ft_dir, f"input model {ft_dir}"), (base_dir, f"input model {base_dir}")])
    ft_cfg = ft.config()
    try:
        layout = infer_layout(ft.names(), ft_cfg, where=ft.label)
    except ArchitectureError:
        layout = None  # only needed to find the embeddings when transformers cannot build the model
    mods = _architecture_modules(ft_dir, ft_cfg, layout, trust_remote_code)
    opts = dict(
        extend_vocab=extend_vocab,
        embed_lora=embed_lora,
        save_modules=list(save_modules),
        include=list(include),
        exclude=list(exclude),
    )
    tasks, notes = _plan(ft, bs, layout, mods, opts)
    for note in notes:
        log.warning("%s", note)

    results: list[ModuleResult] = []
    tensors: list[tuple[str, Any]] = []
    full_modules: list[str] = []
    lora_modules: dict[str, int] = {}  # module -> rank
    lora_bias = False
    skipped: list[str] = []
    dev = torch.device(device)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        for i, task in enumerate(tasks):
            written = len(tensors)
            result = _run_task(
                task, ft, bs, dev, rank, sv_epsilon, energy, tensors, skip_undecomposable, distribute_scale
            )
            if result.treatment == "full":
                full_modules.extend((task.module, *task.also))
            elif result.treatment in ("lora", "embedding_lora"):
                for m in (task.module, *task.also):
                    lora_modules[m] = result.rank
            elif result.treatment == "skipped":
                skipped.append(task.module)
            if any(name == f"{PEFT_PREFIX}{task.module}.base_layer.bias" for name, _ in tensors[written:]):
                lora_bias = True  # the changed bias is saved in full; PEFT loads it with bias: lora_only
                lora_modules.setdefault(task.module, 0)  # and the module must be a LoRA target
            results.append(result)
            for name in task.ft.values():
                ft.release(name)
            for name in task.base.values():
                bs.release(name)
            if progress is not None:
                progress(task.module, i + 1, len(tasks))
    if skipped:
        notes.append(
            f"{len(skipped)} changed module(s) that cannot be factored were left out (--skip-undecomposable): {', '.join(skipped[:6])}{', ...' if len(skipped) > 6 else ''}"
        )

    config = _adapter_config(
        lora_modules,
        full_modules,
        lora_bias,
        any(t.fan_in_fan_out for t in tasks if t.module in lora_modules),
        mods,
        str(base),
    )
    result = ExtractionResult(out, config, [r for r in results if r.treatment != "skipped"], notes)
    _write_output(result, tensors, ft_dir, str(finetuned), str(base), model_name or out.name, command)
    return result


def _load_pair(task: _Task, param: str, ft, bs, dev):
    import torch

    f = ft.tensor(task.ft[param])
    b = bs.tensor(task.base[param])
    if task.rows is not None:
        f = f[: task.rows]
        b_rows = min(task.rows, b.shape[0])
        if b.shape[0] < task.rows:  # extended vocabulary: the new rows' difference is the rows themselves
            pad = torch.zeros((task.rows - b.shape[0], *b.shape[1:]), dtype=b.dtype)
            b = torch.cat([b[:b_rows], pad])
        else:
            b = b[:b_rows]
    return f, b


def _run_task(
    task: _Task, ft, bs, dev, max_rank, sv_epsilon, energy, tensors, skip_undecomposable, distribute_scale=True
) -> ModuleResult:
    import torch

    weight = task.ft.get("weight")
    shape = tuple(ft.infos[weight].shape) if weight else tuple(ft.infos[next(iter(task.ft.values()))].shape)
    if task.rows is not None:
        shape = (task.rows, *shape[1:])

    def save_full() -> ModuleResult:
        changed = task.forced
        pairs = {}
        for param in task.ft:
            f, b = _load_pair(task, param, ft, bs, dev)
            pairs[param] = f
            changed = changed or f.shape != b.shape or not torch.equal(f, b)
        if not changed:
            return ModuleResult(task.module, "unchanged", shape)
        if task.treatment == "other" and skip_undecomposable:
            return ModuleResult(task.module, "skipped", shape)
        for module in (task.module, *task.also):
            for param, f in pairs.items():
                tensors.append((f"{PEFT_PREFIX}{module}.{param}", f))
        return ModuleResult(task.module, "full", shape)

    if task.treatment in ("full", "other"):
        return save_full()

    f, b = _load_pair(task, "weight", ft, bs, dev)
    dw = f.to(dev, torch.float32) - b.to(dev, torch.float32)
    del b
    bias_changed = False
    if "bias" in task.ft:
        fb, bb = _load_pair(task, "bias", ft, bs, dev)
        if not torch.equal(fb, bb):
            tensors.append((f"{PEFT_PREFIX}{task.module}.base_layer.bias", fb))
            bias_changed = True
    other = [p for p in task.ft if p not in ("weight", "bias")]
    if other:
        raise PlanError(
            f"module '{task.module}' has parameters {other} besides weight and bias; name it with --save-module"
        )
    if task.fan_in_fan_out:
        dw = dw.T
    total_sq = float(torch.linalg.vector_norm(dw.double()) ** 2)
    if total_sq == 0.0:
        return ModuleResult(task.module, "bias_only" if bias_changed else "unchanged", shape)
    u, s, vh = low_rank_svd(dw, max_rank)
    k = choose_rank(s, total_sq, max_rank, sv_epsilon, energy)
    # distribute_scale: sqrt(S) on both sides (balanced factors); else all of S on A
    left = s[:k].sqrt() if distribute_scale else torch.ones_like(s[:k])
    right = s[:k] / left
    lora_b = (u[:, :k] * left).to(f.dtype)
    lora_a = (right[:, None] * vh[:k]).to(f.dtype)
    err = float(torch.linalg.vector_norm(dw - lora_b.to(torch.float32) @ lora_a.to(torch.float32))) / math.sqrt(
        total_sq
    )
    if task.treatment == "embedding_lora":
        tensors.append((f"{PEFT_PREFIX}{task.module}.lora_embedding_A", lora_b.T.contiguous()))
        tensors.append((f"{PEFT_PREFIX}{task.module}.lora_embedding_B", lora_a.T.contiguous()))
        for head in task.also:  # a tied head: the same update as a linear layer
            tensors.append((f"{PEFT_PREFIX}{head}.lora_A.weight", lora_a))
            tensors.append((f"{PEFT_PREFIX}{head}.lora_B.weight", lora_b))
    else:
        tensors.append((f"{PEFT_PREFIX}{task.module}.lora_A.weight", lora_a))
        tensors.append((f"{PEFT_PREFIX}{task.module}.lora_B.weight", lora_b))
    return ModuleResult(task.module, task.treatment, shape, k, err)


def _adapter_config(
    lora_modules: dict[str, int],
    full_modules: list[str],
    lora_bias: bool,
    fan_in_fan_out: bool,
    mods: _Modules,
    base: str,
) -> dict[str, Any]:
    ranks = [r for r in lora_modules.values() if r > 0]
    r = max(ranks) if ranks else 1
    targets = sorted({m.rsplit(".", 1)[-1] for m in lora_modules})
    full_last = {m.rsplit(".", 1)[-1] for m in full_modules}
    # short names unless one would also match a LoRA target (PEFT matches both by name suffix)
    if full_last & set(targets):
        to_save = sorted(set(full_modules))
    else:
        to_save = sorted(full_last)
    pattern = {m: k for m, k in lora_modules.items() if 0 < k != r}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": r,
        "lora_alpha": r,
        "target_modules": targets,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "modules_to_save": to_save or None,
        "lora_dropout": 0.0,
        "bias": "lora_only" if lora_bias else "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def _write_output(
    result: ExtractionResult, tensors, ft_dir: Path, finetuned: str, base: str, title: str, command: str | None
) -> None:
    from .. import __version__
    from ..io.output import OutputTransaction
    from ..tokenizer.write import copy_tokenizer

    report = {
        "finetuned": finetuned,
        "base": base,
        "r": result.adapter_config["r"],
        "notes": result.notes,
        "modules": {
            m.module: {
                "treatment": m.treatment,
                "rank": m.rank,
                "relative_error": m.relative_error,
                "shape": list(m.shape),
            }
            for m in result.modules
        },
    }
    with OutputTransaction(result.out_path, marker=ADAPTER_CONFIG, owned=ADAPTER_FILES) as out:
        with out.open_file(ADAPTER_WEIGHTS[0]) as f:
            _write_safetensors(f, tensors, {"format": "pt", "mergekitty_version": __version__})
        copy_tokenizer(ft_dir, out.dir)  # the fine-tune's tokenizer (it may have added tokens)
        out.write_text(REPORT_FILE, json.dumps(report, indent=2) + "\n")
        out.write_text("README.md", _readme(result, finetuned, base, title, command))
        out.commit(json.dumps(result.adapter_config, indent=2) + "\n")
