"""Pieces both paths share: configs, weights, tokenizers, tree topology, sampling, acceptance rules,
results. One source of truth per rule; ``specdec.ref`` and ``specdec.fast`` import from here."""
