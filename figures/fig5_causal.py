"""Figure 5: fixed-source ablation and addition effects vs step, against the band of matched random
controls.

Usage: python figures/fig5_causal.py AUDIT_DIR [AUDIT_DIR ...] [--labels A,B]
    [--out fig5_causal.pdf]
(several audit folders are overlaid, one colour per run; the plot is safegeom.plots).
"""

from safegeom.figure_files import figure_script

if __name__ == "__main__":
    raise SystemExit(figure_script("fig5_causal"))
