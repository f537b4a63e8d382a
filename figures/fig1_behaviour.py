"""Figure 1: behaviour vs step (ASR, over-refusal, task accuracy) with 95% CI bands.

Usage: python figures/fig1_behaviour.py AUDIT_DIR [AUDIT_DIR ...] [--labels A,B]
    [--out fig1_behaviour.pdf]
(several audit folders are overlaid, one colour per run; the plot is safegeom.plots).
"""

from safegeom.figure_files import figure_script

if __name__ == "__main__":
    raise SystemExit(figure_script("fig1_behaviour"))
