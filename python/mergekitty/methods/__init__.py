"""Merge methods: one file per method, registered in ``registry``."""
