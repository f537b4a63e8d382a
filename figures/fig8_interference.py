"""Figure 8: task–safety interference vs step: the cosine between the task's descent direction
and the harmful refusal score's gradient (residual stream at the carrier layer, block weights),
and the share of the activation change inside the base's cone, with CIs and floors.

Usage: python figures/fig8_interference.py AUDIT_DIR [AUDIT_DIR ...] [--labels A,B]
    [--out fig8_interference.pdf]
(several audit folders are overlaid, one colour per run; the plot is safegeom.plots).
"""

from safegeom.figure_files import figure_script

if __name__ == "__main__":
    raise SystemExit(figure_script("fig8_interference"))
