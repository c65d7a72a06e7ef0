"""Calibration and evaluation text: installed corpora, token windows, self-generated text and replayable records."""

# 32 windows of 512 tokens by default: with 8, the OBS refit overfits the calibration windows and loses off their
# registers (at 0.2 removed: fortunes x2.88 -> x2.34, jargon x2.77 -> x2.10, novels x2.71 -> x2.30 with 32;
# docs/results/bench-grid). Kept here, free of heavy imports, so the CLI parser can name it.
DEFAULT_CALIBRATION_SAMPLES = 32
