"""Figure 6: coordinate separation per basis vector of the base's cone, and their imbalance, vs
step.

Usage: python figures/fig6_coordinates.py AUDIT_DIR [AUDIT_DIR ...] [--labels A,B]
    [--out fig6_coordinates.pdf]
(several audit folders are overlaid, one colour per run; the plot is safegeom.plots).
"""

from safegeom.figure_files import figure_script

if __name__ == "__main__":
    raise SystemExit(figure_script("fig6_coordinates"))
