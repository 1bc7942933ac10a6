"""Bounds on what a config or an input model's files may ask for.

A config or a downloaded model is input that nobody checked: a few hundred bytes can ask for
billions of values (YAML aliases), thousands of nested brackets, or a vocabulary padded to
terabytes. Each bound is far above anything a real merge needs, and low enough that reaching it
costs at most seconds and a few hundred MiB; crossing it is a one-line error naming the file and key.
"""

from __future__ import annotations

MAX_NESTING = 64
"""Levels of nesting in a YAML config or a JSON file of a model. Configs nest ~8 levels
(``slices[i].sources[j].parameters.weight[k].value``), ``config.json`` ~4, ``tokenizer.json`` ~6;
the Python parsers and ``copy.deepcopy`` recurse per level and fail with a RecursionError near
300-1000 levels."""

MAX_CONFIG_VALUES = 500_000
"""Values (mappings, lists, scalars) a YAML config may hold once every alias is expanded. Anchors
for shared parameters multiply a config by a few; the largest real merges (hundreds of slices,
thousands of ``tokenizer.tokens``) hold tens of thousands, and validating 500,000 takes about a
second. Nested aliases multiply: 9 aliases of 9 aliases ... ten levels deep are 3.5 billion
values in 400 bytes."""

MAX_TOKEN_ID = 2**24
"""Token ids (and so embedding rows) of a vocabulary: 16,777,216. The largest published
vocabularies have about 262,144 tokens (Gemma 3); the output's row maps take 8 bytes per row and
input model, and the embedding matrix ``rows x hidden`` elements."""

MAX_PAD_TO_MULTIPLE_OF = 2**16
"""``tokenizer.pad_to_multiple_of``: vocabularies are padded to a multiple of a GPU tile or of
the tensor-parallel degree (8 to 1024 in practice); padding adds up to this many rows."""

MAX_CONFIG_BYTES = 2 * 2**20
"""Characters of a YAML config (2 MiB). The largest real configs are tens of KiB, and PyYAML,
pure Python, reads well under 1 MB a second. A path such as ``/dev/zero`` would otherwise be
read until memory runs out."""
