"""Bridges to other frameworks: ``mindformers`` (registration, needs the mindformers extra) and
``mindformers_recipe`` (YAML conversion, no extra needed)."""
