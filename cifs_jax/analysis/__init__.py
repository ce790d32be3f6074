"""Analysis of trained runs: the paper's channel statistics (Section 3.1,
Figures 1 and 3), training curves (Figure 4), per-class accuracy, and the
reproduction report (``cifs_jax.report``).

Matplotlib draws with the Agg backend (files only, nothing interactive).
"""
