"""The README.md model card written next to a merged model."""

from __future__ import annotations

import os
from typing import Any

import yaml

from .methods.base import MergeMethod


def is_hub_id(path: str) -> bool:
    """A hub repository id looks like ``org/name``; local paths are left out of ``base_model``."""
    if os.path.exists(path) or path.startswith(("/", "~", ".")):
        return False
    return path.count("/") == 1


def hub_link(ref: str) -> str:
    """``ref`` as a markdown link to its hub page when it is a hub id."""
    return f"[{ref}](https://huggingface.co/{ref})" if is_hub_id(ref) else ref


def made_with(command: str | None = None) -> str:
    """The tool and version that made a model, for its card: ``mergekitty 0.1.0``, and the
    command when it is not a merge (``(`mergekitty-merge-lora`)``)."""
    from . import __version__

    return f"mergekitty {__version__}" + (f" (`{command}`)" if command else "")


def front_matter(fields: dict[str, Any]) -> list[str]:
    """The card's YAML header lines (keys in the order given)."""
    return ["---", yaml.safe_dump(fields, sort_keys=False).strip(), "---"]


def generate_card(
    method: MergeMethod,
    model_refs: list[str],
    base_ref: str | None,
    config_text: str,
    title: str,
    random_seed: int | None = None,
) -> str:
    hub_models = [r.split("@")[0] for r in model_refs if is_hub_id(r.split("+")[0].split("@")[0])]
    front = {"base_model": hub_models, "library_name": "transformers", "tags": ["mergekitty", "merge"]}
    if not hub_models:
        del front["base_model"]
    method_text = f"[{method.pretty_name}]({method.paper_url})" if method.paper_url else method.pretty_name
    uses_base = base_ref is not None and method.base != "ignored"
    lines = [
        *front_matter(front),
        f"# {title}",
        "",
        f"This is a merge of pre-trained language models made with {made_with()}.",
        "",
        "## Merge Details",
        "### Merge Method",
        "",
        f"This model was merged using the {method_text} merge method"
        + (f" using {hub_link(base_ref)} as a base." if uses_base and base_ref is not None else "."),
        "",
        "### Models Merged",
        "",
        "The following models were included in the merge:",
    ]
    for ref in model_refs:
        if uses_base and ref == base_ref:
            continue
        lines.append(f"* {hub_link(ref)}")
    if random_seed is not None:
        lines += ["", f"Random seed: `{random_seed}`"]
    lines += [
        "",
        "### Configuration",
        "",
        "The following YAML configuration was used to produce this model:",
        "",
        "```yaml",
        config_text.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
