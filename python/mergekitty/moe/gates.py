"""Router (gate) weights: one vector per layer and expert, ``[layers, experts, hidden]``,
as float32 numpy arrays.

- ``random``: standard normal entries, not normalized.
- ``uniform_random``: ``U(-1/sqrt(hidden), 1/sqrt(hidden))``, the default init of ``nn.Linear``:
  ``(u * 2 - 1) * hidden**-0.5`` in float32, ``u`` the uniform draw.
- ``cheap_embed``: no forward pass. Each prompt (with the tokenizer's bos in front) is the
  sum of its tokens' rows of the base embedding table (read as raw bytes, summed in float32
  by ``reductions.column_sum``); an expert's vector is the sum over its positive prompts in
  order, minus that of its negative prompts, L2-normalized, and the same for every layer.
- ``hidden`` / ``hidden_last``: the base model runs the prompts; for each layer the
  residual stream entering that layer at the prompt's last token, averaged over prompts.
- ``hidden_avg``: as ``hidden``, but averaged over the prompt's tokens (padding excluded,
  so the result does not depend on how prompts are batched) and then over prompts.

For the hidden-state modes the mean over the negative prompts is subtracted from that of
the positive ones, then each layer's vector is L2-normalized. Only these modes use torch
(they run the model); the others need numpy and the native module only.

The random modes draw from the counter-based generator (``draws.py``) with ``--random-seed``:
element ``i`` of the routed gates (flat index into ``[layers, experts, hidden]``) is draw ``i``
of stream ``"moe.gates.routed"``, that of the shared-expert gates draw ``i`` of
``"moe.gates.shared"``; ``random`` takes ``draws.normal_array`` of the stream (Box-Muller from
its ``#radius`` and ``#angle`` streams), ``uniform_random`` ``draws.uniform_array``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ModelFormatError
from .reductions import column_sum, l2_normalize

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEGENERATE_CONDITION = 5.0
# a router whose largest singular value is at most this is taken as all zero
ZERO_NORM = 1e-6


ROUTED_STREAM = "moe.gates.routed"
SHARED_STREAM = "moe.gates.shared"


def random_gates(mode: str, layers: int, count: int, hidden: int, seed: int, stream: str) -> np.ndarray:
    """``[layers, count, hidden]`` float32 gates of a random ``mode``, drawn from ``stream``."""
    from .draws import normal_array, uniform_array

    n = layers * count * hidden
    if mode == "random":
        return normal_array(seed, stream, n).reshape(layers, count, hidden)
    bound = np.float32(hidden**-0.5)
    u = uniform_array(seed, stream, n)
    gates: np.ndarray = (u * np.float32(2) - np.float32(1)) * bound
    return gates.reshape(layers, count, hidden)


def load_tokenizer(path, trust_remote_code: bool = False):
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:  # missing files and parse errors come in many types
        raise ModelFormatError(
            f"base model {path}: cannot load its tokenizer, which prompt-based gates need: {exc}"
        ) from None


def encode(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt, with the tokenizer's bos (if it has one) in front. An empty
    (blank) prompt the tokenizer turns into no tokens is the bos alone, or ``[]`` without a bos."""
    bos = tokenizer.bos_token_id
    out = []
    for p in prompts:
        # no tokenizer-added specials (an appended eos would be every prompt's last token)
        ids = list(tokenizer(p, add_special_tokens=False)["input_ids"])
        if not ids and p.strip():
            # with only bos left, every such prompt would give the same gate, silently
            raise ModelFormatError(
                f"the base model's tokenizer ({type(tokenizer).__name__}) turns the prompt {p!r} into no tokens; the gate cannot be built from it"
            )
        if bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        out.append(ids)
    return out


