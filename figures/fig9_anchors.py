"""Figure 9: the geometry against every anchor of an audit (safegeom audit --anchor NAME=MODEL):
the cosine of the checkpoint's refusal direction to each anchor's and the H/R coupling per anchor
vs step, and the all-anchor summary (mean over anchors, band the range).

Usage: python figures/fig9_anchors.py AUDIT_DIR [AUDIT_DIR ...] [--labels A,B]
    [--out fig9_anchors.pdf]
(several audit folders are overlaid, one colour per run; the plot is safegeom.plots).
"""

from safegeom.figure_files import figure_script

if __name__ == "__main__":
    raise SystemExit(figure_script("fig9_anchors"))
