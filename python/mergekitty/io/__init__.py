"""Reading input checkpoints and writing the merged one."""
