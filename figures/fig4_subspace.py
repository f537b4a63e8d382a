"""Figure 4: largest principal angle and Grassmann distance between the base's cone and each
checkpoint's.

Usage: python figures/fig4_subspace.py AUDIT_DIR [AUDIT_DIR ...] [--labels A,B]
    [--out fig4_subspace.pdf]
(several audit folders are overlaid, one colour per run; the plot is safegeom.plots).
"""

from safegeom.figure_files import figure_script

if __name__ == "__main__":
    raise SystemExit(figure_script("fig4_subspace"))