class PromptEncoder:
    """Turns an expert's prompts into its gate vectors ``[layers, hidden]``."""

    def __init__(self, mode: str, inputs, options, progress: Callable[[int], None] | None):
        self.mode = mode
        self.inputs = inputs
        self.options = options
        self.progress = progress
        self.tokenizer = load_tokenizer(inputs.base.path, options.trust_remote_code)
        self.layers = inputs.num_layers
        self.model = None
        self.embedding = None
        if mode == "cheap_embed":
            name = inputs.base.layout.input_embedding
            if name is None:
                raise ModelFormatError(
                    f"base model {inputs.base.label}: no token embedding tensor found for cheap_embed gates"
                )
            from ..io.raw import read_raw

            self.embedding = read_raw(inputs.base.checkpoint, name)
        else:
            self._load_model()

    def _load_model(self) -> None:
        from ..extras import require_torch

        torch = require_torch("hidden-state MoE gates")
        import transformers

        device = self.options.resolved_device()
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        transformers.utils.logging.disable_progress_bar()
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(self.inputs.base.path), dtype=dtype, trust_remote_code=self.options.trust_remote_code
            )
        except Exception as exc:  # transformers raises many kinds
            raise ModelFormatError(
                f"base model {self.inputs.base.label}: transformers cannot load it to compute hidden-state gates: {exc}"
            ) from None
        self._apply_adapter(model)
        self.model = model.to(device).eval()
        self.device = device

    def _apply_adapter(self, model) -> None:
        """A model+lora base: put the tensors its adapter changes into the loaded model."""
        import torch

        checkpoint = self.inputs.base.checkpoint
        changed = getattr(checkpoint, "changed", None)
        if changed is None:
            return
        params = model.state_dict()
        with torch.no_grad():
            for name in changed():
                if name not in params or tuple(params[name].shape) != tuple(checkpoint.infos[name].shape):
                    raise ModelFormatError(
                        f"base model {self.inputs.base.label}: the adapter changes '{name}', which the transformers model "
                        "does not hold in that shape; hidden-state gates cannot use the adapted base (try gate_mode cheap_embed)"
                    )
                params[name].copy_(checkpoint.tensor(name))

    def vectors(self, prompts: list[str], ids: list[list[int]]) -> np.ndarray:
        """The summed (cheap_embed) or mean (hidden modes) vector per layer of ``prompts``,
        tokenized to ``ids`` (each with at least one token): float32 ``[layers, hidden]``."""
        if self.embedding is not None:
            return self._embedding_sums(prompts, ids)
        import torch

        pooled = []
        batch = max(1, self.options.batch_size)
        for start in range(0, len(ids), batch):
            chunk = ids[start : start + batch]
            pooled.append(self._forward(chunk))
            if self.progress:
                self.progress(len(chunk))
        return torch.cat(pooled, dim=1).mean(dim=1).numpy()

    def _embedding_sums(self, prompts: list[str], ids: list[list[int]]) -> np.ndarray:
        from ..io.raw import to_f32

        assert self.embedding is not None
        table = self.embedding.rows()
        rows = self.embedding.shape[0]
        total = np.zeros(self.embedding.row_elems, dtype=np.float32)
        for p, seq in zip(prompts, ids):
            bad = [i for i in seq if i >= rows]
            if bad:
                raise ModelFormatError(
                    f"the prompt {p!r} has token id {bad[0]}, beyond the {rows} rows of the base embedding"
                )
            total += column_sum(to_f32(table[np.asarray(seq, dtype=np.int64)], self.embedding.dtype))
            if self.progress:
                self.progress(1)
        return np.broadcast_to(total, (self.layers, total.shape[0])).copy()

    def _forward(self, chunk: list[list[int]]) -> torch.Tensor:
        """``[layers, len(chunk), hidden]``: each prompt's pooled residual stream entering each layer."""
        import torch

        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = (
                self.tokenizer.bos_token_id
                if self.tokenizer.bos_token_id is not None
                else self.tokenizer.eos_token_id or 0
            )
        width = max(len(s) for s in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, seq in enumerate(chunk):  # padding on the left: the last position is the last token
            input_ids[i, width - len(seq) :] = torch.tensor(seq)
            mask[i, width - len(seq) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        with torch.inference_mode():
            out = self.model(
                input_ids=input_ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device),
                output_hidden_states=True,
                use_cache=False,
            )
        states = torch.stack(out.hidden_states[: self.layers]).to(torch.float32).cpu()  # [layers, batch, seq, hidden]
        if self.mode == "hidden_avg":
            m = mask.to(torch.float32)[None, :, :, None]
            return (states * m).sum(2) / m.sum(2)
        return states[:, :, -1, :]


def _with_tokens(encoder: PromptEncoder, prompts: list[str] | None) -> tuple[list[str], list[list[int]]]:
    """The prompts that have at least one token (with bos, if any), and their ids. The others
    (empty prompts of a tokenizer without bos) are left out; they count as done for the progress bar."""
    prompts = list(prompts or ())
    ids = encode(encoder.tokenizer, prompts)
    kept = [j for j, seq in enumerate(ids) if seq]
    if encoder.progress and len(kept) < len(prompts):
        encoder.progress(len(prompts) - len(kept))
    return [prompts[j] for j in kept], [ids[j] for j in kept]


def prompt_gates(encoder: PromptEncoder, experts, config=None) -> np.ndarray:
    """``[layers, len(experts), hidden]`` gate vectors from each expert's prompts. ``config``
    (the MoEConfig) locates warnings and errors about a prompt at its YAML line."""
    out = []
    for e in experts:
        report_empty_prompts(encoder, e, config)
        v = encoder.vectors(*_with_tokens(encoder, e.spec.positive_prompts))
        negative = _with_tokens(encoder, e.spec.negative_prompts)
        if negative[1]:
            v = v - encoder.vectors(*negative)
        out.append(l2_normalize(v))
    return np.stack(out, axis=1)


PROMPT_FIELDS = ("positive_prompts", "negative_prompts")


def report_empty_prompts(encoder: PromptEncoder, expert, config=None) -> None:
    """One warning for an expert with empty (blank) prompts, saying what they add to its gate:
    with a tokenizer that has a bos, an empty prompt is the bos token alone (its embedding row
    for cheap_embed, the hidden state at it for the hidden modes); without one it has no tokens
    and is left out. A ConfigError when no positive prompt has a token left."""
    from ..errors import ConfigError
    from ..yaml_lines import format_path

    spec = expert.spec
    empty = {f: [j for j, p in enumerate(getattr(spec, f) or ()) if not p.strip()] for f in PROMPT_FIELDS}
    if not any(empty.values()):
        return
    field, first = next((f, idx[0]) for f, idx in empty.items() if idx)
    key = (*expert.key, field, first)
    kind = "shared expert" if expert.key[0] == "shared_experts" else "expert"
    who = f"{kind} {expert.key[1]} (source_model {expert.model.label})"

    def located(message: str) -> ConfigError:
        return config.error(message, key=key) if config is not None else ConfigError(message, key=format_path(key))

    bos = encoder.tokenizer.bos_token_id
    ids = {f: encode(encoder.tokenizer, [getattr(spec, f)[j] for j in idx]) for f, idx in empty.items()}
    positive_total = len(spec.positive_prompts or ())
    if positive_total and len(empty["positive_prompts"]) == positive_total and not any(ids["positive_prompts"]):
        raise located(
            f"every positive prompt of {who} is empty and the base model's tokenizer adds no bos token, "
            "so nothing is left to build its gate from; give it a prompt with some text"
        )
    counts = " and ".join(f"{len(idx)} of {len(getattr(spec, f))} {f}" for f, idx in empty.items() if idx)
    found = [seq for f in PROMPT_FIELDS for seq in ids[f]]
    effects = []
    if any(seq == [bos] for seq in found):
        what = (
            "the bos token's embedding row to the sum"
            if encoder.mode == "cheap_embed"
            else "the hidden state at the bos token to the average over prompts"
        )
        effects.append(f"the tokenizer puts its bos token in front of every prompt, so an empty prompt adds {what}")
    if any(not seq for seq in found):
        what = "adds nothing to the sum" if encoder.mode == "cheap_embed" else "is left out of the average over prompts"
        effects.append(f"the tokenizer adds no bos token, so an empty prompt has no tokens and {what}")
    if any(seq and seq != [bos] for seq in found):
        effects.append("a blank prompt the tokenizer still turns into tokens counts like any other prompt")
    if (
        positive_total
        and len(empty["positive_prompts"]) == positive_total
        and all(seq == [bos] for seq in ids["positive_prompts"])
    ):
        effects.append(
            "every positive prompt is empty, so this gate is built from nothing but the bos token "
            "(the same as that of any other such expert)"
        )
    negatives = spec.negative_prompts or ()
    if negatives and len(empty["negative_prompts"]) == len(negatives) and not any(ids["negative_prompts"]):
        effects.append("no negative prompt has a token, so nothing is subtracted")
    log.warning("%s", located(f"{who} has empty prompts ({counts}): {'; '.join(effects)}"))


def compute_gates(mode: str, inputs, options, seed: int, quiet: bool = True, shared_gates: bool = True, config=None):
    """(routed ``[layers, experts, hidden]``, shared ``[layers, shared, hidden]`` or None), float32.
    ``shared_gates``: whether the output has gates for its shared experts (None when not).
    ``config``: the MoEConfig, to point warnings about prompts at their YAML line."""
    layers, hidden = inputs.num_layers, inputs.hidden_size
    want_shared = bool(inputs.shared) and shared_gates
    if mode in ("random", "uniform_random"):
        routed = random_gates(mode, layers, len(inputs.experts), hidden, seed, ROUTED_STREAM)
        shared = random_gates(mode, layers, len(inputs.shared), hidden, seed, SHARED_STREAM) if want_shared else None
        return routed, shared
    everyone = [*inputs.experts, *(inputs.shared if want_shared else ())]
    total = sum(len(e.spec.positive_prompts or ()) + len(e.spec.negative_prompts or ()) for e in everyone)
    if quiet:
        encoder = PromptEncoder(mode, inputs, options, None)
        routed = prompt_gates(encoder, inputs.experts, config)
        shared = prompt_gates(encoder, inputs.shared, config) if want_shared else None
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

        from ..progress import stderr_progress

        with stderr_progress(
            TextColumn(f"[bold]gates ({mode})"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("prompts"),
            TimeRemainingColumn(),
        ) as bar:
            task = bar.add_task("gates", total=total)
            encoder = PromptEncoder(mode, inputs, options, lambda n: bar.update(task, advance=n))
            routed = prompt_gates(encoder, inputs.experts, config)
            shared = prompt_gates(encoder, inputs.shared, config) if want_shared else None
    warn_degenerate(routed)
    return routed, shared


def _layer_list(layers: list[int]) -> str:
    return ", ".join(str(i) for i in layers[:12]) + (", ..." if len(layers) > 12 else "")


def warn_degenerate(gates) -> list[int]:
    """Warn about layers whose router cannot tell the experts apart: gate vectors that are not
    finite, all (nearly) zero, or nearly linearly dependent. Returns those layers, sorted.
    ``gates``: ``[layers, experts, hidden]``, anything numpy reads as an array."""
    g = np.asarray(gates, dtype=np.float64)
    nonfinite = [i for i, ok in enumerate(np.isfinite(g).reshape(g.shape[0], -1).all(1).tolist()) if not ok]
    if nonfinite:
        log.warning(
            "the gate vectors of %d layer(s) hold NaN or infinite values (layers %s); the router there is unusable",
            len(nonfinite), _layer_list(nonfinite),
        )  # fmt: skip
    finite = [i for i in range(g.shape[0]) if i not in set(nonfinite)]
    if not finite:
        return nonfinite
    # the largest singular value is the matrix's 2-norm: ~0 means every row is ~0
    sv = np.linalg.svd(g[finite], compute_uv=False)
    zero = [finite[k] for k, top in enumerate(sv[:, 0].tolist()) if top <= ZERO_NORM]
    if zero:
        log.warning(
            "the gate vectors of %d layer(s) are all zero (layers %s): the router gives every expert the same score there",
            len(zero), _layer_list(zero),
        )  # fmt: skip
    dependent = []
    if g.shape[1] >= 2:
        cond = sv[:, 0] / np.maximum(sv[:, -1], 1e-12)
        dependent = [
            finite[k] for k, c in enumerate(cond.tolist()) if c > DEGENERATE_CONDITION and finite[k] not in zero
        ]
    if dependent:
        log.warning(
            "the gate vectors of %d layer(s) are nearly dependent (condition number > %g: layers %s); prompts that differ more tell the experts apart better",
            len(dependent), DEGENERATE_CONDITION, _layer_list(dependent),
        )  # fmt: skip
    return sorted(nonfinite + zero + dependent)
