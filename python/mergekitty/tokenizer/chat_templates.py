"""The ``chat_template`` setting of a merge config.

``chat_template`` may be:

- ``"auto"``: the template most of the input models use (ties go to the first in config order:
  the base model, then the models as listed); when no input has one, the donor's tokenizer files
  are left as they are;
- a built-in name (``BUILTIN_TEMPLATES``), whose Jinja text ships in ``templates/``;
- a Jinja template (any string with ``{%`` or ``{{``), used verbatim.

The chosen template is written where transformers reads it first, ``chat_template.jinja``; a
``chat_template`` entry copied in ``tokenizer_config.json`` is removed and a processor
``chat_template.json`` is updated, so the output has one template only.
"""

from __future__ import annotations

import difflib
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ModelFormatError
from ..io.model_files import model_file, read_json, read_text, shown

log = logging.getLogger(__name__)

BUILTIN_TEMPLATES = ("alpaca", "chatml", "exaone", "llama3", "mistral")
AUTO = "auto"
KEY = "chat_template"


def builtin_template(name: str) -> str:
    """The Jinja text of a built-in template (``alpaca``, ``chatml``, ...)."""
    if name not in BUILTIN_TEMPLATES:
        raise KeyError(name)
    return resources.files(__package__).joinpath("templates", f"{name}.jinja").read_text(encoding="utf-8")


def is_jinja(text: str) -> bool:
    return "{%" in text or "{{" in text


def _normalize(template: Any) -> str | None:
    """A template as stored in a model: a string, a list of {name, template} or a dict by name
    (the "default" entry counts). Returns the stripped text, or None."""
    if isinstance(template, list):
        template = {
            t.get("name"): t.get("template") for t in template if isinstance(t, dict) and isinstance(t.get("name"), str)
        }
    if isinstance(template, dict):
        template = template.get("default")
    if isinstance(template, str) and template.strip():
        return template.strip()
    return None


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in an output's tokenizer file; {} (with a warning) when it holds none,
    so that writing the template replaces it."""
    try:
        data = read_json(path)
    except ModelFormatError as exc:
        log.warning("%s", exc)
        return {}
    return data if isinstance(data, dict) else {}


def model_chat_template(path: str | Path) -> str | None:
    """The chat template of the model in directory ``path``, looked up in the order transformers
    uses: ``chat_template.jinja``, then ``tokenizer_config.json``, then ``chat_template.json``.
    A file that is unreadable or not what it should be is a ModelFormatError naming it."""
    jinja = model_file(path, "chat_template.jinja")
    if jinja is not None:
        found = _normalize(read_text(jinja))
        if found:
            return found
    for name in ("tokenizer_config.json", "chat_template.json"):
        f = model_file(path, name)
        if f is not None:
            data = read_json(f)
            if not isinstance(data, dict):
                raise ModelFormatError(f"{f}: expected a JSON object, got {shown(data)}")
            found = _normalize(data.get(KEY))
            if found:
                return found
    return None


def _unknown(value: str, error: Callable[[str], Exception]) -> Exception:
    names = ", ".join(BUILTIN_TEMPLATES)
    close = difflib.get_close_matches(value.strip().lower(), [AUTO, *BUILTIN_TEMPLATES], n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    shown = value if len(value) <= 40 else value[:37] + "..."
    return error(
        f"unknown chat template {shown!r}: use 'auto', a built-in name ({names}) or a Jinja template (a string containing '{{%' or '{{{{'){hint}"
    )


def _check_jinja(template: str, error: Callable[[str], Exception]) -> None:
    try:
        from jinja2.exceptions import TemplateSyntaxError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:  # pragma: no cover - jinja2 comes with transformers
        return
    try:
        ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except TemplateSyntaxError as exc:
        raise error(f"the Jinja template does not parse: {exc.message} (template line {exc.lineno})") from None
    except RecursionError:  # jinja2's parser recurses per nested block or bracket
        raise error("the Jinja template does not parse: it nests blocks or brackets too deeply") from None


def resolve_chat_template(
    value: str | None, model_dirs: Iterable[str | Path], error: Callable[[str], Exception] | None = None
) -> str | None:
    """The template text ``value`` asks for, or None to leave the donor's tokenizer files alone.

    ``model_dirs`` are the input models in config order (base first); only ``auto`` reads them.
    ``error(message)`` builds the exception for a bad value (default: ConfigError on ``chat_template``).
    """
    if error is None:

        def error(message: str) -> Exception:
            return ConfigError(message, key=KEY)

    if value is None or not str(value).strip():
        return None
    if not isinstance(value, str):
        raise error(f"expected a string, got {type(value).__name__}")
    name = value.strip().lower()
    if name == AUTO:
        found = [t for t in (model_chat_template(d) for d in model_dirs) if t is not None]
        if not found:
            log.info(
                "chat_template: auto: no input model has a chat template; keeping the donor's tokenizer files as they are"
            )
            return None
        # Counter keeps first-insertion order among equal counts, so ties go to config order.
        template, count = Counter(found).most_common(1)[0]
        log.info("chat_template: auto: using the template of %d of %d models that have one", count, len(found))
        return template
    if name in BUILTIN_TEMPLATES:
        return builtin_template(name)
    if is_jinja(value):
        _check_jinja(value, error)
        return value
    raise _unknown(value, error)


def write_chat_template(out: str | Path, template: str) -> None:
    """Make ``template`` the chat template of the tokenizer files in ``out``."""
    out = Path(out)
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    config = out / "tokenizer_config.json"
    if config.is_file():
        data = _read_json(config)
        if KEY in data:
            del data[KEY]
            config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    processor = out / "chat_template.json"
    if processor.is_file():
        data = _read_json(processor)
        data[KEY] = template
        processor.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
