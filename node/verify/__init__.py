"""Keeping providers honest: model commitments, spot checks that re-run sampled calls, and evidence bundles anyone can re-check."""
