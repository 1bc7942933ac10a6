"""Shared tensor operations. Each dispatches to a native kernel for CPU tensors and to
torch elsewhere; the torch path is also the reference the native path is tested against."""
