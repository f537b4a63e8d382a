"""Figure 3: H/R coupling vs step at the carrier layer, and per layer at the first and last
checkpoint.

Usage: python figures/fig3_coupling.py AUDIT_DIR [AUDIT_DIR ...] [--labels A,B]
    [--out fig3_coupling.pdf]
(several audit folders are overlaid, one colour per run; the plot is safegeom.plots).
"""

from safegeom.figure_files import figure_script

if __name__ == "__main__":
    raise SystemExit(figure_script("fig3_coupling"))
