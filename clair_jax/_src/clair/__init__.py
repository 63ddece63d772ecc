"""CLAIR: noise estimation, detection of contaminated clients, subspace refinement."""
