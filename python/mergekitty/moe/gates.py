"""Router (gate) weights: one vector per layer and expert, ``[layers, experts, hidden]``.

- ``random``: standard normal entries, not normalized (seeded by ``--random-seed``).
- ``uniform_random``: ``U(-1/sqrt(hidden), 1/sqrt(hidden))``, the default init of ``nn.Linear``.
- ``cheap_embed``: no forward pass. Each prompt (with the tokenizer's bos in front) is the
  sum of its tokens' rows of the base embedding table; an expert's vector is the sum over
  its positive prompts, minus that of its negative prompts, L2-normalized, and the same
  for every layer.
- ``hidden`` / ``hidden_last``: the base model runs the prompts; for each layer the
  residual stream entering that layer at the prompt's last token, averaged over prompts.
- ``hidden_avg``: as ``hidden``, but averaged over the prompt's tokens (padding excluded,
  so the result does not depend on how prompts are batched) and then over prompts.

For the hidden-state modes the mean over the negative prompts is subtracted from that of
the positive ones, then each layer's vector is L2-normalized.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import ModelFormatError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEGENERATE_CONDITION = 5.0


def random_gates(mode: str, layers: int, count: int, hidden: int, generator) -> torch.Tensor:
    import torch

    if mode == "random":
        return torch.randn(layers, count, hidden, generator=generator)
    bound = hidden**-0.5
    return (torch.rand(layers, count, hidden, generator=generator) * 2 - 1) * bound


def load_tokenizer(path, trust_remote_code: bool = False):
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:  # missing files and parse errors come in many types
        raise ModelFormatError(
            f"base model {path}: cannot load its tokenizer, which prompt-based gates need: {exc}"
        ) from None


def encode(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt, with the tokenizer's bos (if it has one) in front."""
    bos = tokenizer.bos_token_id
    out = []
    for p in prompts:
        # no tokenizer-added specials (an appended eos would be every prompt's last token)
        ids = list(tokenizer(p, add_special_tokens=False)["input_ids"])
        if not ids:
            # with only bos left, every such prompt would give the same gate, silently
            raise ModelFormatError(
                f"the base model's tokenizer ({type(tokenizer).__name__}) turns the prompt {p!r} into no tokens; the gate cannot be built from it"
            )
        if bos is not None and ids[0] != bos:
            ids.insert(0, bos)
        out.append(ids)
    return out


def _normalize(v: torch.Tensor) -> torch.Tensor:
    import torch

    norm = v.norm(dim=-1, keepdim=True)
    return torch.where(norm > 0, v / norm.clamp_min(1e-12), v)


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
            self.embedding = inputs.base.checkpoint.tensor(name)
        else:
            self._load_model()

    def _load_model(self) -> None:
        import torch
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

    def vectors(self, prompts: list[str]) -> torch.Tensor:
        """The summed (cheap_embed) or mean (hidden modes) prompt vector per layer, float32."""
        import torch

        ids = encode(self.tokenizer, prompts)
        if self.embedding is not None:
            rows = self.embedding.shape[0]
            total = torch.zeros(self.embedding.shape[1], dtype=torch.float32)
            for p, seq in zip(prompts, ids):
                bad = [i for i in seq if i >= rows]
                if bad:
                    raise ModelFormatError(
                        f"the prompt {p!r} has token id {bad[0]}, beyond the {rows} rows of the base embedding"
                    )
                total += self.embedding[torch.tensor(seq)].to(torch.float32).sum(0)
                if self.progress:
                    self.progress(1)
            return total.expand(self.layers, -1).clone()
        pooled = []
        batch = max(1, self.options.batch_size)
        for start in range(0, len(ids), batch):
            chunk = ids[start : start + batch]
            pooled.append(self._forward(chunk))
            if self.progress:
                self.progress(len(chunk))
        return torch.cat(pooled, dim=1).mean(dim=1)

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


def prompt_gates(encoder: PromptEncoder, experts) -> torch.Tensor:
    """``[layers, len(experts), hidden]`` gate vectors from each expert's prompts."""
    import torch

    out = []
    for e in experts:
        v = encoder.vectors(e.spec.positive_prompts)
        if e.spec.negative_prompts:
            v = v - encoder.vectors(e.spec.negative_prompts)
        out.append(_normalize(v))
    return torch.stack(out, dim=1)


def compute_gates(mode: str, inputs, options, seed: int, quiet: bool = True, shared_gates: bool = True):
    """(routed ``[layers, experts, hidden]``, shared ``[layers, shared, hidden]`` or None), float32.
    ``shared_gates``: whether the output has gates for its shared experts (None when not)."""
    import torch

    layers, hidden = inputs.num_layers, inputs.hidden_size
    want_shared = bool(inputs.shared) and shared_gates
    if mode in ("random", "uniform_random"):
        gen = torch.Generator().manual_seed(seed)
        routed = random_gates(mode, layers, len(inputs.experts), hidden, gen)
        shared = random_gates(mode, layers, len(inputs.shared), hidden, gen) if want_shared else None
        return routed, shared
    everyone = [*inputs.experts, *(inputs.shared if want_shared else ())]
    total = sum(len(e.spec.positive_prompts or ()) + len(e.spec.negative_prompts or ()) for e in everyone)
    if quiet:
        encoder = PromptEncoder(mode, inputs, options, None)
        routed = prompt_gates(encoder, inputs.experts)
        shared = prompt_gates(encoder, inputs.shared) if want_shared else None
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(
            TextColumn(f"[bold]gates ({mode})"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("prompts"),
            TimeRemainingColumn(),
        ) as bar:
            task = bar.add_task("gates", total=total)
            encoder = PromptEncoder(mode, inputs, options, lambda n: bar.update(task, advance=n))
            routed = prompt_gates(encoder, inputs.experts)
            shared = prompt_gates(encoder, inputs.shared) if want_shared else None
    warn_degenerate(routed)
    return routed, shared


def warn_degenerate(gates: torch.Tensor) -> list[int]:
    """Warn about layers whose gate vectors are nearly linearly dependent (the router could
    hardly tell those experts apart). Returns those layers."""
    import torch

    if gates.shape[1] < 2:
        return []
    sv = torch.linalg.svdvals(gates.to(torch.float64))
    cond = sv[:, 0] / sv[:, -1].clamp_min(1e-12)
    bad = [i for i, c in enumerate(cond.tolist()) if c > DEGENERATE_CONDITION]
    if bad:
        shown = ", ".join(str(i) for i in bad[:12]) + (", ..." if len(bad) > 12 else "")
        log.warning(
            "the gate vectors of %d layer(s) are nearly dependent (condition number > %g: layers %s); prompts that differ more tell the experts apart better",
            len(bad), DEGENERATE_CONDITION, shown,
        )  # fmt: skip
    return bad
