"""Command-line entry points. Heavy imports (torch, transformers) happen inside commands."""
