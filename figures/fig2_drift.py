"""Figure 2: cosine to base (or drift, --metric direction_drift) of the re-extracted refusal and
harmfulness directions, step × layer.

Usage: python figures/fig2_drift.py AUDIT_DIR [AUDIT_DIR ...] [--labels A,B]
    [--out fig2_drift.pdf]
(several audit folders are overlaid, one colour per run; the plot is safegeom.plots).
"""

from safegeom.figure_files import figure_script

if __name__ == "__main__":
    raise SystemExit(
        figure_script("fig2_drift", choices={"metric": ("cosine_to_base", "direction_drift")})
    )
