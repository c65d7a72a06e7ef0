"""Calibration and evaluation text: installed corpora, token windows, self-generated text and replayable records."""
